"""Where EK-FAC's influence error comes from, on a small workload-B-shaped MLP with dense references.

    python -m experiments.benchmarks.ekfac_exact [--n 1000] [--input-dim 64] [--hidden 32,16]
        [--dampings 0.3,1] [--out runs/ekfac_exact]

Workload B (``workloads.make_b``: same data generator, training and ``hess_shift = l2 + damping``)
scaled down so that every matrix is dense in float64: by default input 64, hidden (32, 16),
n = 1,000 (p = 2,778; a few minutes of CPU). ``--n 312 --input-dim 196`` keeps B's ratio
n (K - 1) / p = 0.41 (p = 7,002) at about ten times the cost. The error of
``ekfac.pairwise_scores`` against the benchmark's reference ``S = (1/n) G_q (H + lambda I)^{-1} G^T``
is split along the chain of approximations, each step with the same absolute damping lambda:

    H (exact Hessian of the mean CE; the benchmark's reference)
    -> GGN (Gauss-Newton = true Fisher; drops the residual term sum_k (p_k - y_k) grad^2 f_k)
    -> block-diagonal GGN (one block per Dense layer, kernel + bias)
    -> EK-FAC with the exact expectation over labels (every sample replicated K times with label k
       and weight p_k, ``fisher="empirical"``) -- no Monte-Carlo noise
    -> EK-FAC as the benchmark runs it (one label drawn per sample and pass, ``fisher="sampled"``)

plus K-FAC (no eigenvalue correction) and the empirical Fisher for comparison. Consistency checks
that would expose a bug rather than an approximation: the library's scores equal the dense
``G_q P (F_kron + lambda I)^{-1} P^T G^T`` built from its own factors in the *parameter* ordering
(P maps ``ravel_pytree`` order to layer form), the reference CG of ``make_b`` equals the dense
solve, and the exact-expectation Kronecker blocks reproduce the exact GGN block in the cases where
theory says they must (checked in tests/test_ekfac.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-query", type=int, default=50)
    ap.add_argument("--input-dim", type=int, default=64)
    ap.add_argument("--hidden", default="32,16")
    ap.add_argument("--dampings", default="0.3,1", help="extra absolute dampings besides hess_shift")
    ap.add_argument("--draws", type=int, default=32, help="label draws per sample for the 'sampled x draws' row")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="runs/ekfac_exact")
    args = ap.parse_args(argv)

    from experiments.benchmarks import workloads as W

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    jax.config.update("jax_enable_x64", True)
    from jaxunlearn import losses
    from jaxunlearn.influence import ekfac
    from jaxunlearn.models import mlp

    s = dataclasses.replace(W.SpecB(), n=args.n, n_query=args.n_query, input_dim=args.input_dim,
                            hidden=tuple(int(h) for h in args.hidden.split(",")), ref_queries=5,
                            seed=args.seed)
    t0 = time.perf_counter()
    data = W.make_b(s)                       # trains as workload B; reference by CG on 5 rows
    t_make = time.perf_counter() - t0
    info = json.loads(str(data["info"]))
    K = s.k
    sizes = (s.input_dim, *s.hidden, K)
    model = mlp(s.input_dim, K, hidden=s.hidden)
    names = [f"dense_{i}" for i in range(len(s.hidden))] + ["head"]
    params = {nm: {"kernel": jnp.asarray(data[f"W{i + 1}"], jnp.float64),
                   "bias": jnp.asarray(data[f"b{i + 1}"], jnp.float64)} for i, nm in enumerate(names)}
    v = {"params": params}
    X, y = jnp.asarray(data["X"], jnp.float64), jnp.asarray(data["y"])
    Xq, yq = jnp.asarray(data["Xq"], jnp.float64), jnp.asarray(data["yq"])
    n = X.shape[0]
    lam0 = float(data["hess_shift"])
    flat, unravel = ravel_pytree(params)
    p = flat.shape[0]

    def logits_fn(f, x):
        return model.apply({"params": unravel(f)}, x, train=False)[0]

    def mean_ce(f):
        return jnp.mean(losses.cross_entropy(logits_fn(f, X), y))

    # exact Hessian of the mean CE (256-column chunks of forward-over-reverse)
    hvp = jax.jit(jax.vmap(lambda t: jax.jvp(jax.grad(mean_ce), (flat,), (t,))[1]))
    eye = np.eye(p)
    H = np.concatenate([np.asarray(hvp(jnp.asarray(eye[lo:lo + 256]))) for lo in range(0, p, 256)])
    H = 0.5 * (H + H.T)
    # exact GGN: mean_n J_n^T (diag p - p p^T) J_n
    J = np.asarray(jax.jit(jax.vmap(jax.jacrev(lambda f, xi: logits_fn(f, xi[None])[0]), in_axes=(None, 0)))(flat, X))
    P_ = np.asarray(jax.nn.softmax(logits_fn(flat, X), axis=-1))
    Hz = np.einsum("nk,kl->nkl", P_, np.eye(K)) - P_[:, :, None] * P_[:, None, :]
    GGN = np.einsum("nkp,nkl,nlq->pq", J, Hz, J, optimize=True) / n
    del J

    per = jax.jit(jax.vmap(jax.grad(lambda f, xi, yi: losses.cross_entropy(logits_fn(f, xi[None]), yi[None])[0]),
                           in_axes=(None, 0, 0)))
    Gt, Gq = np.asarray(per(flat, X, y)), np.asarray(per(flat, Xq, yq))

    layers = ekfac.find_layers(model.apply, v, X[:2])
    # perm[j]: the ravel_pytree index of layer-form coordinate j (blocks in layer order, each block
    # the row-major [d_out, d_in] matrix of params_to_layer)
    L = ekfac.params_to_layer(jax.vmap(unravel)(jnp.eye(p)), layers)
    Pm = np.concatenate([np.asarray(L[l.name]).reshape(p, -1) for l in layers], axis=1)
    perm = np.argmax(Pm, axis=0)
    assert np.array_equal(np.sort(perm), np.arange(p)) and np.all(Pm[perm, np.arange(p)] == 1.0), \
        "layer form is not a permutation of the parameters"
    del Pm, L
    offs = np.cumsum([0] + [l.d_in * l.d_out for l in layers])
    blocks = [perm[offs[i]:offs[i + 1]] for i in range(len(layers))]   # flat indices of each block

    eH = np.linalg.eigvalsh(H)
    eG = np.linalg.eigvalsh(GGN) if p <= 4000 else np.array([np.nan, np.nan])

    # EK-FAC / K-FAC variants
    train = {"x": X, "y": y}
    fits = {}
    rep = {"x": jnp.repeat(X, K, axis=0), "y": jnp.tile(jnp.arange(K), n),
           "weight": jnp.asarray(P_.reshape(-1))}
    for correct in (True, False):
        tag = "EK-FAC" if correct else "K-FAC"
        fits[f"{tag}, exact expectation"] = ekfac.fit(model.apply, v, rep, None, layers=layers, fisher="empirical",
                                                      correct=correct, chunk_size=n * K)
        fits[f"{tag}, sampled (1 draw, as benchmark)"] = ekfac.fit(model.apply, v, train, jax.random.key(0),
                                                                   layers=layers, correct=correct, chunk_size=1024)
    draws = {"x": jnp.tile(X, (args.draws, 1)), "y": jnp.tile(y, args.draws)}
    fits[f"EK-FAC, sampled ({args.draws} draws)"] = ekfac.fit(model.apply, v, draws, jax.random.key(1),
                                                              layers=layers, chunk_size=4096)
    fits["EK-FAC, fisher='exact'"] = ekfac.fit(model.apply, v, train, None, layers=layers, fisher="exact",
                                               chunk_size=1024)
    fits["EK-FAC, empirical Fisher"] = ekfac.fit(model.apply, v, train, None, layers=layers, fisher="empirical",
                                                 chunk_size=1024)

    def kron_solve(fac, lam, R):
        """(F_kron + lam I)^{-1} R for R [p, m] in parameter order, F_kron built densely per block
        from the factors: Q = kron(Q_S, Q_A) (row-major vec of [d_out, d_in])."""
        out = np.empty_like(R)
        for l, idx in zip(layers, blocks):
            Q = np.kron(np.asarray(fac.q_s[l.name]), np.asarray(fac.q_a[l.name]))
            out[idx] = Q @ ((Q.T @ R[idx]) / (np.asarray(fac.eig[l.name]).ravel()[:, None] + lam))
        return out

    def kron_frob_rel(fac, l, B):
        """||Q diag(eig) Q^T - B||_F / ||B||_F with Q = kron(Q_S, Q_A), without forming Q:
        ||D||^2 - 2 sum(eig * diag(Q^T B Q)) + ||B||^2, the diagonal contracted factor by factor."""
        qs, qa, e = (np.asarray(fac.q_s[l.name]), np.asarray(fac.q_a[l.name]), np.asarray(fac.eig[l.name]))
        B4 = B.reshape(l.d_out, l.d_in, l.d_out, l.d_in)
        C = np.einsum("ib,oipj,jb->opb", qa, B4, qa, optimize=True)     # [o, o', b]
        diag = np.einsum("oa,opb,pa->ab", qs, C, qs, optimize=True)     # (Q^T B Q)_{(a,b),(a,b)}
        sq = np.sum(e * e) - 2 * np.sum(e * diag) + np.sum(B * B)
        return float(np.sqrt(max(sq, 0.0)) / np.linalg.norm(B))

    def psd_solve(M, lam, R):
        import scipy.linalg
        A = M + lam * np.eye(M.shape[0])
        try:
            return scipy.linalg.cho_solve(scipy.linalg.cho_factor(A), R)
        except np.linalg.LinAlgError:
            return np.linalg.solve(A, R)

    def bd_solve(M, lam, R):
        out = np.empty_like(R)
        for idx in blocks:
            out[idx] = psd_solve(M[np.ix_(idx, idx)], lam, R[idx])
        return out

    lams = [lam0] + [float(t) for t in args.dampings.split(",") if t]
    rows, checks = [], {}
    r = int(data["ref_scores"].shape[0])
    for lam in lams:
        refs = {"H": Gq @ psd_solve(H, lam, Gt.T) / n, "GGN": Gq @ psd_solve(GGN, lam, Gt.T) / n,
                "block-diag GGN": Gq @ bd_solve(GGN, lam, Gt.T) / n}
        if lam == lam0:
            checks["make_b CG reference vs dense solve (rel)"] = rel(data["ref_scores"], refs["H"][:r])
        for name in ("GGN", "block-diag GGN"):
            rows.append({"damping": lam, "method": f"exact {name}",
                         **{f"err_vs_{k}": rel(refs[name], refs[k]) for k in refs},
                         **{f"corr_vs_{k}": corr(refs[name], refs[k]) for k in refs},
                         "norm_ratio_vs_H": float(np.linalg.norm(refs[name]) / np.linalg.norm(refs["H"]))})
        for name, fac in fits.items():
            S = np.asarray(ekfac.pairwise_scores(model.apply, v, fac, {"x": Xq, "y": yq}, train, layers=layers,
                                                 damping=lam, chunk_size=1024)) / n
            if lam == lam0 and (name.startswith("EK-FAC, sampled (1") or name.startswith("EK-FAC, exact")):
                dense = Gq @ kron_solve(fac, lam, Gt.T) / n
                checks[f"{name}: library vs dense factored solve in parameter order (rel)"] = rel(S, dense)
            if lam == lam0 and name == "EK-FAC, fisher='exact'":
                S_rep = np.asarray(ekfac.pairwise_scores(model.apply, v, fits["EK-FAC, exact expectation"],
                                                         {"x": Xq, "y": yq}, train, layers=layers, damping=lam)) / n
                checks["fisher='exact' vs replicated labels weighted by p (rel)"] = rel(S, S_rep)
            row = {"damping": lam, "method": name,
                   **{f"err_vs_{k}": rel(S, ref) for k, ref in refs.items()},
                   **{f"corr_vs_{k}": corr(S, ref) for k, ref in refs.items()},
                   "norm_ratio_vs_H": float(np.linalg.norm(S) / np.linalg.norm(refs["H"]))}
            if lam == lam0:
                errs = {}
                for l, idx in zip(layers, blocks):
                    errs[l.name] = kron_frob_rel(fac, l, GGN[np.ix_(idx, idx)])
                row["block_frob_err_vs_GGN"] = errs
            rows.append(row)

    out = {"spec": dataclasses.asdict(s), "num_params": p, "n": n, "hess_shift": lam0, "make_b_info": info,
           "make_b_s": t_make, "H_eig": {"min": float(eH[0]), "max": float(eH[-1]),
                                         "num_negative": int(np.sum(eH < 0)), "num_below_-l2/2": int(np.sum(eH < -s.l2 / 2))},
           "GGN_eig": {"max": float(eG[-1]), "rank_1e-8": int(np.sum(eG > 1e-8 * eG[-1]))},
           "H_minus_GGN_rel_frob": rel(H, GGN), "checks": checks, "rows": rows}
    od = Path(args.out)
    od.mkdir(parents=True, exist_ok=True)
    (od / "results.json").write_text(json.dumps(out, indent=1))
    lines = [f"p = {p}, n = {n}, queries = {Gq.shape[0]}, hess_shift = {lam0:g}; H eig [{eH[0]:.3g}, {eH[-1]:.3g}] "
             f"({int(np.sum(eH < 0))} negative), GGN eig max {eG[-1]:.3g}, rank {out['GGN_eig']['rank_1e-8']}; "
             f"||H - GGN|| / ||GGN|| = {out['H_minus_GGN_rel_frob']:.3g}; train acc {info['train_acc']:.3f}, "
             f"grad norm {info['grad_norm']:.2g}", "",
             "| damping | method | rel. err vs H | corr vs H | rel. err vs GGN | rel. err vs block-diag GGN | "
             "corr vs block-diag GGN | norm ratio vs H |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['damping']:g} | {row['method']} | {row['err_vs_H']:.3f} | {row['corr_vs_H']:.3f} | "
                     f"{row['err_vs_GGN']:.3f} | {row['err_vs_block-diag GGN']:.3f} | "
                     f"{row['corr_vs_block-diag GGN']:.3f} | {row['norm_ratio_vs_H']:.3f} |")
    lines += ["", "Per-block Frobenius error vs the exact GGN block (damping-free):"]
    for row in rows:
        if "block_frob_err_vs_GGN" in row:
            lines.append(f"* {row['method']}: " + ", ".join(f"{k} {e:.3f}" for k, e in row["block_frob_err_vs_GGN"].items()))
    lines += ["", "Checks:"] + [f"* {k}: {v:.2e}" for k, v in checks.items()]
    rep = "\n".join(lines)
    (od / "report.md").write_text(rep)
    print(rep)


if __name__ == "__main__":
    main()
