"""Influence benchmark: jaxunlearn.influence against a plain-JAX baseline, pyDVL, kronfluence and torch.func.

    bash experiments/benchmarks/setup_peers.sh            # once: peer virtualenvs under .peers/
    python -m experiments.benchmarks.influence_bench [--workload A|B|all] [--repeats N] [--out DIR]
                                                     [--quick] [--peers plainjax,torch,pydvl,kronfluence]
    python -m experiments.benchmarks.ekfac_bench [--workloads B,R] [--repeats 3]   # EK-FAC rows

Every library runs in its own interpreter (the peers in their virtualenvs) on the same machine in
the same run, on identical weights and data read from one ``.npz`` per workload (made once by
:mod:`experiments.benchmarks.workloads`, cached under ``DIR/data``). Reported per method and stage:
the median wall time over the repeats (jaxunlearn and plain JAX after ahead-of-time compilation,
compile time separately), ``stage_total`` (the sum of the pipeline stages a row reports -- per-sample
gradients, measurement/query gradients, Hessian, factor, solve, scores, self-influence -- the same
definition for every implementation; the stages each total includes are listed), the ratio peer / jaxunlearn per stage (> 1: jaxunlearn faster), the relative error of
the scores against a float64 reference, and the fraction of this machine's f32 GEMM peak (measured
in the same run with a 2048 x 2048 matmul in numpy and in JAX) implied by analytic FLOP counts.
Writes ``DIR/results.json`` and ``DIR/report.md``. A peer whose virtualenv is missing or whose
runner fails is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments.benchmarks import peer_common as pc

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEERS_DIR = ROOT / ".peers"

# (library, virtualenv, runner script, methods for A, methods for B)
RUNNERS = [
    ("jaxunlearn", None, "run_jax.py", "direct,cg,direct_api,cg_api", "cg,arnoldi"),
    ("plain JAX", None, "run_plainjax.py", "direct,cg", "cg"),
    ("torch.func", "torch", "peer_torch.py", "direct,cg", "cg,arnoldi"),
    ("pyDVL", "pydvl", "peer_pydvl.py", "direct,cg", "cg,arnoldi"),
    ("kronfluence", "kronfluence", "peer_kronfluence.py", "ekfac", "ekfac"),
]
PEER_KEYS = {"plainjax": "plain JAX", "torch": "torch.func", "pydvl": "pyDVL", "kronfluence": "kronfluence"}
# Stages a runner times for comparison only (not part of its pipeline): left out of "stage_total".
INFORMATIVE = {("jaxunlearn", "A"): ("per_sample_grads",)}
# XLA:CPU's YNNPACK fusion: the caller's XLA_FLAGS unless --jax-ynn on/off; --jax-ynn both runs the JAX
# runners with and without it in the same run. Measured on workload A (BUILD_NOTES): jaxunlearn's CG
# 1.0-1.5x faster with it off, its gradient stages and plain JAX's G V 1.5-40x slower -- no global default.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
JAX_LIBS = ("jaxunlearn", "plain JAX")


def ynn_env(setting: str) -> dict:
    """XLA_FLAGS for a JAX runner: the caller's flags with YNN fusion switched ``off`` or left ``on``."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(YNN_OFF.rstrip("="))]
    if setting == "off":
        flags.append(YNN_OFF)
    return {"XLA_FLAGS": " ".join(flags)}


# which jaxunlearn method a peer method is compared with
COUNTERPART = {"direct": "direct", "cg": "cg", "arnoldi": "arnoldi", "ekfac": {"A": "direct", "B": "arnoldi"}}


# ------------------------------------------------------------------------------------ machine
def gemm_gflops(size: int = 2048, reps: int = 5) -> dict:
    """Median f32 (and f64) GEMM GFLOP/s of a size x size matmul in numpy and in JAX."""
    import jax
    import jax.numpy as jnp

    out = {}
    flops = 2.0 * size ** 3
    rng = np.random.default_rng(0)
    for dt in ("float32", "float64"):
        a = rng.standard_normal((size, size)).astype(dt)
        b = rng.standard_normal((size, size)).astype(dt)
        a @ b
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
        out[f"numpy_{dt}"] = flops / np.median(ts) / 1e9
    ja, jb = jnp.asarray(rng.standard_normal((size, size)), jnp.float32), None
    jb = jnp.asarray(rng.standard_normal((size, size)), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(ja, jb).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(ja, jb).block_until_ready()
        ts.append(time.perf_counter() - t0)
    out["jax_float32"] = flops / np.median(ts) / 1e9
    out["peak_float32"] = max(out["numpy_float32"], out["jax_float32"])
    return out


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


# ------------------------------------------------------------------------------------ data
def ensure_data(workload: str, quick: bool, data_dir: Path, regen: bool) -> Path:
    path = data_dir / f"{workload}{'_quick' if quick else ''}.npz"
    if path.exists() and not regen:
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.benchmarks.workloads", "--workload", workload, "--out", str(path)]
    if quick:
        cmd.append("--quick")
    print(f"[data] generating workload {workload} -> {path}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[data] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ------------------------------------------------------------------------------------ runners
def run_runner(library, venv, script, methods, workload, data_path, repeats, out_dir, timeout, cg_rows=None,
               env_extra=None):
    if venv is None:
        python = sys.executable
    else:
        python = str(PEERS_DIR / venv / "bin" / "python")
        if not Path(python).exists():
            return {"skipped": f"virtualenv {PEERS_DIR / venv} missing: run "
                               "`bash experiments/benchmarks/setup_peers.sh`"}
    scores_path = out_dir / f"scores_{workload}_{re.sub('[^A-Za-z0-9]+', '_', library).strip('_')}.npz"
    cmd = [python, str(HERE / script), "--workload", workload, "--data", str(data_path),
           "--repeats", str(repeats), "--scores", str(scores_path), "--methods", methods]
    if cg_rows:
        cmd += ["--cg-rows", str(cg_rows)]
    print(f"[{workload}] {library}: {methods} x{repeats}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(f"[{workload}] {library} FAILED (rc {proc.returncode}):\n{tail}", flush=True)
        return {"skipped": f"runner failed (rc {proc.returncode}): {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                "stderr_tail": tail}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["runner_wall_s"] = wall
    res["scores_file"] = str(scores_path)
    print(f"[{workload}] {library}: done in {wall:.0f} s", flush=True)
    return res


# ------------------------------------------------------------------------------------ analysis
def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def errors(workload: str, data: dict, scores: dict, method: str) -> dict:
    out = {}
    ref = data["ref_scores"]
    S = scores.get(f"{method}__scores")
    if S is not None:
        if workload == "A":
            names = [str(s) for s in data["measurement_names"]]
            for j, nm in enumerate(names):
                out[nm] = rel_err(S[j], ref[j])
            out["scores"] = rel_err(S, ref)
        else:
            r = min(ref.shape[0], S.shape[0])
            out["scores"] = rel_err(S[:r], ref[:r])
            out["rows_compared"] = r
    s = scores.get(f"{method}__self")
    if s is not None:
        out["self_influence"] = rel_err(s, data["ref_self"])
    return out


def stage_flops(workload: str, data: dict, info: dict, method: str) -> dict:
    """Analytic FLOPs of each stage (the structured minimum; the same count for every library).

    Workload A: per-sample grads 2ndK + np; Hessian K(K+1)/2 Gram GEMMs of 2nd^2; Cholesky p^3/3;
    self-influence one triangular solve with n right-hand sides (n p^2); HVP 4ndK; CG solve
    iterations x 3 columns x HVP. Workload B (per example, P_w = weights): forward 2 P_w,
    per-sample gradient 3 forwards, HVP 4 forwards; scores G V = 2 q n p; Arnoldi factor
    Krylov steps x HVP + re-orthogonalisation 4 p k^2.
    """
    if method.endswith("_api"):
        return {}
    if workload == "A":
        n, d = data["X"].shape
        k = data["W"].shape[0]
        nv = data["Xv"].shape[0]
        p = d * k
        its = info.get("cg_iterations")
        f = {
            "per_sample_grads": 2 * n * d * k + n * p,
            "measure_grads": 3 * 4 * nv * d * k,
            "hessian": (k * (k + 1) // 2) * 2 * n * d * d,
            "factor": p ** 3 / 3,
            "solve": 2 * 2 * p * p * 3,
            "scores": 3 * 2 * n * p,
            "self_influence": n * p * p + 2 * n * p,
            "hvp": 4 * n * d * k,
        }
        if method.startswith("cg"):
            f = {k_: v for k_, v in f.items() if k_ not in ("hessian", "factor", "self_influence")}
            f["solve"] = its * 3 * 4 * n * d * k if its else None
        return {k_: v for k_, v in f.items() if v}
    n = data["X"].shape[0]
    nq = data["Xq"].shape[0]
    nl = sum(1 for key in data if key.startswith("W"))
    sizes = [data["W1"].shape[0]] + [data[f"W{i + 1}"].shape[1] for i in range(nl)]
    pw = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    p = pw + sum(sizes[1:])
    fwd = 2 * pw   # per example
    rows = info.get("rows") or nq
    f = {"per_sample_grads": 3 * fwd * n, "hvp": 4 * fwd * n, "query_grads": 3 * fwd * rows,
         "scores": 2 * rows * n * p}
    if info.get("cg_iterations"):
        f["solve"] = info["cg_iterations"] * rows * 4 * fwd * n
    if info.get("krylov"):
        kr = info["krylov"]
        f["factor"] = kr * 4 * fwd * n + 2 * 2 * p * kr * kr
        f["solve"] = 2 * 2 * p * info["rank"] * nq
    return f


def medians(stages: dict) -> dict:
    return {k: float(np.median(v)) for k, v in stages.items()}


def analyse(workload, data, libs, peak):
    """Per (library, method): median stages, errors, GFLOP/s fraction; ratios vs jaxunlearn."""
    rows = []
    jax_res = libs.get("jaxunlearn", {})
    for lib, res in libs.items():
        if "methods" not in res:
            continue
        with np.load(res["scores_file"]) as f:
            scores = {k: f[k] for k in f.files}
        for method, mres in res["methods"].items():
            med = medians(mres["stages"])
            info = {k: v for k, v in mres.items() if k not in ("stages",)}
            jinfo = {}
            cp = COUNTERPART.get(method, method)
            cp = cp[workload] if isinstance(cp, dict) else cp
            if lib != "jaxunlearn" and cp in jax_res.get("methods", {}):
                jinfo = jax_res["methods"][cp]
            # FLOP counts use the method's own CG iterations if reported, else jaxunlearn's
            fl_info = dict(info)
            if method == "cg" and "cg_iterations" not in fl_info and "cg" in jax_res.get("methods", {}):
                fl_info["cg_iterations"] = jax_res["methods"]["cg"].get("cg_iterations")
            if method == "cg" and workload == "B":
                fl_info.setdefault("rows", jax_res.get("methods", {}).get("cg", {}).get("rows") or len(data["ref_rows"]))
            fl = stage_flops(workload, data, fl_info, method) if method != "ekfac" else {}
            frac = {k: fl[k] / med[k] / (peak * 1e9) for k in med if k in fl and med[k] > 0}
            ratio = {}
            if jinfo:
                jmed = medians(jinfo["stages"])
                jincl = [st for st in (pc.STAGES_A if workload == "A" else pc.STAGES_B)
                         if st in jmed and st not in INFORMATIVE.get(("jaxunlearn", workload), ())]
                jmed["stage_total"] = float(sum(jmed[st] for st in jincl))
                ratio = {k: med[k] / jmed[k] for k in med if k in jmed and jmed[k] > 0}
            # identical accounting: stage_total = sum of the pipeline stages the row reports
            incl = [st for st in (pc.STAGES_A if workload == "A" else pc.STAGES_B)
                    if st in med and st not in INFORMATIVE.get((lib.split(" [")[0], workload), ())]
            med["stage_total"] = float(sum(med[st] for st in incl))
            rows.append({"library": lib, "method": method, "median_s": med, "total_includes": incl, "errors": errors(workload, data, scores, method),
                         "fraction_of_peak": frac, "flops": fl, "ratio_vs_jaxunlearn": ratio,
                         "jaxunlearn_counterpart": cp if jinfo else None,
                         "info": {k: v for k, v in info.items() if k != "compile"},
                         "compile_s": info.get("compile")})
    return rows


# ------------------------------------------------------------------------------------ report
def fmt_s(x):
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def report_md(results: dict) -> str:
    g = results["gemm"]
    lines = [
        "# Influence benchmark: jaxunlearn.influence vs pyDVL, kronfluence, torch.func",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
        f"{' / '.join(f'{x:.1f}' for x in results['machine']['loadavg_start'])} at start, "
        f"{' / '.join(f'{x:.1f}' for x in results['machine']['loadavg_end'])} at end "
        "(other processes share the cores: timings are noisy).",
        f"GEMM 2048² (GFLOP/s): numpy f32 {g['numpy_float32']:.0f}, jax f32 {g['jax_float32']:.0f}, "
        f"numpy f64 {g['numpy_float64']:.0f}; peak used = {g['peak_float32']:.0f} "
        f"(end of run: {results['gemm_end']['peak_float32']:.0f}).",
        f"Repeats: {results['repeats']} (jaxunlearn), {results['peer_repeats']} (peers); medians. "
        f"CG: ||Hx - b|| <= {pc.CG_RTOL:g} ||b||; Arnoldi: rank {pc.ARNOLDI_RANK}, "
        f"{pc.ARNOLDI_KRYLOV} Krylov vectors. jaxunlearn runner OPENBLAS_NUM_THREADS: "
        f"{results.get('jax_openblas_threads') or 'unset'}; JAX runners' YNN fusion: "
        f"{results.get('jax_ynn', 'on')} (`{YNN_OFF}` when off). Command: `{results['command']}`.",
        "",
    ]
    for w, wres in results["workloads"].items():
        info = wres["data_info"]
        lines += [f"## Workload {w}", "", wres["description"], "",
                  "Data: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                       for k, v in info.items() if not isinstance(v, dict)), ""]
        for lib, res in wres["libraries"].items():
            if "skipped" in res:
                lines.append(f"* **{lib}: skipped** — {res['skipped']}")
        rows = wres["rows"]
        if not rows:
            continue
        stages = [s for s in (pc.STAGES_A if w == "A" else pc.STAGES_B) + ("hvp", "total", "stage_total")
                  if any(s in r["median_s"] for r in rows)]
        lines += ["", "### Median wall time per stage (s)", "",
                  "| library | method | " + " | ".join(stages) + " | compile (jax) |",
                  "|---|---|" + "---|" * (len(stages) + 1)]
        for r in rows:
            comp = r["compile_s"]
            comp_s = fmt_s(sum(comp.values())) if isinstance(comp, dict) and comp else "–"
            lines.append(f"| {r['library']} | {r['method']} | " +
                         " | ".join(fmt_s(r["median_s"].get(s)) for s in stages) + f" | {comp_s} |")
        lines += ["", "`stage_total` = the sum of the stages listed below for each row (the same "
                  "definition for every implementation; `total` = end-to-end wall time of the run):", ""]
        lines += [f"* {r['library']} {r['method']}: {' + '.join(r['total_includes'])}" for r in rows]
        lines += ["", "### Ratio peer / jaxunlearn (same solver; > 1 means jaxunlearn is faster)", "",
                  "| library | method | vs | " + " | ".join(stages) + " |",
                  "|---|---|---|" + "---|" * len(stages)]
        for r in rows:
            if r["library"] == "jaxunlearn" or not r["ratio_vs_jaxunlearn"]:
                continue
            lines.append(f"| {r['library']} | {r['method']} | {r['jaxunlearn_counterpart']} | " +
                         " | ".join(f"{r['ratio_vs_jaxunlearn'][s]:.2f}" if s in r["ratio_vs_jaxunlearn"] else "–"
                                    for s in stages) + " |")
        err_keys = ["util", "dp", "rob", "self_influence"] if w == "A" else ["scores"]
        lines += ["", "### Relative error vs the float64 reference (‖s − s_ref‖ / ‖s_ref‖)", "",
                  "| library | method | " + " | ".join(err_keys) + " | solver info |",
                  "|---|---|" + "---|" * (len(err_keys) + 1)]
        for r in rows:
            inf = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["info"].items()
                            if k in ("cg_iterations", "cg_rel_residual", "rows", "rank", "grad_norm"))
            lines.append(f"| {r['library']} | {r['method']} | " +
                         " | ".join(f"{r['errors'][k]:.2e}" if k in r["errors"] else "–" for k in err_keys) +
                         f" | {inf} |")
        lines += ["", "### Fraction of the measured f32 GEMM peak (analytic FLOPs / time / peak)", "",
                  "| library | method | " + " | ".join(stages[:-1]) + " |",
                  "|---|---|" + "---|" * (len(stages) - 1)]
        for r in rows:
            if not r["fraction_of_peak"]:
                continue
            lines.append(f"| {r['library']} | {r['method']} | " +
                         " | ".join(f"{100 * r['fraction_of_peak'][s]:.1f}%" if s in r["fraction_of_peak"] else "–"
                                    for s in stages[:-1]) + " |")
        lines.append("")
    lines += ["## Peer virtualenvs", "", "```", results.get("peer_versions", ""), "```", ""]
    return "\n".join(lines)


DESCRIPTIONS = {
    "A": ("Softmax head on frozen features (no intercept), L2 in the objective; measurements: "
          "validation loss (util), DP surrogate p(class 1 | s=1) − p(class 1 | s=0) (dp), loss on "
          "FGSM-perturbed validation features (rob); plus exact self-influence. jaxunlearn uses the "
          "closed-form last-layer path; `direct_api`/`cg_api` are the one-call `influence_scores` "
          "(+ `self_influence`) path. jaxunlearn's `per_sample_grads` (materialising G) is timed "
          "for comparison only — its pipeline never forms G."),
    "B": ("MLP 784-128-64-10 (ReLU), per-query CE loss of the query points; H = Hessian of the mean "
          "training loss + (l2 + damping) I. CG solves the reference query rows only (the float64 "
          "reference is CG to 1e-9 on those rows; a dense solve of p ≈ 109k is out of reach); "
          "Arnoldi scores all queries. kronfluence (EK-FAC on the 3 Linear layers) scores all "
          "queries."),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description="jaxunlearn.influence vs peers")
    ap.add_argument("--workload", choices=["A", "B", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats for jaxunlearn")
    ap.add_argument("--peer-repeats", type=int, default=None, help="timed repeats for peers (default: --repeats)")
    ap.add_argument("--out", default=None, help="output directory (default runs/influence_bench[_quick])")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--peers", default="plainjax,torch,pydvl,kronfluence",
                    help="subset of plainjax,torch,pydvl,kronfluence ('' for none)")
    ap.add_argument("--data-dir", default=None, help="cache of the workload .npz files (default OUT/data)")
    ap.add_argument("--regen", action="store_true", help="regenerate the cached workload data")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per runner")
    ap.add_argument("--jax-openblas-threads", type=int, default=None,
                    help="OPENBLAS_NUM_THREADS for the jaxunlearn runner (its LAPACK calls -- Cholesky, "
                         "triangular solves -- go through scipy's OpenBLAS; 1 avoids thread spinning on a "
                         "shared, oversubscribed CPU)")
    ap.add_argument("--cg-rows", type=int, default=None,
                    help="workload B: query rows solved by CG (default: the reference rows)")
    ap.add_argument("--jax-ynn", choices=["inherit", "on", "off", "both"], default="inherit",
                    help="XLA:CPU YNN fusion for the JAX runners (jaxunlearn, plain JAX): 'inherit' = your "
                         f"XLA_FLAGS as they are (default), 'on' = XLA's default, 'off' adds {YNN_OFF} to "
                         "their XLA_FLAGS, 'both' runs each twice (on, then rows '[YNN off]')")
    ap.add_argument("--cg-rtol", type=float, default=None,
                    help=f"CG stopping rule ||Hx - b|| <= RTOL ||b|| for every library (default {pc.CG_RTOL:g})")
    ap.add_argument("--methods", default=None,
                    help="only these methods of every runner (e.g. 'cg'); default: all")
    args = ap.parse_args(argv)
    if args.cg_rtol is not None:
        if not 0 < args.cg_rtol < 1:
            raise SystemExit(f"--cg-rtol must be in (0, 1), got {args.cg_rtol}")
        os.environ["JAXUNLEARN_BENCH_CG_RTOL"] = repr(args.cg_rtol)  # read by every runner's peer_common
        pc.CG_RTOL = args.cg_rtol

    out = Path(args.out or ROOT / "runs" / ("influence_bench_quick" if args.quick else "influence_bench"))
    out.mkdir(parents=True, exist_ok=True)
    peer_repeats = args.peer_repeats or args.repeats
    wanted = {"jaxunlearn"} | {PEER_KEYS[p] for p in args.peers.split(",") if p}
    unknown = [p for p in args.peers.split(",") if p and p not in PEER_KEYS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {sorted(PEER_KEYS)}")

    results = {"command": " ".join(["python -m experiments.benchmarks.influence_bench"] + (argv or sys.argv[1:])),
               "jax_openblas_threads": args.jax_openblas_threads, "jax_ynn": args.jax_ynn,
               "machine": machine_info(), "repeats": args.repeats, "peer_repeats": peer_repeats,
               "quick": args.quick, "settings": {"cg_rtol": pc.CG_RTOL, "cg_maxiter": pc.CG_MAXITER,
                                                 "arnoldi_rank": pc.ARNOLDI_RANK,
                                                 "arnoldi_krylov": pc.ARNOLDI_KRYLOV},
               "workloads": {}}
    print("[gemm] measuring f32 GEMM peak", flush=True)
    results["gemm"] = gemm_gflops()
    print(f"[gemm] {json.dumps({k: round(v, 1) for k, v in results['gemm'].items()})}", flush=True)
    vers = []
    for key, venv in (("torch", "torch"), ("pydvl", "pydvl"), ("kronfluence", "kronfluence")):
        py = PEERS_DIR / venv / "bin" / "python"
        if py.exists():
            r = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True)
            pk = [ln for ln in r.stdout.splitlines()
                  if ln.lower().split("==")[0] in ("torch", "numpy", "pydvl", "kronfluence", "accelerate", "scipy")]
            vers.append(f"{venv}: " + ", ".join(pk))
        else:
            vers.append(f"{venv}: missing")
    results["peer_versions"] = "\n".join(vers)

    for w in (["A", "B"] if args.workload == "all" else [args.workload]):
        path = ensure_data(w, args.quick, Path(args.data_dir) if args.data_dir else out / "data", args.regen)
        data = pc.load(str(path))
        libs = {}
        for lib, venv, script, ma, mb in RUNNERS:
            if lib not in wanted:
                continue
            reps = args.repeats if lib == "jaxunlearn" else peer_repeats
            methods = ma if w == "A" else mb
            if args.methods:
                methods = ",".join(m for m in methods.split(",") if m in args.methods.split(","))
                if not methods:
                    continue
            settings = [None]
            if lib in JAX_LIBS and args.jax_ynn != "inherit":
                settings = ["on", "off"] if args.jax_ynn == "both" else [args.jax_ynn]
            for ynn in settings:
                env_extra = ynn_env(ynn) if ynn else {}
                if lib == "jaxunlearn" and args.jax_openblas_threads:
                    env_extra["OPENBLAS_NUM_THREADS"] = str(args.jax_openblas_threads)
                name = lib if ynn in (None, settings[0]) else f"{lib} [YNN {ynn}]"
                libs[name] = run_runner(name, venv, script, methods, w, path, reps, out, args.timeout,
                                        args.cg_rows if w == "B" else None, env_extra)
        rows = analyse(w, data, libs, results["gemm"]["peak_float32"])
        info = json.loads(str(data["info"]))
        info.update({"spec": json.loads(str(data["spec"]))})
        results["workloads"][w] = {"data": str(path), "description": DESCRIPTIONS[w],
                                   "data_info": {k: v for k, v in info.items() if k != "spec"},
                                   "spec": info["spec"], "libraries": libs, "rows": rows}
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["gemm_end"] = gemm_gflops()
    results["machine"]["loadavg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report_md(results))
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")


if __name__ == "__main__":
    main()
