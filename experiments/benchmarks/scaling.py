"""Scaling: 8-device equivalence of every method and influence stage; ResNet-18 epoch throughput.

    python -m experiments.benchmarks.scaling --preset quick --out DIR

Writes ``DIR/results.json`` and ``DIR/report.md``:

* ``"equivalence"``: one row per unlearning method (training, retraining and De Min's reweighted
  retraining included), per evaluation statistic (accuracy, confusion counts, fairness-gap
  statistics, FGSM / PGD) and per influence stage (per-sample gradients, HVP, CG solve,
  last-layer scores): ``{"name", "devices": 8, "max_abs_diff", "max_rel_diff"}``, the difference
  between the run through :func:`jaxunlearn.loop.run` (or the jitted stage) on one device and on an
  8-device data mesh (:func:`jaxunlearn.sharding.data_mesh`). ``max_rel_diff`` is, over the leaves,
  ``max |a - b| / max |b|`` (per leaf); the tests (``tests/test_scaling.py``) require it <= 1e-4.
* ``"throughput"``: one epoch of ResNet-18 training (``jaxunlearn.models.resnet18``, CIFAR stem,
  32x32x3 synthetic data, SGD with momentum, through ``loop.run``) on 1 device without a mesh and
  on data meshes of 2, 4 and 8 devices (``full`` also 1): ``{"devices", "mesh", "samples_per_s", "seconds",
  "overhead"}``, ``overhead`` = seconds / seconds of the run without a mesh. Simulated CPU devices
  share the machine's cores, so on a CPU this is not a scaling curve: above 1 is the cost of
  sharding, below 1 means one XLA:CPU device left cores idle that concurrent shards use. A GPU
  (if JAX sees one) adds a row; a PyTorch epoch of the same network on the same data
  (``peer_torch_resnet.py``) is timed when an interpreter with torch is found (this one,
  ``--torch_python``, or ``.peers/torch``), else skipped with the reason in the JSON.

The simulated devices are created here: this module sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts when run as a script.
Presets: ``quick`` (ResNet-18 width 8 -- an eighth of the paper's channels, for the CPU -- 128
samples, batch 32: a few minutes on 2 CPU cores) and ``full`` (width 64, the paper's, 2048
samples, batch 256).
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count"
if __name__ == "__main__" and _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxunlearn import attacks, evaluation, loop, losses, metrics, models, sharding, weights  # noqa: E402
from jaxunlearn import methods as M  # noqa: E402

PRESETS = {
    "quick": dict(width=8, num_samples=128, batch_size=32, repeats=1, device_counts=(2, 4, 8)),
    "full": dict(width=64, num_samples=2048, batch_size=256, repeats=3, device_counts=(1, 2, 4, 8)),
}
REL_TOL = 1e-4   # the documented equivalence tolerance (float32)

# ----------------------------------------------------------------------------- the tiny problem

N, D, K, S = 48, 5, 3, 2        # samples, features, classes, sensitive values
FORGET_ROWS = np.arange(12)     # D_f: 12 of the 48 samples
BATCH, FORGET_BATCH, EPOCHS = 16, 8, 2   # multiples of 8: the same shapes on 1 and 8 devices


class TinyBN(nn.Module):
    """Dense (no bias, as before every BatchNorm of a ResNet) -> BatchNorm -> relu -> head.

    BatchNorm's batch statistics are the one cross-example reduction of the forward pass, so every
    method also checks them on a mesh. (A bias before BatchNorm would be a null direction of the
    loss whose gradient is float noise, which Adam and L1's sign() amplify into differences of
    the size of a step.)"""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        m = None if mask is None or not train else mask[:, None]
        h = nn.Dense(8, use_bias=False, name="dense")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h, mask=m))
        return nn.Dense(K, name="head")(h), h


MODEL = models.from_linen(TinyBN(), (D,), K, uses_mask=True)
APPLY = MODEL.apply


class Case(NamedTuple):
    """One method run: ``loop.run(method, variables, sets, **kwargs)``."""

    method: M.Method
    variables: Any
    sets: dict
    kwargs: dict


@functools.lru_cache(maxsize=None)
def problem() -> dict:
    """The data, variables and sets every method case shares (numpy; built once)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = ((x @ rng.normal(size=(D, K))).argmax(1)).astype(np.int32)
    group = rng.integers(0, S, N).astype(np.int32)
    train = {"x": x, "y": y, "group": group}
    v0 = jax.tree.map(np.asarray, MODEL.init(jax.random.key(0), x[:1]))
    # theta_0 with BatchNorm statistics and scales that are not the initial 0 / 1
    bs, bp = v0["batch_stats"]["bn"], v0["params"]["bn"]
    bs["mean"] = rng.normal(size=bs["mean"].shape).astype(np.float32) * 0.3
    bs["var"] = rng.uniform(0.5, 2.0, bs["var"].shape).astype(np.float32)
    bp["scale"] = rng.uniform(0.5, 1.5, bp["scale"].shape).astype(np.float32)
    bp["bias"] = rng.normal(size=bp["bias"].shape).astype(np.float32) * 0.1
    eps = weights.removal_eps(N, FORGET_ROWS)
    return {"train": train, "v0": v0, "eps": eps, "sets": weights.unlearning_sets(train, eps)}


def _head_inverse_hvp(v0, train, l2):
    """IF's ``inverse_hvp`` on the head: the dense Hessian of the mean loss over the head's
    parameters (eval-mode features), Cholesky-factored once; the factor is an operand."""
    params, state = v0["params"], {k: v for k, v in v0.items() if k != "params"}
    feats = APPLY(v0, train["x"])[1]["features"]
    x_aug = jnp.concatenate([feats, jnp.ones((N, 1))], 1)

    def obj(flat):
        W = flat.reshape(x_aug.shape[1], K)
        return jnp.mean(losses.cross_entropy(x_aug @ W, train["y"])) + 0.5 * l2 * jnp.sum(W * W)

    from jaxunlearn.influence import last_layer
    W = last_layer.head_to_matrix(params["head"])
    chol = jnp.linalg.cholesky(jax.hessian(obj)(W.reshape(-1)))
    del state

    def inverse_hvp(v, chol):
        g = last_layer.head_to_matrix(v["head"]).reshape(-1)
        s = jax.scipy.linalg.cho_solve((chol, True), g).reshape(W.shape)
        return {**v, "head": last_layer.matrix_to_head(s, fit_intercept=True)}

    return inverse_hvp, chol


@functools.lru_cache(maxsize=None)
def method_cases() -> dict[str, Case]:
    """Every method of :mod:`jaxunlearn.methods` on :func:`problem` (hyperparameters small and
    fixed; data-dependent inputs -- saliency mask, Fisher diagonal, head Hessian -- from one device)."""
    p = problem()
    train, v0, sets = p["train"], p["v0"], p["sets"]
    sgd = optax.sgd(0.05)
    head = models.last_k_mask(v0["params"], 1)
    fresh = jax.tree.map(np.asarray, MODEL.init(jax.random.key(5), train["x"][:1]))
    teacher = jax.tree.map(np.asarray, MODEL.init(jax.random.key(6), train["x"][:1]))
    kw = dict(epochs=EPOCHS, batch_size=BATCH, batch_sizes={"forget": FORGET_BATCH})
    forget = sets["forget"]
    retain = {k: v for k, v in sets["retain"].items()}
    mask = M.saliency_mask(APPLY, v0, forget, threshold=0.5, batch_size=BATCH)
    fisher = M.fisher_diagonal(APPLY, v0, retain, batch_size=BATCH)
    newton = M.retain_gradient(APPLY, v0, retain, l2=1e-3, batch_size=BATCH)
    inverse_hvp, chol = _head_inverse_hvp(v0, train, l2=1e-2)
    group_w = weights.group_weights(train["y"], train["group"], p["eps"] == 0, num_sensitive=S)
    cases = {
        "train": Case(M.train(APPLY, optax.sgd(0.1, momentum=0.9), l2=1e-3), v0, {"train": train},
                      dict(epochs=EPOCHS, batch_size=BATCH)),
        "retrain": Case(M.retrain(APPLY, optax.adam(1e-2), l2=1e-3), fresh, sets, kw),
        "retrain_reweighted": Case(M.retrain(APPLY, optax.adam(1e-2), l2=1e-3), fresh, sets,
                                   {**kw, "sampling": group_w}),
        "finetune": Case(M.finetune(APPLY, optimizer=sgd), v0, sets, kw),
        "cf_k": Case(M.cf_k(APPLY, head, optimizer=sgd), v0, sets, kw),
        "eu_k": Case(M.eu_k(APPLY, fresh, head, optimizer=sgd), v0, sets, kw),
        "gradient_ascent": Case(M.gradient_ascent(APPLY, optimizer=sgd), v0, sets, kw),
        "neggrad_plus": Case(M.neggrad_plus(APPLY, alpha=0.9, optimizer=optax.adam(1e-2)), v0, sets, kw),
        "random_labels": Case(M.random_labels(APPLY, optimizer=sgd), v0, sets, kw),
        "salun": Case(M.salun(APPLY, mask, optimizer=sgd), v0, sets, kw),
        "l1_sparse": Case(M.l1_sparse(APPLY, epochs=EPOCHS, alpha=1e-2, optimizer=sgd), v0, sets, kw),
        "boundary_shrink": Case(M.boundary_shrink(APPLY, eps=0.5, input_range=(-5.0, 5.0),
                                                  optimizer=sgd), v0, sets, kw),
        "scrub": Case(M.scrub(APPLY, alpha=0.5, gamma=0.9, temperature=2.0, max_epochs=1,
                              optimizer=sgd), v0, sets, kw),
        "bad_teacher": Case(M.bad_teacher(APPLY, teacher, temperature=1.5, optimizer=sgd), v0, sets, kw),
        "fisher_forgetting": Case(M.fisher_forgetting(fisher, alpha=1e-6, newton_grad=newton,
                                                      damping=1e-2), v0, sets, {}),
        "ntk_forgetting": Case(M.ntk_forgetting(APPLY, weight_decay=0.1, chunk_size=16), v0, sets, {}),
        "influence_unlearning": Case(M.influence_unlearning(APPLY, inverse_hvp, num_train=N,
                                                            operands=chol, trainable=head),
                                     v0, sets, {}),
        "miu": Case(miu_method(train), v0, sets, kw),
        "finetune+fairness_gap_penalty": Case(
            M.with_fairness_gap_penalty(M.finetune(APPLY, optimizer=sgd), APPLY, strength=1.0,
                                        num_classes=K, optimizer=optax.sgd(0.01)), v0, sets, kw),
    }
    return cases


def miu_method(train: dict, *, tune_sharding=None):
    """The MIU case's method (``tune_sharding``: split its estimator tuning over a mesh)."""
    return M.miu(APPLY, train, num_classes=K, num_sensitive=S, key=jax.random.key(3),
                 lambda_mi=1.0, forget_epochs=1, tune_steps_first=3, tune_steps_epoch=1,
                 tune_batch_size=16, mine_hidden=8, optimizer=optax.sgd(0.05),
                 tune_sharding=tune_sharding)


def run_case(case: Case, mesh=None, *, program=None, key=None):
    """``(variables, history)`` of one case on one device (``mesh=None``) or on ``mesh``."""
    key = jax.random.key(11) if key is None else key
    method = program if program is not None else case.method
    out, _, hist = loop.run(method, case.variables, case.sets, key=key, mesh=mesh, progress=False,
                            **case.kwargs)
    return jax.tree.map(np.asarray, out), hist


def tree_diff(a, b) -> tuple[float, float]:
    """``(max |a - b|, max over leaves of max |a - b| / max |b|)`` of two pytrees (float64)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"trees differ in structure: {len(la)} vs {len(lb)} leaves")
    abs_d, rel_d = 0.0, 0.0
    for u, v in zip(la, lb):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u.shape != v.shape:
            raise ValueError(f"leaf shapes differ: {u.shape} vs {v.shape}")
        if u.size == 0:
            continue
        d = float(np.max(np.abs(u - v)))
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / max(float(np.max(np.abs(v))), 1e-30) if d else 0.0)
    return abs_d, rel_d


# ----------------------------------------------------------------------------- evaluation stages

def evaluation_outputs(variables, mesh=None) -> dict:
    """Accuracy + confusion (one evaluator), fairness-gap statistics, FGSM and PGD adversarial
    examples and accuracies, on 45 samples (padded to the batch / mesh size)."""
    p = problem()
    split = {k: v[:45] for k, v in p["train"].items()}
    ev = evaluation.evaluator(APPLY, {"acc": evaluation.accuracy(),
                                      "conf": evaluation.confusion(num_classes=K, num_groups=S)},
                              batch_size=BATCH, mesh=mesh)
    res = ev(variables, split)
    gap = metrics.fairness_gap_stats(APPLY, variables, split, num_classes=K, batch_size=BATCH, mesh=mesh)
    out = {"accuracy": {"accuracy": res["acc"]["accuracy"], "loss": res["acc"]["loss"]},
           "confusion": res["conf"], "fairness_gap_stats": gap}
    kw = dict(eps=0.3, input_range=(-5.0, 5.0), batch_size=BATCH, mesh=mesh)
    fgsm = attacks.adversarial_evaluator(APPLY, attack="fgsm", **kw)
    pgd = attacks.adversarial_evaluator(APPLY, attack="pgd", steps=3, random_start=True, **kw)
    out["fgsm"] = fgsm(variables, split)["accuracy"]
    out["pgd"] = pgd(variables, split, key=jax.random.key(4))["accuracy"]
    xb = {"x": split["x"][:40], "y": split["y"][:40]}
    if mesh is not None:
        xb = sharding.shard_batch(xb, mesh)
        variables = sharding.replicate(variables, mesh)
    out["pgd_examples"] = _pgd_examples(variables, xb["x"], xb["y"], jax.random.key(4))
    return jax.tree.map(np.asarray, out)


@jax.jit
def _pgd_examples(variables, x, y, key):
    return attacks.pgd(APPLY, variables, x, y, eps=0.3, step_size=0.1, steps=3,
                       input_range=(-5.0, 5.0), key=key, random_start=True)


# ----------------------------------------------------------------------------- influence stages

def influence_stages(mesh=None) -> dict:
    """The influence stages on a 64-sample MLP problem, jitted, the batch split over ``mesh``
    (``sharding.shard_batch``) or on one device: per-sample gradients, an HVP (4 columns), a CG
    solve and last-layer influence scores (closed-form head Hessian, exact solve)."""
    from jaxunlearn.influence import grads, hvp as hvp_lib, last_layer, solvers

    n, d, k, l2 = 64, 6, 3, 1e-2
    model = models.mlp(d, k, hidden=(8,))
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(n, d)).astype(np.float32), "y": rng.integers(0, k, n).astype(np.int32),
             "weight": np.where(rng.random(n) < 0.2, 0.0, 1.0).astype(np.float32)}
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, d)))["params"]
    V = np.random.default_rng(2).normal(size=(grads.flatten_params(params)[0].size, 4)).astype(np.float32)

    def loss_fn(p, b):
        return losses.cross_entropy(model.apply({"params": p}, b["x"])[0], b["y"])

    @jax.jit
    def stages(params, batch, V):
        obj = grads.make_mean_objective(loss_fn, l2=l2)
        matvec = hvp_lib.make_flat_hvp(obj, params, batch)
        feats = model.apply({"params": params}, batch["x"])[1]["features"]
        X = last_layer.design(feats, fit_intercept=True)
        W = last_layer.head_to_matrix(params["head"])
        H = last_layer.hessian(W, X, batch["weight"], l2=l2)
        g_val = last_layer.gradient(W, X[:16], batch["y"][:16], l2=0.0).reshape(-1)
        scores = last_layer.grads_dot(W, X, batch["y"], jnp.linalg.solve(H, g_val)) / n
        return {"per_sample_grads": grads.per_sample_grads_flat(loss_fn, params, batch),
                "hvp": matvec(V),
                "cg_solve": solvers.solve_cg(matvec, V, damping=0.5, tol=1e-6).x,
                "last_layer_scores": scores}

    if mesh is None:
        dev = jax.devices()[0]
        out = stages(jax.device_put(params, dev), jax.device_put(batch, dev), V)
    else:
        out = stages(sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh),
                     sharding.replicate(V, mesh))
    return jax.tree.map(np.asarray, out)


# ----------------------------------------------------------------------------- equivalence table

def equivalence(mesh, *, names=None) -> list[dict]:
    """The equivalence rows: every method, the evaluation statistics and the influence stages."""
    rows = []

    def row(name, a, b):
        abs_d, rel_d = tree_diff(b, a)
        rows.append({"name": name, "devices": int(mesh.devices.size), "max_abs_diff": abs_d,
                     "max_rel_diff": rel_d, "ok": rel_d <= REL_TOL})

    for name, case in method_cases().items():
        if names is not None and name not in names:
            continue
        one, _ = run_case(case)
        many, _ = run_case(case, mesh)
        row(name, one, many)
    v0 = problem()["v0"]
    e1, e8 = evaluation_outputs(v0), evaluation_outputs(v0, mesh)
    for name in e1:
        row(f"evaluation/{name}", e1[name], e8[name])
    i1, i8 = influence_stages(), influence_stages(mesh)
    for name in i1:
        row(f"influence/{name}", i1[name], i8[name])
    return rows


# ----------------------------------------------------------------------------- throughput

def throughput(*, width: int, num_samples: int, batch_size: int, repeats: int,
               device_counts=(1, 2, 4, 8), log=print) -> list[dict]:
    """ResNet-18 epochs through ``loop.run`` without a mesh and on data meshes (module docstring)."""
    model = models.resnet18((32, 32, 3), 10, width=width, stem="cifar")
    rng = np.random.default_rng(0)
    split = {"x": rng.random((num_samples, 32, 32, 3), dtype=np.float32),
             "y": rng.integers(0, 10, num_samples).astype(np.int32)}
    v0 = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), split["x"][:1]))
    trainer = M.train(model.apply, optax.sgd(0.05, momentum=0.9), l2=5e-4)
    cpu = [d for d in jax.devices() if d.platform == "cpu"] or jax.devices("cpu")
    configs = [("none", [cpu[0]])] + [("data", cpu[:c]) for c in device_counts if c <= len(cpu)]
    accel = [d for d in jax.devices() if d.platform != "cpu"]
    if accel:
        configs += [("none", [accel[0]])]
    rows, base = [], None
    for kind, devs in configs:
        mesh = sharding.data_mesh(devs) if kind == "data" else None
        with jax.default_device(devs[0]):
            program = loop.compile(trainer, mesh=mesh)
            t0 = time.perf_counter()
            loop.run(program, v0, {"train": split}, epochs=1, batch_size=batch_size,
                     key=jax.random.key(0), progress=False)       # compile + warm-up
            compile_s = time.perf_counter() - t0
            secs = []
            for r in range(repeats):
                _, _, hist = loop.run(program, v0, {"train": split}, epochs=1, batch_size=batch_size,
                                      key=jax.random.key(r + 1), progress=False)
                secs.append(hist[0]["seconds"])
        sec = float(np.median(secs))
        if base is None:
            base = sec
        row = {"devices": len(devs), "mesh": kind, "platform": devs[0].platform,
               "device_kind": devs[0].device_kind, "samples_per_s": num_samples / sec,
               "seconds": sec, "first_epoch_seconds": compile_s,
               "overhead": sec / base if devs[0].platform == "cpu" else None}
        rows.append(row)
        log(f"throughput {kind} x{len(devs)} ({devs[0].platform}): {row['samples_per_s']:.1f} samples/s")
    return rows


def _torch_python(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    peer = os.path.join(root, ".peers", "torch", "bin", "python")
    return peer if os.path.exists(peer) else None


def torch_reference(*, width: int, num_samples: int, batch_size: int, repeats: int,
                    torch_python: str | None, **_) -> dict:
    """The PyTorch epoch (``peer_torch_resnet.py``) in a subprocess, or why it was skipped."""
    exe = _torch_python(torch_python)
    if exe is None:
        return {"skipped": "no interpreter with torch (pass --torch_python or create .peers/torch)"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch_resnet.py")
    cmd = [exe, script, "--width", str(width), "--num_samples", str(num_samples),
           "--batch_size", str(batch_size), "--repeats", str(repeats)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return {"skipped": f"torch reference failed: {e}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def report_md(res: dict) -> str:
    lines = [f"# Scaling ({res['preset']} preset)", "",
             f"{res['device_count']} {res['platform']} devices ({res['host']}); wall time "
             f"{res['wall_seconds']:.0f} s.", "",
             f"## Equivalence: 1 device vs {res['equivalence'][0]['devices']}-device data mesh",
             "", f"Tolerance: max |a - b| / max |b| per leaf <= {REL_TOL:g} (float32).", "",
             "| name | devices | max abs diff | max rel diff | ok |", "|---|---|---|---|---|"]
    for r in res["equivalence"]:
        lines.append(f"| {r['name']} | {r['devices']} | {r['max_abs_diff']:.2e} | "
                     f"{r['max_rel_diff']:.2e} | {'yes' if r['ok'] else '**no**'} |")
    t = res["throughput_config"]
    lines += ["", f"## Throughput: ResNet-18 (width {t['width']}, CIFAR stem), one epoch of "
              f"{t['num_samples']} synthetic 32x32x3 samples, batch {t['batch_size']}, median of "
              f"{t['repeats']}", "",
              "`overhead` = epoch seconds / those of the run without a mesh. Simulated CPU devices "
              "share one machine's cores, so this is not a scaling curve: values above 1 are the "
              "cost of sharding; values below 1 mean one XLA:CPU device left cores idle that the "
              "concurrently running device shards use.", "",
              "| devices | mesh | platform | samples/s | epoch s | first epoch s (compile) | overhead |",
              "|---|---|---|---|---|---|---|"]
    for r in res["throughput"]:
        ov = "" if r["overhead"] is None else f"{r['overhead']:.2f}x"
        lines.append(f"| {r['devices']} | {r['mesh']} | {r['platform']} | {r['samples_per_s']:.1f} | "
                     f"{r['seconds']:.2f} | {r['first_epoch_seconds']:.1f} | {ov} |")
    tr = res["torch_reference"]
    if "skipped" in tr:
        lines += ["", f"PyTorch reference: skipped ({tr['skipped']})."]
    else:
        jax1 = res["throughput"][0]["samples_per_s"]
        lines += ["", f"PyTorch reference ({tr['torch']}, {tr['threads']} threads, same network and "
                  f"data): {tr['samples_per_s']:.1f} samples/s; jaxunlearn 1 device / torch = "
                  f"{jax1 / tr['samples_per_s']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", required=True, help="output directory (results.json, report.md)")
    ap.add_argument("--torch_python", default=None, help="python with torch for the reference epoch")
    ap.add_argument("--skip_equivalence", action="store_true")
    ap.add_argument("--skip_throughput", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    cpu = jax.devices("cpu")
    print(f"devices: {jax.device_count()} ({jax.default_backend()}), cpu devices: {len(cpu)}", flush=True)
    res = {"preset": args.preset, "device_count": jax.device_count(), "platform": jax.default_backend(),
           "host": f"{platform.node()}, {os.cpu_count()} cores", "jax": jax.__version__,
           "equivalence_tolerance": {"max_rel_diff": REL_TOL}, "equivalence": [], "throughput": []}
    if not args.skip_equivalence:
        if len(cpu) < 8:
            raise SystemExit(f"the equivalence rows need 8 CPU devices, JAX has {len(cpu)}: set "
                             f"XLA_FLAGS={_FLAG}=8 before JAX starts")
        with jax.default_device(cpu[0]):
            res["equivalence"] = equivalence(sharding.data_mesh(cpu[:8]))
        for r in res["equivalence"]:
            print(f"{r['name']:36s} max abs {r['max_abs_diff']:.2e} rel {r['max_rel_diff']:.2e}", flush=True)
    res["throughput_config"] = dict(cfg, device_counts=list(cfg["device_counts"]))
    if not args.skip_throughput:
        res["throughput"] = throughput(**cfg, log=lambda s: print(s, flush=True))
    res["torch_reference"] = (torch_reference(**cfg, torch_python=args.torch_python)
                              if not args.skip_throughput else {"skipped": "--skip_throughput"})
    res["wall_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    if res["equivalence"] and res["throughput"]:
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(report_md(res))
    print(f"wrote {args.out}/results.json ({res['wall_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
