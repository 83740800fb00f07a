"""The two influence-benchmark workloads, written once to ``.npz`` so every library reads the same bytes.

Both sides (jaxunlearn and the torch peers, each in its own virtualenv) load the same weights, data
and measurement definitions from these files; the float64 reference scores are stored with them.

Score convention (DESIGN.md): ``score_i = (1/n) grad m(theta)^T H^{-1} grad l_i(theta)``, the
predicted change of measurement m when training sample i is removed, with ``H`` the Hessian of the
mean training loss plus ``hess_shift * I`` (the L2 regulariser, plus damping for the network).
Self-influence ``s_i = (1/n) grad l_i^T H^{-1} grad l_i`` is the same with ``m = l_i``.

(A) Softmax head on frozen features (no intercept): ``logits = x @ W.T``, ``W`` [K, d]; n = 50,000,
    d = 256, K = 10, 10,000 validation points; fitted in float64 to stationarity (Newton-polished),
    stored as float32; ``hess_shift = l2``. Measurements (all on the validation set):
      util  mean_j CE(W x_j, y_j)
      dp    sum_j dp_coef_j * softmax(W x_j)[1],  dp_coef = +1/|s=1| on s=1, -1/|s=0| on s=0
            (the DP surrogate of seed 004 for class 1 against a binary group s)
      rob   mean_j CE(W xadv_j, y_j), xadv = FGSM (eps in feature units) against the fitted head,
            made once and stored as data (a transfer attack, as in the reference)
    The reference is a float64 Cholesky solve on the exact Hessian at the stored float32 weights.

(B) MLP 784-128-64-10 (ReLU; kernels [in, out] as in Flax), n = 5,000 synthetic training points,
    500 query points (per-query CE loss; a [500, n] score matrix). Trained with weight decay ``l2``
    (Adam, then L-BFGS to a small gradient, float32); ``hess_shift = l2 + damping``. A dense float64
    solve needs a 109,386^2 matrix (96 GB), so the reference is float64 CG to a 1e-9 relative
    residual on ``ref_queries`` query rows; every method's error is measured on those rows.

(R) ResNet-18 (the project's Flax ``resnet18``, CIFAR stem, base width 4, BatchNorm in eval mode)
    on synthetic CIFAR-shaped images [32, 32, 3], 10 classes, n = 512 training points, 50 query
    points; trained briefly (Adam, BatchNorm in train mode). Curvature: the Gauss-Newton matrix of
    the mean CE over the conv kernels and the head (the EK-FAC blocks; BatchNorm parameters held
    fixed) + (l2 + damping) I (``ref_curvature="ggn"``, the default: the exact Hessian + 0.051 I of
    this briefly trained net is indefinite, and CG on it diverged: relative residual 14.8 after 150
    iterations; EK-FAC approximates the GGN). Reference: CG with float32 products (the model casts
    its logits to float32) and float64 recurrences
    to a 1e-5 relative residual on ``ref_queries`` rows. Weights are stored as ``p/<path>`` arrays.

Run ``python -m experiments.benchmarks.workloads --workload A --out FILE`` (the benchmark does this
in a subprocess, since it enables float64 in JAX).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

__all__ = ["SpecA", "SpecB", "SpecR", "spec", "make_a", "make_b", "make_r", "r_model", "load_r_variables",
           "head_hessian64", "mlp_apply"]


@dataclasses.dataclass(frozen=True)
class SpecA:
    n: int = 50_000
    d: int = 256
    k: int = 10
    n_val: int = 10_000
    l2: float = 1e-3
    fgsm_eps: float = 0.1
    class_sep: float = 0.22
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SpecB:
    n: int = 5_000
    n_query: int = 500
    input_dim: int = 784
    hidden: tuple = (128, 64)
    k: int = 10
    l2: float = 1e-2
    damping: float = 0.05
    latent: int = 20
    label_noise: float = 0.0
    adam_steps: int = 300
    lbfgs_iters: int = 1500
    ref_queries: int = 10
    ref_tol: float = 1e-9
    seed: int = 1


@dataclasses.dataclass(frozen=True)
class SpecR:
    n: int = 512
    n_query: int = 50
    image: int = 32
    k: int = 10
    width: int = 4
    l2: float = 1e-3
    damping: float = 0.05
    adam_steps: int = 150
    noise: float = 1.0
    ref_queries: int = 5
    ref_tol: float = 1e-5
    ref_maxiter: int = 400
    ref_curvature: str = "ggn"  # "ggn" (PSD) or "hessian" (indefinite on this briefly trained net)
    seed: int = 2


QUICK_A = SpecA(n=5_000, d=64, n_val=1_000)
QUICK_B = SpecB(n=1_000, n_query=50, input_dim=196, hidden=(64, 32), adam_steps=200, lbfgs_iters=500,
                ref_queries=5)
QUICK_R = SpecR(n=128, n_query=10, image=16, adam_steps=30, ref_queries=3, ref_maxiter=200)


def spec(workload: str, quick: bool):
    """The spec of workload "A" or "B" (full size, or the smaller ``quick`` one)."""
    if workload == "A":
        return QUICK_A if quick else SpecA()
    if workload == "B":
        return QUICK_B if quick else SpecB()
    if workload == "R":
        return QUICK_R if quick else SpecR()
    raise ValueError(f"unknown workload {workload!r}; choose 'A', 'B' or 'R'")


# ----------------------------------------------------------------------------------- workload A
def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _head_objective(w_flat, X, Y, l2, k):
    W = w_flat.reshape(k, -1)
    Z = X @ W.T
    zmax = Z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(Z - zmax).sum(axis=1))
    loss = np.mean(lse - np.sum(Z * Y, axis=1)) + 0.5 * l2 * np.sum(W * W)
    P = _softmax(Z)
    G = (P - Y).T @ X / X.shape[0] + l2 * W
    return loss, G.ravel()


def head_hessian64(W, X, l2):
    """Exact float64 Hessian [K d, K d] of mean CE + l2/2 ||W||^2 (row-major W [K, d] layout)."""
    n, d = X.shape
    k = W.shape[0]
    P = _softmax(X @ W.T)
    H = np.zeros((k, d, k, d))
    for a in range(k):
        for b in range(a, k):
            c = P[:, a] * ((a == b) - P[:, b])
            blk = (X * c[:, None]).T @ X / n
            H[a, :, b, :] = blk
            H[b, :, a, :] = blk.T
    H = H.reshape(k * d, k * d)
    H[np.diag_indices_from(H)] += l2
    return H


def head_measurement_grads64(W, Xv, yv, Xadv, dp_coef):
    """float64 gradients [3, K d] of (util, dp, rob) for the softmax head."""
    k = W.shape[0]
    Yv = np.eye(k)[yv]
    P = _softmax(Xv @ W.T)
    g_util = (P - Yv).T @ Xv / len(yv)
    # d p_1 / d z = p_1 (e_1 - p)
    dz = (P[:, 1:2] * ((np.arange(k) == 1)[None, :] - P)) * dp_coef[:, None]
    g_dp = dz.T @ Xv
    Pa = _softmax(Xadv @ W.T)
    g_rob = (Pa - Yv).T @ Xadv / len(yv)
    return np.stack([g_util.ravel(), g_dp.ravel(), g_rob.ravel()])


def head_measurements64(W, Xv, yv, Xadv, dp_coef) -> dict:
    k = W.shape[0]
    Yv = np.eye(k)[yv]
    P = _softmax(Xv @ W.T)
    Pa = _softmax(Xadv @ W.T)
    return {
        "util": float(np.mean(-np.log(np.sum(P * Yv, axis=1)))),
        "dp": float(np.sum(dp_coef * P[:, 1])),
        "rob": float(np.mean(-np.log(np.sum(Pa * Yv, axis=1)))),
    }


def make_a(s: SpecA) -> dict:
    """Features, fitted head, measurement data and float64 reference scores of workload A."""
    import scipy.linalg
    import scipy.optimize

    rng = np.random.default_rng(s.seed)
    mu = rng.normal(size=(s.k, s.d)) * s.class_sep
    scale = rng.uniform(0.5, 1.5, size=s.d)

    def features(m):
        y = rng.integers(0, s.k, size=m)
        x = (mu[y] + rng.normal(size=(m, s.d))) * scale
        return x.astype(np.float32), y.astype(np.int32)

    X, y = features(s.n)
    Xv, yv = features(s.n_val)
    # binary group attribute, correlated with class 1 so that the DP gap is not zero
    sv = (rng.uniform(size=s.n_val) < np.where(yv == 1, 0.7, 0.3)).astype(np.int32)
    dp_coef = np.where(sv == 1, 1.0 / max(sv.sum(), 1), -1.0 / max((1 - sv).sum(), 1))

    X64, Y = X.astype(np.float64), np.eye(s.k)[y]
    t0 = time.perf_counter()
    res = scipy.optimize.minimize(_head_objective, np.zeros(s.k * s.d), args=(X64, Y, s.l2, s.k),
                                  jac=True, method="L-BFGS-B",
                                  options={"maxiter": 5000, "gtol": 1e-12, "ftol": 0.0})
    W = res.x.reshape(s.k, s.d)
    for _ in range(2):  # Newton polish with the exact Hessian
        H = head_hessian64(W, X64, s.l2)
        g = _head_objective(W.ravel(), X64, Y, s.l2, s.k)[1]
        W = W - scipy.linalg.cho_solve(scipy.linalg.cho_factor(H), g).reshape(W.shape)
    W32 = W.astype(np.float32)
    fit_s = time.perf_counter() - t0

    # FGSM in feature space against the fitted head: x + eps sign(d CE / d x), dCE/dx = W^T (p - e_y)
    Wd = W32.astype(np.float64)
    Pv = _softmax(Xv.astype(np.float64) @ Wd.T)
    Xadv = (Xv + s.fgsm_eps * np.sign((Pv - np.eye(s.k)[yv]) @ Wd)).astype(np.float32)

    # float64 reference at the stored float32 weights
    t0 = time.perf_counter()
    H = head_hessian64(Wd, X64, s.l2)
    grad_norm = float(np.linalg.norm(_head_objective(Wd.ravel(), X64, Y, s.l2, s.k)[1]))
    cho = scipy.linalg.cho_factor(H, lower=True)
    gm = head_measurement_grads64(Wd, Xv.astype(np.float64), yv, Xadv.astype(np.float64), dp_coef)
    V = scipy.linalg.cho_solve(cho, gm.T).T.reshape(3, s.k, s.d)         # H^{-1} grad m
    R = _softmax(X64 @ Wd.T) - Y                                           # [n, K] residuals
    ref_scores = np.einsum("nk,mkd,nd->mn", R, V, X64) / s.n               # [3, n]
    L = cho[0]
    ref_self = np.empty(s.n)
    for lo in range(0, s.n, 4096):
        hi = min(lo + 4096, s.n)
        G = (R[lo:hi, :, None] * X64[lo:hi, None, :]).reshape(hi - lo, -1)
        Z = scipy.linalg.solve_triangular(L, G.T, lower=True)
        ref_self[lo:hi] = np.sum(Z * Z, axis=0) / s.n
    eig = np.linalg.eigvalsh(H)
    ref_s = time.perf_counter() - t0
    meas = head_measurements64(Wd, Xv.astype(np.float64), yv, Xadv.astype(np.float64), dp_coef)
    acc = float(np.mean(np.argmax(X64 @ Wd.T, 1) == y))
    info = {"fit_s": fit_s, "reference_s": ref_s, "grad_norm": grad_norm, "train_acc": acc,
            "hess_eig_min": float(eig[0]), "hess_eig_max": float(eig[-1]),
            "cond": float(eig[-1] / eig[0]), "measurements": meas, "lbfgs_iters": int(res.nit)}
    return {
        "X": X, "y": y, "Xv": Xv, "yv": yv, "sv": sv, "Xadv": Xadv,
        "dp_coef": dp_coef.astype(np.float32), "W": W32,
        "l2": np.float64(s.l2), "hess_shift": np.float64(s.l2),
        "ref_scores": ref_scores, "ref_self": ref_self,
        "measurement_names": np.array(["util", "dp", "rob"]),
        "info": np.array(json.dumps(info)), "spec": np.array(json.dumps(dataclasses.asdict(s))),
    }


# ----------------------------------------------------------------------------------- workload B
def mlp_apply(params, x):
    """``params = [(W1, b1), (W2, b2), (W3, b3)]`` with kernels [in, out]; ReLU hidden layers."""
    import jax.numpy as jnp

    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = jnp.maximum(h, 0.0)
    return h


def make_b(s: SpecB) -> dict:
    """Synthetic data, trained MLP and float64 reference scores (on ``ref_queries`` rows) of B."""
    import jax
    import jax.numpy as jnp
    import optax
    import scipy.optimize
    from jax.flatten_util import ravel_pytree

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(s.seed)
    U = rng.normal(size=(s.latent, s.input_dim)) / np.sqrt(s.latent)
    T = rng.normal(size=(s.latent, s.k))

    def data(m):
        z = rng.normal(size=(m, s.latent))
        x = np.tanh(z @ U) + 0.1 * rng.normal(size=(m, s.input_dim))
        logits = z @ T
        y = np.argmax(logits, axis=1)
        flip = rng.uniform(size=m) < s.label_noise
        y = np.where(flip, rng.integers(0, s.k, size=m), y)
        return x.astype(np.float32), y.astype(np.int32)

    X, y = data(s.n)
    Xq, yq = data(s.n_query)
    sizes = (s.input_dim, *s.hidden, s.k)
    key = jax.random.key(s.seed)
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b), jnp.float64) / np.sqrt(a)
        params.append((w, jnp.zeros((b,), jnp.float64)))

    def ce(params, x, y):
        logits = mlp_apply(params, x)
        return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]

    def objective(params, x, y):
        return jnp.mean(ce(params, x, y)) + 0.5 * s.l2 * sum(jnp.sum(w * w) + jnp.sum(b * b)
                                                               for w, b in params)

    # training in float32 (Adam, then L-BFGS); x64 is on in this process, so cast explicitly
    t0 = time.perf_counter()
    params = [(w.astype(jnp.float32), b.astype(jnp.float32)) for w, b in params]
    X32, y32 = jnp.asarray(X), jnp.asarray(y)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        g = jax.grad(objective)(params, x, y)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt

    for _ in range(s.adam_steps):
        params, opt = step(params, opt, X32, y32)
    flat0, unravel32 = ravel_pytree(params)
    vg = jax.jit(jax.value_and_grad(lambda f, x, y: objective(unravel32(f), x, y)))

    def fun(f):
        v, g = vg(jnp.asarray(f, jnp.float32), X32, y32)
        return float(v), np.asarray(g, np.float64)

    res = scipy.optimize.minimize(fun, np.asarray(flat0, np.float64), jac=True, method="L-BFGS-B",
                                  options={"maxiter": s.lbfgs_iters, "gtol": 1e-9, "ftol": 0.0,
                                           "maxcor": 20})
    params32 = [(np.asarray(w, np.float32), np.asarray(b, np.float32))
                for w, b in unravel32(jnp.asarray(res.x, jnp.float32))]
    fit_s = time.perf_counter() - t0
    X64, y64 = jnp.asarray(X, jnp.float64), jnp.asarray(y)

    # float64 reference at the stored float32 weights
    t0 = time.perf_counter()
    p64 = [(jnp.asarray(w, jnp.float64), jnp.asarray(b, jnp.float64)) for w, b in params32]
    flat, unravel = ravel_pytree(p64)
    shift = s.l2 + s.damping
    grad_norm = float(jnp.linalg.norm(jax.grad(lambda f: objective(unravel(f), X64, y64))(flat)))

    def mean_ce(f, x, y):
        return jnp.mean(ce(unravel(f), x, y))

    @jax.jit
    def matmat(f, V, x, y):  # (H_CE + shift I) V for V [p, q]
        g = lambda q: jax.grad(mean_ce)(q, x, y)
        _, lin = jax.linearize(g, f)
        return jax.vmap(lin, in_axes=1, out_axes=1)(V) + shift * V

    r = s.ref_queries
    Xq64, yq64 = jnp.asarray(Xq[:r], jnp.float64), jnp.asarray(yq[:r])
    per_q = jax.jit(jax.vmap(jax.grad(lambda f, x, y: ce(unravel(f), x[None], y[None])[0]),
                             in_axes=(None, 0, 0)))
    B = np.asarray(per_q(flat, Xq64, yq64)).T                       # [p, r]
    # block-diagonal CG (independent columns), float64
    xs = np.zeros_like(B)
    rr = B.copy()
    pp = rr.copy()
    rs = np.sum(rr * rr, axis=0)
    bnorm = np.sqrt(np.sum(B * B, axis=0))
    it = 0
    while it < 5000 and np.max(np.sqrt(rs) / bnorm) > s.ref_tol:
        Ap = np.asarray(matmat(flat, jnp.asarray(pp), X64, y64))
        alpha = rs / np.sum(pp * Ap, axis=0)
        xs += alpha * pp
        rr -= alpha * Ap
        rs_new = np.sum(rr * rr, axis=0)
        pp = rr + (rs_new / rs) * pp
        rs = rs_new
        it += 1
    true_res = np.asarray(matmat(flat, jnp.asarray(xs), X64, y64)) - B
    rel_res = float(np.max(np.linalg.norm(true_res, axis=0) / bnorm))
    # scores[q, i] = (1/n) g_q^T H^{-1} g_i, training grads in chunks
    per_t = jax.jit(jax.vmap(jax.grad(lambda f, x, y: ce(unravel(f), x[None], y[None])[0]),
                             in_axes=(None, 0, 0)))
    ref = np.empty((r, s.n))
    for lo in range(0, s.n, 500):
        hi = min(lo + 500, s.n)
        G = np.asarray(per_t(flat, X64[lo:hi], y64[lo:hi]))
        ref[:, lo:hi] = (G @ xs).T / s.n
    # extreme eigenvalues of H (Lanczos-free: power iterations on H and on (c I - H))
    v = rng.normal(size=(flat.shape[0], 1))
    for _ in range(30):
        v = np.asarray(matmat(flat, jnp.asarray(v / np.linalg.norm(v)), X64, y64))
    lam_max = float(np.linalg.norm(v))
    ref_s = time.perf_counter() - t0
    logits = np.asarray(mlp_apply(p64, X64))
    info = {"fit_s": fit_s, "reference_s": ref_s, "grad_norm": grad_norm, "lbfgs_iters": int(res.nit),
            "train_acc": float(np.mean(np.argmax(logits, 1) == y)), "ref_cg_iters": it,
            "ref_rel_residual": rel_res, "hess_eig_max": lam_max, "hess_shift": shift,
            "cond_upper": lam_max / shift, "num_params": int(flat.shape[0])}
    out = {"X": X, "y": y, "Xq": Xq, "yq": yq, "l2": np.float64(s.l2), "damping": np.float64(s.damping),
           "hess_shift": np.float64(shift), "ref_scores": ref, "ref_rows": np.arange(r),
           "info": np.array(json.dumps(info)), "spec": np.array(json.dumps(dataclasses.asdict(s)))}
    for i, (w, b) in enumerate(params32):
        out[f"W{i + 1}"], out[f"b{i + 1}"] = w, b
    return out


# ----------------------------------------------------------------------------------- workload R
def r_model(s_or_spec):
    """The Flax ResNet-18 of workload R (from a SpecR or its stored JSON dict)."""
    from jaxunlearn.models import resnet18

    d = s_or_spec if isinstance(s_or_spec, dict) else dataclasses.asdict(s_or_spec)
    return resnet18((d["image"], d["image"], 3), d["k"], width=d["width"], stem="cifar")


def r_in_blocks(path: tuple) -> bool:
    """Parameters in the EK-FAC blocks: conv kernels and the head (BatchNorm scale/bias excluded)."""
    return path[-1] == "kernel" or path[0] == "head"


def flat_tree(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_tree(v, prefix + (k,)))
        else:
            out["/".join(prefix + (k,))] = v
    return out


def unflat_tree(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *head, last = key.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def make_r(s: SpecR) -> dict:
    """Synthetic images, briefly trained ResNet-18 and reference scores (on ``ref_queries`` rows)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxunlearn import losses

    rng = np.random.default_rng(s.seed)
    templates = rng.normal(size=(s.k, s.image, s.image, 3))

    def data(m):
        y = rng.integers(0, s.k, size=m)
        x = templates[y] + s.noise * rng.normal(size=(m, s.image, s.image, 3))
        return x.astype(np.float32), y.astype(np.int32)

    X, y = data(s.n)
    Xq, yq = data(s.n_query)
    model = r_model(s)
    v = model.init(jax.random.key(s.seed), X[:2])
    params, state = v["params"], {"batch_stats": v["batch_stats"]}
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def objective(params, state, x, y):
        logits, aux = model.apply({"params": params, **state}, x, train=True)
        l2 = sum(jnp.sum(w * w) for w in jax.tree_util.tree_leaves(params))
        return jnp.mean(losses.cross_entropy(logits, y)) + 0.5 * s.l2 * l2, aux["model_state"]

    @jax.jit
    def step(params, state, opt, x, y):
        (_, state), g = jax.value_and_grad(objective, has_aux=True)(params, state, x, y)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), state, opt

    t0 = time.perf_counter()
    for _ in range(s.adam_steps):
        params, state, opt = step(params, state, opt, X, y)
    fit_s = time.perf_counter() - t0
    variables = {"params": params, **state}

    # H restricted to the EK-FAC blocks: mean CE (eval mode) over conv kernels + head, + shift I
    flat = flat_tree(params)
    keys = [k for k in flat if r_in_blocks(tuple(k.split("/")))]
    sizes = [int(np.prod(flat[k].shape)) for k in keys]
    shift = s.l2 + s.damping

    def unravel(f):
        parts = jnp.split(f, np.cumsum(sizes)[:-1])
        sub = {k: p.reshape(flat[k].shape) for k, p in zip(keys, parts)}
        return unflat_tree({**flat, **sub})

    f0 = jnp.concatenate([flat[k].ravel() for k in keys])

    def logits_of(f, x):
        return model.apply({**variables, "params": unravel(f)}, x, train=False)[0]

    def ce(f, x, y):
        return losses.cross_entropy(logits_of(f, x), y)

    @jax.jit
    def matmat(f, V, x, y):
        if s.ref_curvature == "hessian":
            _, lin = jax.linearize(jax.grad(lambda q: jnp.mean(ce(q, x, y))), f)
            return jax.vmap(lin, in_axes=1, out_axes=1)(V) + shift * V
        # GGN of the mean CE: (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i
        z, jvp = jax.linearize(lambda q: logits_of(q, x), f)
        vjp = jax.linear_transpose(jvp, f)
        p = jax.nn.softmax(z)

        def one(v):
            u = jvp(v)
            return vjp((p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / x.shape[0])[0]
        return jax.vmap(one, in_axes=1, out_axes=1)(V) + shift * V

    per = jax.jit(jax.vmap(jax.grad(lambda f, x, y: ce(f, x[None], y[None])[0]), in_axes=(None, 0, 0)))
    r = s.ref_queries
    B = np.asarray(per(f0, Xq[:r], yq[:r]), np.float64).T
    t0 = time.perf_counter()
    xs, rr = np.zeros_like(B), B.copy()
    pp, rs = rr.copy(), np.sum(B * B, axis=0)
    bnorm = np.sqrt(rs)
    it = 0
    while it < s.ref_maxiter and np.max(np.sqrt(rs) / bnorm) > s.ref_tol * 0.1:
        Ap = np.asarray(matmat(f0, jnp.asarray(pp, jnp.float32), X, y), np.float64)
        alpha = rs / np.sum(pp * Ap, axis=0)
        xs += alpha * pp
        rr -= alpha * Ap
        rs_new = np.sum(rr * rr, axis=0)
        pp = rr + (rs_new / rs) * pp
        rs = rs_new
        it += 1
    true_res = np.asarray(matmat(f0, jnp.asarray(xs, jnp.float32), X, y), np.float64) - B
    rel_res = float(np.max(np.linalg.norm(true_res, axis=0) / bnorm))
    G = np.concatenate([np.asarray(per(f0, X[lo:lo + 128], y[lo:lo + 128]), np.float64)
                        for lo in range(0, s.n, 128)])
    ref = (G @ xs).T / s.n
    ref_s = time.perf_counter() - t0
    logits, _ = model.apply(variables, X, train=False)
    logits_q, _ = model.apply(variables, Xq, train=False)
    info = {"fit_s": fit_s, "reference_s": ref_s, "ref_cg_iters": it, "ref_rel_residual": rel_res,
            "train_acc": float(np.mean(np.argmax(np.asarray(logits), 1) == y)),
            "hess_shift": shift, "ref_curvature": s.ref_curvature, "num_params": int(f0.shape[0]),
            "num_params_all": int(sum(np.prod(a.shape) for a in flat.values()))}
    out = {"X": X, "y": y, "Xq": Xq, "yq": yq, "l2": np.float64(s.l2), "damping": np.float64(s.damping),
           "hess_shift": np.float64(shift), "ref_scores": ref, "ref_rows": np.arange(r),
           "logits_q": np.asarray(logits_q),
           "info": np.array(json.dumps(info)), "spec": np.array(json.dumps(dataclasses.asdict(s)))}
    for k, a in flat_tree(variables).items():
        out[f"p/{k}"] = np.asarray(a)
    return out


def load_r_variables(data: dict) -> dict:
    """Workload R's Flax variables from the stored ``p/<collection>/<path>`` arrays."""
    return unflat_tree({k[2:]: np.asarray(v) for k, v in data.items() if k.startswith("p/")})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["A", "B", "R"], required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a spec field (Python literal), e.g. --set n=1000 --set hidden=(32,16)")
    args = ap.parse_args(argv)
    s = spec(args.workload, args.quick)
    if args.set:
        import ast

        s = dataclasses.replace(s, **{k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    arrays = {"A": make_a, "B": make_b, "R": make_r}[args.workload](s)
    np.savez(args.out, **arrays)
    print(json.dumps({"workload": args.workload, "out": args.out, **json.loads(str(arrays["info"]))}))


if __name__ == "__main__":
    main()
