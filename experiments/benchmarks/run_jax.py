"""Benchmark runner for jaxunlearn.influence (the project's venv), same interface as the peer runners.

Workload A (last-layer closed form, :mod:`jaxunlearn.influence.last_layer`):
  * ``direct``: stage by stage from the public building blocks, each stage one jitted call --
    measurement gradients (:func:`scores.measurement_gradients` with the library's
    ``utility`` / ``demographic_parity(aggregate="signed", classes=(1,))`` / ``utility`` on attack points
    measurements on :func:`last_layer.head_apply`), the structured Hessian (:func:`last_layer.hessian`),
    Cholesky, ``cho_solve``, scores by :func:`last_layer.grads_dot` (no n x p matrix), exact
    self-influence (:func:`last_layer.self_influence`).
  * ``cg``: the same with :class:`solvers.CG` on the structured block HVP (:func:`last_layer.hvp`,
    the three measurements as one [p, 3] product) and the problem's Kronecker preconditioner.
  * ``direct_api`` / ``cg_api``: the one-call user path, :func:`scores.influence_scores` (with
    ``with_self_influence=True`` for direct) on :func:`last_layer.make_problem`; its first call
    (compilation) is excluded from the medians and reported as compile time.
  ``per_sample_grads`` (materialising G [n, p], :func:`last_layer.per_sample_grads`) is timed for
  comparison only: the pipeline never forms G.
Workload B (generic autodiff path on the Flax MLP of :mod:`jaxunlearn.models`):
  * ``cg``: :func:`grads.per_sample_grads_flat` for queries and training chunks,
    :func:`hvp.make_flat_hvp` + :func:`solvers.solve_cg` on the reference query rows, scores G V.
  * ``arnoldi``: :func:`solvers.arnoldi` (rank 50, 101 Krylov steps) + :func:`solvers.solve_lowrank`
    (``complement="ignore"``, as pyDVL's default) for all queries.

Compilation: every staged function is compiled ahead of time (``jit(...).lower(...).compile()``),
its compile seconds reported under ``compile``; the timed repeats run compiled code only, each
stage ended by ``block_until_ready``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.scipy.linalg import cho_solve  # noqa: E402

import jaxunlearn  # noqa: E402
from jaxunlearn.influence import grads as ig  # noqa: E402
from jaxunlearn.influence import hvp as ih  # noqa: E402
from jaxunlearn.influence import last_layer as ll  # noqa: E402
from jaxunlearn.influence import measurements as ms  # noqa: E402
from jaxunlearn.influence import scores as sc  # noqa: E402
from jaxunlearn.influence import solvers  # noqa: E402

TRAIN_CHUNK_B = 1_000


class Compiled:
    """AOT-compile ``jax.jit(fn, static_argnames)`` for given arguments; remembers compile seconds."""

    def __init__(self, compile_times: dict, name: str, fn, *args, **static):
        t0 = time.perf_counter()
        self.exe = jax.jit(lambda *a: fn(*a, **static)).lower(*args).compile()
        compile_times[name] = compile_times.get(name, 0.0) + time.perf_counter() - t0

    def __call__(self, *args):
        return self.exe(*args)


def timer():
    return pc.Timer(sync=jax.block_until_ready)


def run_repeats(fn, repeats, extra=pc.EXTRA_STAGES):
    stages: dict = {}
    out = None
    for _ in range(max(repeats, 1)):
        tm = timer()
        t0 = time.perf_counter()
        out = fn(tm)
        jax.block_until_ready(out)
        total = time.perf_counter() - t0
        for k, v in tm.times.items():
            stages.setdefault(k, []).append(v)
        stages.setdefault("total", []).append(total - sum(tm.times.get(k, 0.0) for k in extra))
    return stages, out


# ----------------------------------------------------------------------------------- workload A
def run_a(data, methods, repeats):
    W = jnp.asarray(data["W"].T)                     # head kernel [d, K] (flax layout)
    X, y = jnp.asarray(data["X"]), jnp.asarray(data["y"])
    n = X.shape[0]
    l2 = float(data["l2"])
    Xv, yv, sv = jnp.asarray(data["Xv"]), jnp.asarray(data["yv"]), jnp.asarray(data["sv"])
    Xadv = jnp.asarray(data["Xadv"])
    head = {"kernel": W}
    problem = ll.make_problem(head, {"x": X, "y": y}, l2=l2)
    measures = {
        "util": (ms.utility(ll.head_apply), {"x": Xv, "y": yv}),
        "dp": (ms.demographic_parity(ll.head_apply, num_groups=2, aggregate="signed", classes=(1,)),
               {"x": Xv, "y": yv, "group": sv}),
        "rob": (ms.utility(ll.head_apply), {"x": Xadv, "y": yv}),   # robustness: utility on attack points
    }
    names = list(measures)
    comp: dict = {}
    results, scores = {}, {}

    def measure_grads():
        g, _ = sc.measurement_gradients(problem, measures)
        return jnp.stack([g[k] for k in names], axis=1)                  # [p, 3]

    t0 = time.perf_counter()
    B0 = jax.block_until_ready(measure_grads())                          # compiles the measurements
    comp["measure_grads"] = time.perf_counter() - t0
    psg = Compiled(comp, "per_sample_grads", ll.per_sample_grads, W, X, y)
    hess = Compiled(comp, "hessian", lambda W, X: ll.hessian(W, X, l2=l2), W, X)
    H0 = hess(W, X)
    chol = Compiled(comp, "factor", jnp.linalg.cholesky, H0)
    L0 = chol(H0)
    solve = Compiled(comp, "solve", lambda L, B: cho_solve((L, True), B), L0, B0)
    V0 = solve(L0, B0)
    score = Compiled(comp, "scores", lambda W, X, y, V: ll.grads_dot(W, X, y, V).T / n, W, X, y, V0)
    selfi = Compiled(comp, "self_influence",
                     lambda W, X, y, L: ll.self_influence(W, X, y, l2=l2, cholesky=L), W, X, y, L0)
    hvp1 = Compiled(comp, "hvp", lambda W, X, v: ll.hvp(W, X, v, l2=l2), W, X, B0[:, 0])

    def cg_fn(data, B):
        # all three columns as one [p, 3] block HVP per iteration (two GEMMs), preconditioned by
        # the closed-form problem's Kronecker factorisation (set-up included in the stage)
        op = solvers.LinearOperator(lambda V: problem.hvp(data, V),
                                    preconditioner=lambda damping: problem.preconditioner(data, damping))
        return solvers.CG(tol=pc.CG_RTOL, maxiter=pc.CG_MAXITER, raise_on_fail=False).solve(op, B)

    comp_cg = dict(comp)
    cg = Compiled(comp_cg, "solve", cg_fn, problem.data, B0)

    def direct(tm):
        with tm.stage("per_sample_grads") as box:
            box.append(psg(W, X, y))
        with tm.stage("measure_grads") as box:
            B = measure_grads()
            box.append(B)
        with tm.stage("hessian") as box:
            H = hess(W, X)
            box.append(H)
        with tm.stage("factor") as box:
            L = chol(H)
            box.append(L)
        with tm.stage("solve") as box:
            V = solve(L, B)
            box.append(V)
        with tm.stage("scores") as box:
            S = score(W, X, y, V)
            box.append(S)
        with tm.stage("self_influence") as box:
            s = selfi(W, X, y, L)
            box.append(s)
        return S, s

    def cg_method(tm):
        with tm.stage("per_sample_grads") as box:
            box.append(psg(W, X, y))
        with tm.stage("measure_grads") as box:
            B = measure_grads()
            box.append(B)
        with tm.stage("hvp") as box:
            box.append(hvp1(W, X, B[:, 0]))
        with tm.stage("solve") as box:
            res = cg(problem.data, B)
            box.append(res.x)
        with tm.stage("scores") as box:
            S = score(W, X, y, res.x)
            box.append(S)
        return S, res

    def api(solver):
        obj = solvers.Direct() if solver == "direct" else solvers.CG(tol=pc.CG_RTOL, maxiter=pc.CG_MAXITER)

        def fn(tm):  # direct: scores and self-influence from one Hessian and one factorisation
            with tm.stage("scores") as box:
                r = sc.influence_scores(problem, measures, solver=obj,
                                        with_self_influence=solver == "direct")
                S = jnp.stack([r.scores[k] for k in names])
                box.append(S)
            return S, r.self_influence, r
        return fn

    extra = ("hvp", "per_sample_grads")
    for name in methods:
        if name == "direct":
            stages, (S, s) = run_repeats(direct, repeats, extra)
            results[name] = {"stages": stages, "compile": {k: comp[k] for k in comp if k != "hvp"}}
            scores["direct__scores"], scores["direct__self"] = np.asarray(S), np.asarray(s)
        elif name == "cg":
            stages, (S, res) = run_repeats(cg_method, repeats, extra)
            results[name] = {"stages": stages, "cg_iterations": int(res.iterations),
                             "cg_rel_residual": float(jnp.max(res.residual)),
                             "compile": {k: comp_cg[k] for k in ("measure_grads", "hvp", "solve", "scores",
                                                                 "per_sample_grads")}}
            scores["cg__scores"] = np.asarray(S)
        elif name in ("direct_api", "cg_api"):
            solver = name.split("_")[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                first, _ = run_repeats(api(solver), 1)
                stages, (S, s, r) = run_repeats(api(solver), repeats)
            med = float(np.median(stages["total"]))
            results[name] = {"stages": stages, "first_call_s": first["total"][0],
                             "compile": {"total": max(first["total"][0] - med, 0.0)},
                             "grad_norm": float(r.grad_norm)}
            if solver == "cg":
                results[name]["cg_iterations"] = int(r.solve.iterations)
            scores[f"{name}__scores"] = np.asarray(S)
            if s is not None:
                scores[f"{name}__self"] = np.asarray(s)
        else:
            raise ValueError(f"unknown method {name!r}; choose direct, cg, direct_api, cg_api")
    return results, scores


# ----------------------------------------------------------------------------------- workload B
def run_b(data, methods, repeats, cg_rows):
    from jaxunlearn.models import mlp

    nl = sum(1 for key in data if key.startswith("W"))
    hidden = tuple(int(data[f"W{i + 1}"].shape[1]) for i in range(nl - 1))
    k = int(data[f"W{nl}"].shape[1])
    model = mlp(int(data["W1"].shape[0]), k, hidden=hidden)
    names = [f"dense_{i}" for i in range(nl - 1)] + ["head"]
    params = {nm: {"kernel": jnp.asarray(data[f"W{i + 1}"]), "bias": jnp.asarray(data[f"b{i + 1}"])}
              for i, nm in enumerate(names)}
    X, y = jnp.asarray(data["X"]), jnp.asarray(data["y"])
    Xq, yq = jnp.asarray(data["Xq"]), jnp.asarray(data["yq"])
    n = X.shape[0]
    l2, damping = float(data["l2"]), float(data["damping"])
    loss_fn = sc.model_loss(model.apply)
    objective = ig.make_mean_objective(loss_fn, l2=l2)
    batch = {"x": X, "y": y}
    flat0, _ = ig.flatten_params(params)
    p = flat0.shape[0]
    comp: dict = {}

    def qgrads(params, xq, yq):
        return ig.per_sample_grads_flat(loss_fn, params, {"x": xq, "y": yq})

    def chunk_scores(params, xc, yc, V):  # V [q, p] -> [q, c]
        G = ig.per_sample_grads_flat(loss_fn, params, {"x": xc, "y": yc})
        return V @ G.T / n

    def psg_chunk(params, xc, yc):
        return ig.per_sample_grads_flat(loss_fn, params, {"x": xc, "y": yc})

    def mm(V, G):
        return V @ G.T / n

    def hvp_one(params, batch, v):
        return ih.make_flat_hvp(objective, params, batch, damping=damping)(v)

    def cg_fn(params, batch, B):
        mv = ih.make_flat_hvp(objective, params, batch)
        return solvers.solve_cg(mv, B, damping=damping, tol=pc.CG_RTOL, maxiter=pc.CG_MAXITER,
                                raise_on_fail=False)

    def arnoldi_fn(params, batch, key):
        mv = ih.make_flat_hvp(objective, params, batch)
        return solvers.arnoldi(mv, p, rank=pc.ARNOLDI_RANK, num_iters=pc.ARNOLDI_KRYLOV, key=key)

    def lowrank_fn(lr, B):
        return solvers.solve_lowrank(lr, B, damping=damping, complement="ignore", raise_on_fail=False).x

    chunks = [(lo, min(lo + TRAIN_CHUNK_B, n)) for lo in range(0, n, TRAIN_CHUNK_B)]
    key = jax.random.key(0)

    def scores_for(tm, psg_c, mm_c, V):  # V [q, p]
        out = []
        for lo, hi in chunks:
            with tm.stage("per_sample_grads") as box:
                G = psg_c(params, X[lo:hi], y[lo:hi])
                box.append(G)
            with tm.stage("scores") as box:
                out.append(mm_c(V, G))
                box.append(out[-1])
        return jnp.concatenate(out, axis=1)

    results, scores = {}, {}
    for name in methods:
        if name == "cg":
            c: dict = {}
            xr, yr = Xq[:cg_rows], yq[:cg_rows]
            qg = Compiled(c, "query_grads", qgrads, params, xr, yr)
            G0 = qg(params, xr, yr)
            hv = Compiled(c, "hvp", hvp_one, params, batch, G0[0])
            cgc = Compiled(c, "solve", cg_fn, params, batch, G0.T)
            psg_c = Compiled(c, "per_sample_grads", psg_chunk, params, X[:TRAIN_CHUNK_B], y[:TRAIN_CHUNK_B])
            mm_c = Compiled(c, "scores", mm, G0, psg_c(params, X[:TRAIN_CHUNK_B], y[:TRAIN_CHUNK_B]))

            def run(tm):
                with tm.stage("query_grads") as box:
                    G = qg(params, xr, yr)
                    box.append(G)
                with tm.stage("hvp") as box:
                    box.append(hv(params, batch, G[0]))
                with tm.stage("solve") as box:
                    res = cgc(params, batch, G.T)
                    box.append(res.x)
                S = scores_for(tm, psg_c, mm_c, res.x.T)
                return S, res

            stages, (S, res) = run_repeats(run, repeats)
            results[name] = {"stages": stages, "compile": c, "cg_iterations": int(res.iterations),
                             "cg_rel_residual": float(jnp.max(res.residual)), "rows": cg_rows}
            scores["cg__scores"] = np.asarray(S)
        elif name == "arnoldi":
            c = {}
            qg = Compiled(c, "query_grads", qgrads, params, Xq, yq)
            G0 = qg(params, Xq, yq)
            ar = Compiled(c, "factor", arnoldi_fn, params, batch, key)
            lr0 = ar(params, batch, key)
            lrs = Compiled(c, "solve", lowrank_fn, lr0, G0.T)
            psg_c = Compiled(c, "per_sample_grads", psg_chunk, params, X[:TRAIN_CHUNK_B], y[:TRAIN_CHUNK_B])
            mm_c = Compiled(c, "scores", mm, G0, psg_c(params, X[:TRAIN_CHUNK_B], y[:TRAIN_CHUNK_B]))

            def run(tm):
                with tm.stage("query_grads") as box:
                    G = qg(params, Xq, yq)
                    box.append(G)
                with tm.stage("factor") as box:
                    lr = ar(params, batch, key)
                    box.append(lr)
                with tm.stage("solve") as box:
                    V = lrs(lr, G.T)
                    box.append(V)
                return scores_for(tm, psg_c, mm_c, V.T)

            stages, S = run_repeats(run, repeats)
            results[name] = {"stages": stages, "compile": c, "rank": pc.ARNOLDI_RANK,
                             "krylov": pc.ARNOLDI_KRYLOV}
            scores["arnoldi__scores"] = np.asarray(S)
        else:
            raise ValueError(f"unknown method {name!r}; choose cg, arnoldi")
    return results, scores


def main():
    args = pc.parse_args()
    data = pc.load(args.data)
    if args.workload == "A":
        results, scores = run_a(data, (args.methods or "direct,cg,direct_api,cg_api").split(","), args.repeats)
    else:
        rows = args.cg_rows or int(len(data["ref_rows"]))
        results, scores = run_b(data, (args.methods or "cg,arnoldi").split(","), args.repeats, rows)
    pc.emit("jaxunlearn", f"{getattr(jaxunlearn, '__version__', 'dev')} (jax {jax.__version__})",
            results, scores, args.scores, devices=str(jax.devices()))


if __name__ == "__main__":
    main()
