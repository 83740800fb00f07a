"""EK-FAC benchmark: jaxunlearn.influence.ekfac against kronfluence EK-FAC, errors against the exact solve.

    bash experiments/benchmarks/setup_peers.sh        # once: .peers/kronfluence
    python -m experiments.benchmarks.ekfac_bench [--workloads B,R] [--repeats 3] [--out DIR] [--quick]

Workloads (:mod:`experiments.benchmarks.workloads`): B, the MLP 784-128-64-10 (p = 109,386,
n = 5,000, 500 queries); R, a CPU-scale ResNet-18 (base width 4, 32x32x3 synthetic images,
n = 512, 50 queries; EK-FAC blocks = the 20 convs + head, BatchNorm fixed). Both libraries run in
their own interpreter in the same run, on the same weights and data, with the same settings:
EK-FAC with labels sampled from the model (true Fisher; jaxunlearn also with ``fisher="exact"``,
the label expectation in closed form, which kronfluence does not offer), absolute damping = the workload's
``hess_shift`` (l2 + damping of H), 1,024-row training batches, all queries scored.

Stage accounting (identical for both): ``factor`` = covariance factors + eigendecompositions +
eigenvalue correction; ``scores`` = query gradients + preconditioning + training gradients + the
[n_query, n] contraction; ``self_influence`` = [n] self-influence; ``total`` = the three (measured
end to end). jaxunlearn's compilation runs before the timed repeats (reported separately).
Errors: ‖S − S_ref‖ / ‖S_ref‖ on the reference query rows, S_ref = (1/n) g_q^T (H + shift I)^{-1} g_i
with H the exact Hessian (CG to a tight tolerance; see workloads). Fraction of peak: analytic FLOPs
(``run_ekfac.analytic_flops``, the same count for both libraries) / median time / the f32 GEMM peak
measured in the same run (2048² matmul, numpy and JAX). Writes ``DIR/results.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from experiments.benchmarks import influence_bench as ib
from experiments.benchmarks import peer_common as pc

RUNNERS = [("jaxunlearn", None, "run_ekfac.py"), ("kronfluence", "kronfluence", "peer_kronfluence.py")]
STAGES = ("factor", "scores", "self_influence", "total")


def analyse(workload, data, libs, peak):
    rows = []
    flops = libs.get("jaxunlearn", {}).get("methods", {}).get("ekfac", {}).get("flops", {})
    base = None
    for lib, res in libs.items():
        if "methods" not in res:
            continue
        for method, m in res["methods"].items():
            rows.append(_row(lib, method, m, res, data, flops, peak))
            if lib == "jaxunlearn" and method == "ekfac":
                base = rows[-1]["median_s"]
    for row in rows:
        if base and row["library"] != "jaxunlearn":
            row["ratio_vs_jaxunlearn"] = {k: row["median_s"][k] / base[k] for k in STAGES
                                          if k in row["median_s"] and base.get(k)}
    return rows


def _row(lib, method, m, res, data, flops, peak):
    med = ib.medians(m["stages"])
    with np.load(res["scores_file"]) as f:
        S = f[f"{method}__scores"]
    ref = data["ref_scores"]
    r = ref.shape[0]
    err = {"scores": ib.rel_err(S[:r], ref), "corr": float(np.corrcoef(S[:r].ravel(), ref.ravel())[0, 1]),
           "norm_ratio": float(np.linalg.norm(S[:r]) / np.linalg.norm(ref))}
    frac = {k: flops[k] / med[k] / (peak * 1e9) for k in STAGES if k in flops and med.get(k)}
    name = lib if method == "ekfac" else f"{lib} ({m.get('fisher', method)} Fisher)"
    return {"library": name, "median_s": med, "errors": err, "fraction_of_peak": frac,
            "compile_s": m.get("compile"), "check": {k: v for k, v in m.items() if k.startswith("port")}}


def report_md(results) -> str:
    g = results["gemm"]
    lines = ["# EK-FAC: jaxunlearn.influence.ekfac vs kronfluence", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
             f"{' / '.join(f'{x:.1f}' for x in results['machine']['loadavg_start'])} at start, "
             f"{' / '.join(f'{x:.1f}' for x in results['machine']['loadavg_end'])} at end. "
             f"f32 GEMM peak {g['peak_float32']:.0f} GFLOP/s (end: {results['gemm_end']['peak_float32']:.0f}). "
             f"Repeats {results['repeats']}, medians. Command: `{results['command']}`.", ""]
    for w, wres in results["workloads"].items():
        info = wres["data_info"]
        lines += [f"## Workload {w}", "", ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                    for k, v in info.items() if not isinstance(v, dict)), ""]
        for lib, res in wres["libraries"].items():
            if "skipped" in res:
                lines.append(f"* **{lib}: skipped** — {res['skipped']}")
        lines += ["| library | factor (s) | scores (s) | self_influence (s) | total (s) | ratio total (peer/ours) | "
                  "rel. error vs exact | corr | norm ratio | % peak factor / scores / self | compile (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in wres["rows"]:
            med, fr = r["median_s"], r["fraction_of_peak"]
            comp = r["compile_s"]
            lines.append(
                f"| {r['library']} | " + " | ".join(ib.fmt_s(med.get(k)) for k in STAGES) + " | "
                + (f"{r['ratio_vs_jaxunlearn']['total']:.2f}" if "ratio_vs_jaxunlearn" in r else "–")
                + f" | {r['errors']['scores']:.3f} | {r['errors']['corr']:.3f} | {r['errors']['norm_ratio']:.2f} | "
                + " / ".join(f"{100 * fr[k]:.1f}" if k in fr else "–" for k in STAGES[:3])
                + f" | {ib.fmt_s(sum(comp.values())) if comp else '–'} |")
        for r in wres["rows"]:
            if r["check"]:
                lines.append(f"\n{r['library']} port check: {r['check']}")
        lines.append("")
    lines += ["Peer virtualenv: " + results.get("peer_versions", ""), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="jaxunlearn EK-FAC vs kronfluence")
    ap.add_argument("--workloads", default="B,R")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--peers", default="kronfluence", help="'kronfluence' or '' (ours only)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--jax-methods", default="ekfac,ekfac_exact",
                    help="jaxunlearn rows: 'ekfac' (sampled labels, kronfluence's setting) and/or "
                         "'ekfac_exact' (fisher='exact')")
    args = ap.parse_args(argv)
    out = Path(args.out or ib.ROOT / "runs" / ("ekfac_bench_quick" if args.quick else "ekfac_bench"))
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python -m experiments.benchmarks.ekfac_bench"] + (argv or sys.argv[1:])),
               "machine": ib.machine_info(), "repeats": args.repeats, "workloads": {}}
    results["gemm"] = ib.gemm_gflops()
    py = ib.PEERS_DIR / "kronfluence" / "bin" / "python"
    if py.exists():
        import subprocess
        fr = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
        results["peer_versions"] = ", ".join(ln for ln in fr.splitlines()
                                             if ln.lower().split("==")[0] in ("torch", "kronfluence", "numpy"))
    for w in args.workloads.split(","):
        path = ib.ensure_data(w, args.quick, Path(args.data_dir) if args.data_dir else out / "data", False)
        data = pc.load(str(path))
        libs = {}
        for lib, venv, script in RUNNERS:
            if lib != "jaxunlearn" and lib not in args.peers.split(","):
                continue
            methods = args.jax_methods if lib == "jaxunlearn" else "ekfac"
            libs[lib] = ib.run_runner(lib, venv, script, methods, w, path, args.repeats, out, args.timeout)
        info = json.loads(str(data["info"]))
        results["workloads"][w] = {"data": str(path), "data_info": info, "libraries": libs,
                                   "rows": analyse(w, data, libs, results["gemm"]["peak_float32"])}
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["gemm_end"] = ib.gemm_gflops()
    results["machine"]["loadavg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    rep = report_md(results)
    (out / "report.md").write_text(rep)
    print(rep)


if __name__ == "__main__":
    main()
