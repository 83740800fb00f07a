"""Baseline runner: a straightforward plain-JAX implementation (no jaxunlearn), peer_common interface.

What a JAX user would write without the library. Workload A: ``direct`` = per-sample gradients
``vmap(grad)``, measurement gradients ``grad``, ``jax.hessian`` of the mean loss over data chunks
(10,000 rows), ``jnp.linalg.cholesky``, ``cho_solve``, scores ``G V``, self-influence by a
triangular solve with the n gradients; ``cg`` = ``jax.scipy.sparse.linalg.cg`` (tol = CG_RTOL,
``x0`` passed as an argument: the XLA:CPU zero-tangent bug of DESIGN.md) with a jvp-of-grad HVP,
one column at a time, then ``G V``. Workload B: ``cg`` on the reference query rows, training
gradients in chunks of 1,000. Each stage is one jitted call compiled before the timed repeats.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.scipy.linalg import cho_solve, solve_triangular  # noqa: E402
from jax.scipy.sparse.linalg import cg as jcg  # noqa: E402

CHUNK_A, CHUNK_B = 10_000, 1_000


def _ce(z, y):
    return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]


def _sync(x):
    jax.block_until_ready(x)
    return x


def _time_compile(comp, name, fn, *args):
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    comp[name] = comp.get(name, 0.0) + time.perf_counter() - t0
    return exe


def run_a(data, methods, repeats):
    W = jnp.asarray(data["W"])
    X, y = jnp.asarray(data["X"]), jnp.asarray(data["y"])
    n, (k, d) = X.shape[0], W.shape
    p = k * d
    shift = float(data["hess_shift"])
    meas = [(jnp.asarray(xm), jnp.asarray(ym), jnp.asarray(c), kind) for _, xm, ym, c, kind in
            pc.head_measurement_specs(data)]
    w = W.reshape(-1)

    def ce_one(w, x, yy):
        return _ce(x @ w.reshape(k, d).T, yy)

    def mean_ce(w, x, yy):
        return jnp.mean(_ce(x @ w.reshape(k, d).T, yy))

    def measurement(w, xm, ym, c, kind):
        z = xm @ w.reshape(k, d).T
        return jnp.sum(c * (_ce(z, ym) if kind == "ce" else jax.nn.softmax(z, -1)[:, 1]))

    def psg(w, X, y):
        return jax.vmap(jax.grad(ce_one), in_axes=(None, 0, 0))(w, X, y)

    def mgrads(w, meas_arrays):
        return jnp.stack([jax.grad(measurement)(w, *m, kind) for m, (_, _, _, kind) in zip(meas_arrays, meas)])

    def hessian(w, X, y):
        H = jnp.zeros((p, p), w.dtype)
        for lo in range(0, n, CHUNK_A):
            xc, yc = X[lo:lo + CHUNK_A], y[lo:lo + CHUNK_A]
            H = H + jax.hessian(mean_ce)(w, xc, yc) * (xc.shape[0] / n)
        return H + shift * jnp.eye(p, dtype=w.dtype)

    def hvp(w, X, y, v):
        return jax.jvp(lambda q: jax.grad(mean_ce)(q, X, y), (w,), (v,))[1] + shift * v

    def cg_all(w, X, y, B, X0):
        cols = [jcg(lambda v: hvp(w, X, y, v), B[i], x0=X0[i], tol=pc.CG_RTOL, maxiter=pc.CG_MAXITER)[0]
                for i in range(B.shape[0])]
        return jnp.stack(cols)

    meas_arrays = [m[:3] for m in meas]
    results, scores = {}, {}
    for name in methods:
        comp: dict = {}
        c_psg = _time_compile(comp, "per_sample_grads", psg, w, X, y)
        c_mg = _time_compile(comp, "measure_grads", lambda w_, m_: mgrads(w_, m_), w, meas_arrays)
        G0 = c_psg(w, X, y)
        gm0 = c_mg(w, meas_arrays)
        c_sc = _time_compile(comp, "scores", lambda G, V: (G @ V.T).T / n, G0, gm0)
        if name == "direct":
            c_h = _time_compile(comp, "hessian", hessian, w, X, y)
            H0 = c_h(w, X, y)
            c_f = _time_compile(comp, "factor", jnp.linalg.cholesky, H0)
            L0 = c_f(H0)
            c_s = _time_compile(comp, "solve", lambda L, b: cho_solve((L, True), b.T).T, L0, gm0)
            c_self = _time_compile(comp, "self_influence",
                                   lambda L, G: jnp.sum(solve_triangular(L, G.T, lower=True) ** 2, 0) / n, L0, G0)

            def run(tm):
                with tm.stage("per_sample_grads") as b:
                    G = c_psg(w, X, y); b.append(G)
                with tm.stage("measure_grads") as b:
                    gm = c_mg(w, meas_arrays); b.append(gm)
                with tm.stage("hessian") as b:
                    H = c_h(w, X, y); b.append(H)
                with tm.stage("factor") as b:
                    L = c_f(H); b.append(L)
                with tm.stage("solve") as b:
                    V = c_s(L, gm); b.append(V)
                with tm.stage("scores") as b:
                    S = c_sc(G, V); b.append(S)
                with tm.stage("self_influence") as b:
                    s = c_self(L, G); b.append(s)
                return S, s, {}
        elif name == "cg":
            c_cg = _time_compile(comp, "solve", cg_all, w, X, y, gm0, jnp.zeros_like(gm0))

            def run(tm):
                with tm.stage("per_sample_grads") as b:
                    G = c_psg(w, X, y); b.append(G)
                with tm.stage("measure_grads") as b:
                    gm = c_mg(w, meas_arrays); b.append(gm)
                with tm.stage("solve") as b:
                    V = c_cg(w, X, y, gm, jnp.zeros_like(gm)); b.append(V)
                with tm.stage("scores") as b:
                    S = c_sc(G, V); b.append(S)
                with tm.stage("hvp"):   # residual check: informative, excluded from total
                    res = float(jnp.max(jnp.linalg.norm(jax.vmap(lambda v: hvp(w, X, y, v))(V) - gm, axis=1)
                                        / jnp.linalg.norm(gm, axis=1)))
                return S, None, {"cg_rel_residual": res}
        else:
            raise ValueError(f"unknown method {name!r}; choose direct or cg")
        stages, (S, s, info) = pc.run_repeats(_wrap(run), repeats)
        results[name] = {"stages": stages, "compile": comp, **info}
        scores[f"{name}__scores"] = np.asarray(S)
        if s is not None:
            scores[f"{name}__self"] = np.asarray(s)
    return results, scores


def _wrap(run):
    def f(tm):
        tm.sync = _sync
        return run(tm)
    return f


def run_b(data, methods, repeats, cg_rows):
    if methods != ["cg"]:
        raise ValueError(f"plain JAX runs method 'cg' on workload B, got {methods}")
    nl = sum(1 for key in data if key.startswith("W"))
    params = [(jnp.asarray(data[f"W{i + 1}"]), jnp.asarray(data[f"b{i + 1}"])) for i in range(nl)]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    X, y = jnp.asarray(data["X"]), jnp.asarray(data["y"])
    Xq, yq = jnp.asarray(data["Xq"][:cg_rows]), jnp.asarray(data["yq"][:cg_rows])
    n = X.shape[0]
    shift = float(data["hess_shift"])

    def f_apply(f, x):
        h = x
        for i, (wi, bi) in enumerate(unravel(f)):
            h = h @ wi + bi
            h = jnp.maximum(h, 0) if i < nl - 1 else h
        return h

    one = lambda f, x, yy: _ce(f_apply(f, x[None])[0], yy)
    mean_ce = lambda f, x, yy: jnp.mean(_ce(f_apply(f, x), yy))
    psg = lambda f, x, yy: jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(f, x, yy)

    def hvp(f, v):
        return jax.jvp(lambda q: jax.grad(mean_ce)(q, X, y), (f,), (v,))[1] + shift * v

    def cg_all(f, B, X0):
        return jnp.stack([jcg(lambda v: hvp(f, v), B[i], x0=X0[i], tol=pc.CG_RTOL, maxiter=pc.CG_MAXITER)[0]
                          for i in range(B.shape[0])])

    comp: dict = {}
    c_q = _time_compile(comp, "query_grads", psg, flat, Xq, yq)
    gq0 = c_q(flat, Xq, yq)
    c_cg = _time_compile(comp, "solve", cg_all, flat, gq0, jnp.zeros_like(gq0))
    c_g = _time_compile(comp, "per_sample_grads", psg, flat, X[:CHUNK_B], y[:CHUNK_B])
    c_sc = _time_compile(comp, "scores", lambda V, G: V @ G.T / n, gq0, c_g(flat, X[:CHUNK_B], y[:CHUNK_B]))

    def run(tm):
        with tm.stage("query_grads") as b:
            gq = c_q(flat, Xq, yq); b.append(gq)
        with tm.stage("solve") as b:
            V = c_cg(flat, gq, jnp.zeros_like(gq)); b.append(V)
        out = []
        for lo in range(0, n, CHUNK_B):
            with tm.stage("per_sample_grads") as b:
                G = c_g(flat, X[lo:lo + CHUNK_B], y[lo:lo + CHUNK_B]); b.append(G)
            with tm.stage("scores") as b:
                out.append(c_sc(V, G)); b.append(out[-1])
        return jnp.concatenate(out, 1), None, {"rows": cg_rows}

    stages, (S, _, info) = pc.run_repeats(_wrap(run), repeats)
    return {"cg": {"stages": stages, "compile": comp, **info}}, {"cg__scores": np.asarray(S)}


def main():
    import jax.flatten_util  # noqa: F401

    args = pc.parse_args(default_methods="")
    data = pc.load(args.data)
    if args.workload == "A":
        results, scores = run_a(data, (args.methods or "direct,cg").split(","), args.repeats)
    else:
        rows = args.cg_rows or int(len(data["ref_rows"]))
        results, scores = run_b(data, (args.methods or "cg").split(","), args.repeats, rows)
    pc.emit("plain JAX", jax.__version__, results, scores, args.scores)


if __name__ == "__main__":
    main()
