"""Peer runner: a plain torch.func implementation (vmap(grad), jvp-of-grad HVPs, torch.linalg).

Runs inside ``.peers/torch``. Workload A: methods ``direct`` (dense Hessian reverse-over-reverse,
``jacrev(grad)``, over data chunks, Cholesky, exact self-influence) and ``cg`` (CG with forward-over-reverse HVPs).
Workload B: ``cg`` (on the reference query rows) and ``arnoldi`` (Lanczos with full
re-orthogonalisation, top eigenpairs, inverse on their span as pyDVL's default).
See ``peer_common`` for the command line and output.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

torch.set_num_threads(os.cpu_count() or 1)
CHUNK_A = 10_000   # data chunk for the dense Hessian (bounds the p x chunk x K tangents)
CHUNK_B = 1_000    # training chunk for per-sample gradients of the MLP


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def cg_solve(matvec, B, rtol, maxiter):
    """Independent CG on the columns of B [p, q]; returns (X, iterations, max relative residual)."""
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    bn = torch.linalg.norm(B, dim=0)
    it = 0
    while it < maxiter and bool((rs.sqrt() > rtol * bn).any()):
        AP = matvec(P)
        alpha = rs / (P * AP).sum(0)
        X += alpha * P
        R -= alpha * AP
        rs_new = (R * R).sum(0)
        P = R + (rs_new / rs) * P
        rs = rs_new
        it += 1
    res = torch.linalg.norm(matvec(X) - B, dim=0) / bn
    return X, it, float(res.max())


# ----------------------------------------------------------------------------------- workload A
def run_a(data, methods, repeats):
    W = t(data["W"])
    X, y = t(data["X"]), t(data["y"]).long()
    n, (k, d) = X.shape[0], W.shape
    p = k * d
    shift = float(data["hess_shift"])
    meas = [(name, t(xm), t(ym).long(), t(c), kind) for name, xm, ym, c, kind in pc.head_measurement_specs(data)]

    def ce_one(w, x, yy):
        z = x @ w.reshape(k, d).T
        return torch.logsumexp(z, -1) - z.gather(-1, yy[None])[0]

    def mean_ce(w, x, yy):
        z = x @ w.reshape(k, d).T
        return (torch.logsumexp(z, -1) - z.gather(1, yy[:, None])[:, 0]).mean()

    def measurement(w, xm, ym, c, kind):
        z = xm @ w.reshape(k, d).T
        if kind == "ce":
            return (c * (torch.logsumexp(z, -1) - z.gather(1, ym[:, None])[:, 0])).sum()
        return (c * torch.softmax(z, -1)[:, 1]).sum()

    w = W.reshape(-1)

    def common(timer):
        with timer.stage("per_sample_grads"):
            G = vmap(grad(ce_one), in_dims=(None, 0, 0))(w, X, y)            # [n, p]
        with timer.stage("measure_grads"):
            gm = torch.stack([grad(measurement)(w, xm, ym, c, kind) for _, xm, ym, c, kind in meas])
        return G, gm

    def direct(timer):
        G, gm = common(timer)
        with timer.stage("hessian"):
            H = torch.zeros(p, p)
            for lo in range(0, n, CHUNK_A):
                xc, yc = X[lo:lo + CHUNK_A], y[lo:lo + CHUNK_A]
                # reverse-over-reverse (jacrev of grad): faster on CPU than torch.func.hessian's
                # forward-over-reverse here (34 s vs 74 s on workload A, issue 13)
                H += torch.func.jacrev(grad(mean_ce))(w, xc, yc) * (xc.shape[0] / n)
            H.diagonal().add_(shift)
        with timer.stage("factor"):
            L = torch.linalg.cholesky(H)
        with timer.stage("solve"):
            V = torch.cholesky_solve(gm.T, L)                                   # [p, 3]
        with timer.stage("scores"):
            S = (G @ V).T / n
        with timer.stage("self_influence"):
            Z = torch.linalg.solve_triangular(L, G.T, upper=False)
            s = (Z * Z).sum(0) / n
        return S, s, {}

    def hvp_cols(V):
        one = lambda v: jvp(lambda q: grad(mean_ce)(q, X, y), (w,), (v,))[1] + shift * v
        return vmap(one, in_dims=1, out_dims=1)(V)

    def cg(timer):
        G, gm = common(timer)
        with timer.stage("hvp"):
            hvp_cols(gm[:1].T)
        with timer.stage("solve"):
            V, iters, res = cg_solve(hvp_cols, gm.T.contiguous(), pc.CG_RTOL, pc.CG_MAXITER)
        with timer.stage("scores"):
            S = (G @ V).T / n
        return S, None, {"cg_iterations": iters, "cg_rel_residual": res}

    return _run_methods({"direct": direct, "cg": cg}, methods, repeats)


def _run_methods(table, methods, repeats):
    results, scores = {}, {}
    for name in methods:
        if name not in table:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(table)}")
        with torch.no_grad():
            stages, (S, s, info) = pc.run_repeats(table[name], repeats)
        results[name] = {"stages": stages, **info}
        scores[f"{name}__scores"] = S.numpy()
        if s is not None:
            scores[f"{name}__self"] = s.numpy()
    return results, scores


# ----------------------------------------------------------------------------------- workload B
def run_b(data, methods, repeats, cg_rows):
    nl = sum(1 for key in data if key.startswith("W"))
    model = pc.torch_mlp(data)
    params = {}
    for i in range(nl):
        params[f"{2 * i}.weight"] = t(data[f"W{i + 1}"].T.copy())
        params[f"{2 * i}.bias"] = t(data[f"b{i + 1}"])
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])
    X, y = t(data["X"]), t(data["y"]).long()
    Xq, yq = t(data["Xq"]), t(data["yq"]).long()
    n, nq = X.shape[0], Xq.shape[0]
    shift = float(data["hess_shift"])

    def unflat(f):
        return {k: v.reshape(s) for k, v, s in zip(names, torch.split(f, sizes), shapes)}

    def ce_one(f, x, yy):
        z = functional_call(model, unflat(f), (x[None],))[0]
        return torch.logsumexp(z, -1) - z.gather(-1, yy[None])[0]

    def mean_ce(f, x, yy):
        z = functional_call(model, unflat(f), (x,))
        return (torch.logsumexp(z, -1) - z.gather(1, yy[:, None])[:, 0]).mean()

    psg = vmap(grad(ce_one), in_dims=(None, 0, 0))

    def hvp_cols(V):
        one = lambda v: jvp(lambda q: grad(mean_ce)(q, X, y), (flat,), (v,))[1] + shift * v
        return vmap(one, in_dims=1, out_dims=1)(V)

    def scores_for(timer, Q):
        S = torch.empty(Q.shape[0], n)
        for lo in range(0, n, CHUNK_B):
            with timer.stage("per_sample_grads"):
                G = psg(flat, X[lo:lo + CHUNK_B], y[lo:lo + CHUNK_B])
            with timer.stage("scores"):
                S[:, lo:lo + CHUNK_B] = Q @ G.T / n
        return S

    def cg(timer):
        with timer.stage("query_grads"):
            gq = psg(flat, Xq[:cg_rows], yq[:cg_rows])                      # [r, p]
        with timer.stage("hvp"):
            hvp_cols(gq[:1].T)
        with timer.stage("solve"):
            V, iters, res = cg_solve(hvp_cols, gq.T.contiguous(), pc.CG_RTOL, pc.CG_MAXITER)
        S = scores_for(timer, V.T.contiguous())
        return S, None, {"cg_iterations": iters, "cg_rel_residual": res, "rows": cg_rows}

    def lanczos(m, gen):
        p = flat.shape[0]
        Qm = torch.zeros(p, m)
        alpha, beta = torch.zeros(m), torch.zeros(m)
        q = torch.randn(p, generator=gen)
        q /= torch.linalg.norm(q)
        hv = lambda v: jvp(lambda f: grad(mean_ce)(f, X, y), (flat,), (v,))[1]
        for j in range(m):
            Qm[:, j] = q
            v = hv(q)
            alpha[j] = q @ v
            v = v - Qm[:, : j + 1] @ (Qm[:, : j + 1].T @ v)                 # full re-orthogonalisation
            v = v - Qm[:, : j + 1] @ (Qm[:, : j + 1].T @ v)
            beta[j] = torch.linalg.norm(v)
            q = v / beta[j]
        T = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
        ev, U = torch.linalg.eigh(T)
        top = torch.argsort(ev.abs(), descending=True)[: pc.ARNOLDI_RANK]
        return ev[top], Qm @ U[:, top]

    def arnoldi(timer):
        with timer.stage("query_grads"):
            gq = psg(flat, Xq, yq)                                              # [nq, p]
        with timer.stage("factor"):
            D, U = lanczos(pc.ARNOLDI_KRYLOV, torch.Generator().manual_seed(0))
        with timer.stage("solve"):
            # projection onto the top eigenspace (pyDVL's default, Schioppa et al. 2022):
            # H^{-1} g ~ U diag(1 / (D + shift)) U^T g
            V = ((gq @ U) / (D + shift)) @ U.T
        S = scores_for(timer, V)
        return S, None, {"rank": pc.ARNOLDI_RANK, "krylov": pc.ARNOLDI_KRYLOV}

    return _run_methods({"cg": cg, "arnoldi": arnoldi}, methods, repeats)


def main():
    args = pc.parse_args(default_methods="")
    data = pc.load(args.data)
    if args.workload == "A":
        methods = (args.methods or "direct,cg").split(",")
        results, scores = run_a(data, methods, args.repeats)
    else:
        methods = (args.methods or "cg,arnoldi").split(",")
        rows = args.cg_rows or int(len(data["ref_rows"]))
        results, scores = run_b(data, methods, args.repeats, rows)
    pc.emit("torch.func", torch.__version__, results, scores, args.scores,
            threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
