"""The last-layer convex surrogate: logistic / softmax regression on frozen features, in closed form.

Seed 004 (footnote 1, §5) and Chhabra et al. compute influence on the network's last layer only,
refit as L2-regularised logistic regression on the frozen penultimate features (sklearn, no
intercept). This module is that fast path, with every quantity in closed form:

* the model: logits ``z = x~ W`` for the *design* ``x~ = [1, x]`` (or ``x`` without intercept) and
  ``W = [bias; kernel]`` [d~, K'], where ``K' = 1`` is a single binary logit (``p = sigmoid(z)``, the
  :mod:`jaxunlearn.losses` convention) and ``K' = K >= 2`` a softmax head;
* flat parameters ``theta = W.reshape(-1)`` (row-major: index ``j * K' + k``): the bias first,
  then the kernel row by row, which is ``ravel_pytree({"bias", "kernel"})``, the order of the
  autodiff :func:`jaxunlearn.influence.scores.make_problem` on the same head, so the per-sample
  gradient is a Kronecker product, ``g_i = x~_i ⊗ r_i`` with residual ``r_i = p_i - onehot(y_i)``
  (binary: ``(p_i - y_i) x~_i``);
* the objective ``L(W) = (1/n) sum_i w_i CE(x~_i W, y_i) + (1/2) sum_j l2_j ||W_j||^2`` (``l2``
  a scalar or one value per design row, e.g. 0 for an unpenalised intercept), ``n`` = number of
  samples with ``w_i != 0`` unless given (``num_samples``), as in :func:`jaxunlearn.losses.weighted_mean`;
* its Hessian ``H = (1/n) sum_i w_i (x~_i x~_i^T) ⊗ S_i + diag(l2) ⊗ I_K'``, ``S_i = diag(p_i) -
  p_i p_i^T`` (binary: ``p_i (1 - p_i)``), formed block by block with K'(K'+1)/2 weighted Gram
  GEMMs ``X^T diag(c) X`` (O(n K^2 d^2) flops, no autodiff), and structured HVPs in O(n d K);
* exact self-influence ``(1/n) g_i^T H^{-1} g_i`` for every i through the Cholesky factor,
  ``||L^{-1} g_i||^2``, with chunked triangular solves;
* a deterministic Newton solver (:func:`fit`) that reaches stationarity to ~1e-12 in float64.

Relation to the reference: sklearn's ``LogisticRegression(C=1/l2_ref, fit_intercept=False)``
minimises ``sum_i ell_i + (l2_ref / 2)||w||^2``, i.e. this objective with ``l2 = l2_ref / n``
(:func:`l2_from_sklearn`).

:func:`make_problem` packages the closed forms as a :class:`jaxunlearn.influence.scores.Problem`,
so that scores for any measurement go through the one code path of
:func:`jaxunlearn.influence.scores.influence_scores`. Nothing here jits itself except the
host-level :func:`make_problem` helpers, which jit their steps with the arrays as arguments.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from jaxunlearn import losses
from jaxunlearn.influence import scores as _scores

__all__ = [
    "FitInfo",
    "design",
    "l2_vector",
    "l2_from_sklearn",
    "head_to_matrix",
    "matrix_to_head",
    "head_apply",
    "probabilities",
    "residuals",
    "objective",
    "gradient",
    "hessian",
    "hvp",
    "per_sample_grads",
    "grads_dot",
    "grads_tdot",
    "self_influence",
    "fit",
    "refit_head",
    "make_problem",
]


# ----------------------------------------------------------------------------- layout helpers


def design(features: jax.Array, *, fit_intercept: bool) -> jax.Array:
    """The design matrix ``x~`` [n, d~]: the features, after a leading column of ones if intercept."""
    if features.ndim != 2:
        raise ValueError(f"features must have shape [n, d], got {features.shape}")
    if not fit_intercept:
        return features
    return jnp.concatenate([jnp.ones((features.shape[0], 1), features.dtype), features], axis=1)


def l2_vector(num_features: int, l2: float, *, fit_intercept: bool, penalize_intercept: bool = True,
              dtype=jnp.float32) -> jax.Array:
    """Per-design-row L2 coefficients [d~]: ``l2`` everywhere, 0 on the intercept row if unpenalised.

    ``penalize_intercept=True`` matches :mod:`jaxunlearn.train` (``l2`` covers every parameter,
    biases included); ``False`` matches sklearn's ``fit_intercept=True``.
    """
    rows = num_features + int(fit_intercept)
    v = jnp.full((rows,), l2, dtype)
    if fit_intercept and not penalize_intercept:
        v = v.at[0].set(0.0)
    return v


def l2_from_sklearn(C: float, n: int) -> float:
    """The mean-loss coefficient ``l2`` equivalent to sklearn's ``C`` on ``n`` samples: ``1 / (C n)``."""
    if C <= 0 or n <= 0:
        raise ValueError(f"need C > 0 and n > 0, got C={C}, n={n}")
    return 1.0 / (C * n)


def head_to_matrix(head: dict) -> jax.Array:
    """``{"kernel": [d, K'], "bias": [K'] (optional)} -> W`` [d~, K'] (bias as the first row)."""
    kernel = head["kernel"]
    if kernel.ndim != 2:
        raise ValueError(f"head kernel must be [d, K'], got {kernel.shape}")
    if "bias" not in head or head["bias"] is None:
        return kernel
    return jnp.concatenate([jnp.reshape(head["bias"], (1, -1)).astype(kernel.dtype), kernel], axis=0)


def matrix_to_head(W: jax.Array, *, fit_intercept: bool) -> dict:
    """Inverse of :func:`head_to_matrix` (flax ``Dense`` layout)."""
    if fit_intercept:
        return {"kernel": W[1:], "bias": W[0]}
    return {"kernel": W}


def head_apply(variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
    """A linear head on features, under the model contract ``apply(variables, x) -> (logits, aux)``.

    ``variables = {"params": {"kernel": [d, K'], "bias": [K'] (optional)}}``; ``aux["features"]`` is
    ``x`` itself. Lets every measurement and attack run in feature space on the surrogate.
    """
    del train, mask
    head = variables["params"]
    logits = x @ head["kernel"]
    if "bias" in head and head["bias"] is not None:
        logits = logits + head["bias"]
    aux = {"features": x, "model_state": {}}
    if capture_norm:
        aux["norm"] = {}
    return logits, aux


# ----------------------------------------------------------------------------- closed forms


def _weights(X, weight):
    return jnp.ones((X.shape[0],), X.dtype) if weight is None else weight.astype(X.dtype)


def _normalizer(w, num_samples):
    if num_samples is not None:
        return jnp.asarray(num_samples, w.dtype)
    return jnp.maximum(jnp.sum((w != 0).astype(w.dtype)), 1.0)


def _reg(l2, X):
    return jnp.broadcast_to(jnp.asarray(l2, X.dtype), (X.shape[1],))


def probabilities(W: jax.Array, X: jax.Array) -> jax.Array:
    """[n, K'] probabilities: ``sigmoid(z)`` (= p(y=1)) for one logit, else ``softmax(z)``."""
    z = X @ W
    return jax.nn.sigmoid(z) if W.shape[1] == 1 else jax.nn.softmax(z, axis=-1)


def residuals(W: jax.Array, X: jax.Array, y: jax.Array) -> jax.Array:
    """``d CE / d z`` [n, K']: ``p - y`` (one logit) or ``p - onehot(y)`` (softmax)."""
    p = probabilities(W, X)
    if W.shape[1] == 1:
        return p - y.astype(p.dtype)[:, None]
    return p - jax.nn.one_hot(y, W.shape[1], dtype=p.dtype)


def objective(W, X, y, weight=None, *, l2, num_samples=None) -> jax.Array:
    """``(1/n) sum_i w_i CE_i + (1/2) sum_j l2_j ||W_j||^2`` (module docstring)."""
    w = _weights(X, weight)
    ce = losses.cross_entropy(X @ W, y)
    return jnp.sum(w * ce) / _normalizer(w, num_samples) + 0.5 * jnp.sum(_reg(l2, X)[:, None] * W * W)


def gradient(W, X, y, weight=None, *, l2, num_samples=None) -> jax.Array:
    """``grad L`` [d~, K'] in closed form: ``X^T (w ⊙ R) / n + l2 ⊙ W``."""
    w = _weights(X, weight)
    R = residuals(W, X, y)
    return X.T @ (R * w[:, None]) / _normalizer(w, num_samples) + _reg(l2, X)[:, None] * W


def hessian(W, X, weight=None, *, l2, num_samples=None) -> jax.Array:
    """The dense Hessian [p, p] of :func:`objective` (p = d~ K'), in the flat order ``W.reshape(-1)``.

    Binary: ``X^T diag(w p (1 - p)) X / n + diag(l2)``. Softmax: block (k, k') of the
    [d~, K', d~, K'] tensor is ``X^T diag(w (p_k δ_kk' - p_k p_k')) X / n``. Only the (K'-1)K'/2
    distinct blocks among the first K'-1 classes are weighted Gram GEMMs (``lax.map``); the rest
    follow by symmetry and because every row of ``S_i`` sums to zero. O(n d~^2 K'^2).
    """
    w = _weights(X, weight)
    scale = w / _normalizer(w, num_samples)
    P = probabilities(W, X)
    d, k = W.shape
    reg = jnp.repeat(_reg(l2, X), k)
    if k == 1:
        c = scale * P[:, 0] * (1.0 - P[:, 0])
        return (X * c[:, None]).T @ X + jnp.diag(reg)
    # rows of S_i sum to zero, so the blocks with k' = K' - 1 follow from the others:
    # H_{k,K'-1} = -sum_{k'<K'-1} H_kk' and H_{K'-1,K'-1} = sum_{k,k'<K'-1} H_kk'
    m = k - 1
    iu, ju = np.triu_indices(m)
    coef = jnp.where(jnp.asarray(iu == ju), P[:, iu], 0.0) - P[:, iu] * P[:, ju]  # [n, pairs]
    coef = coef * scale[:, None]
    blocks = jax.lax.map(lambda c: (X * c[:, None]).T @ X, coef.T)  # [pairs, d, d]
    inner = jnp.zeros((m, m, d, d), X.dtype)
    inner = inner.at[iu, ju].set(blocks).at[ju, iu].set(jnp.swapaxes(blocks, 1, 2))
    col = -jnp.sum(inner, axis=1)  # [m, d, d]: H_{k, K'-1}
    corner = jnp.sum(inner, axis=(0, 1))
    full = jnp.zeros((k, k, d, d), X.dtype)
    full = full.at[:m, :m].set(inner).at[:m, m].set(col).at[m, :m].set(jnp.swapaxes(col, 1, 2))
    full = full.at[m, m].set(0.5 * (corner + corner.T))
    return full.transpose(2, 0, 3, 1).reshape(d * k, d * k) + jnp.diag(reg)


def hvp(W, X, V, weight=None, *, l2, num_samples=None, probs=None) -> jax.Array:
    """Structured ``H v`` in O(n d~ K' q): ``X^T (w ⊙ S_i(X V)) / n + l2 ⊙ V``, no H formed.

    Args:
      W, X, weight, l2, num_samples: as :func:`hessian`.
      V: flat [p] or [p, q] (q columns at once).
      probs: optional precomputed :func:`probabilities` [n, K'] (saves a pass inside solver loops).

    Returns:
      ``H V``, V's shape.
    """
    d, k = W.shape
    if V.ndim not in (1, 2) or V.shape[0] != d * k:
        raise ValueError(f"V must be [{d * k}] or [{d * k}, q]; got {list(V.shape)}")
    w = _weights(X, weight)
    scale = w / _normalizer(w, num_samples)
    P = probabilities(W, X) if probs is None else probs
    q = 1 if V.ndim == 1 else V.shape[1]
    Vm = V.reshape(d, k * q)
    U = (X @ Vm).reshape(-1, k, q)  # one GEMM for all columns
    Pq = P[:, :, None]
    if k > 1:
        SU = Pq * U - Pq * jnp.sum(Pq * U, axis=1, keepdims=True)
    else:
        SU = Pq * (1 - Pq) * U
    out = X.T @ (SU * scale[:, None, None]).reshape(-1, k * q)  # [d, k q]
    out = out.reshape(d, k, q) + _reg(l2, X)[:, None, None] * V.reshape(d, k, q)
    return out.reshape(V.shape)


def per_sample_grads(W, X, y) -> jax.Array:
    """Per-sample loss gradients [n, p] (unweighted), ``g_i = x~_i ⊗ r_i``. Materialises n x p."""
    R = residuals(W, X, y)
    return (X[:, :, None] * R[:, None, :]).reshape(X.shape[0], -1)


def grads_dot(W, X, y, V) -> jax.Array:
    """``G V`` [n, q] for V [p, q] (or [p] -> [n]) without forming G: ``sum_k (X V_k)_ik r_ik``."""
    d, k = W.shape
    R = residuals(W, X, y)
    if V.ndim == 1:
        return jnp.sum((X @ V.reshape(d, k)) * R, axis=-1)
    T = jnp.einsum("nj,jkq->nkq", X, V.reshape(d, k, -1))
    return jnp.einsum("nkq,nk->nq", T, R)


def grads_tdot(W, X, y, U) -> jax.Array:
    """``G^T U`` [p, q] for U [n, q] (or [n] -> [p]) without forming G: ``X^T (R ⊙ U)`` per column.

    With ``U = eps`` this is ``sum_i eps_i g_i``, the right-hand side of the influence update.
    """
    d, k = W.shape
    R = residuals(W, X, y)
    if U.ndim == 1:
        return (X.T @ (R * U[:, None].astype(R.dtype))).reshape(-1)
    T = (R[:, :, None] * U[:, None, :].astype(R.dtype)).reshape(X.shape[0], -1)  # [n, k q]
    return (X.T @ T).reshape(d * k, U.shape[1])


def self_influence(W, X, y, weight=None, *, l2, num_samples=None, chunk_size: int = 2048,
                   cholesky: jax.Array | None = None, method: str = "gram") -> jax.Array:
    """Exact self-influence ``(1/n) g_i^T H^{-1} g_i`` for every row, [n].

    The predicted increase of sample i's own loss if it were removed (score convention of
    :mod:`jaxunlearn.influence.scores` with ``m = ell_i``). Two exact methods, O(n p^2) flops:

    * ``"gram"`` (default): with ``A = H^{-1}`` (from the Cholesky factor) viewed as K' x K'
      blocks ``A_kk'`` [d~, d~], ``g_i^T A g_i = sum_kk' r_ik r_ik' x~_i^T A_kk' x~_i``, one weighted
      Gram GEMM ``rowsum((X A_kk') ⊙ X)`` per block pair. Softmax residuals sum to zero
      (``r_iK = -sum_{k<K} r_ik``), so the blocks are first compressed to (K'-1)^2 and only the
      (K'-1)K'/2 distinct pairs are formed -- the same GEMM shape as :func:`hessian`.
    * ``"triangular"``: ``||L^{-1} g_i||^2`` with ``H = L L^T``, ``chunk_size`` rows of G per
      triangular solve (memory ``chunk_size x p``).

    Args:
      W, X, y, weight, l2, num_samples: as :func:`hessian`.
      chunk_size: rows per triangular solve (``"triangular"`` only; static).
      cholesky: the lower Cholesky factor of H if already computed.
      method: ``"gram"`` or ``"triangular"``.

    Returns NaN if H is not positive definite (:func:`jaxunlearn.influence.scores.self_influence`
    checks the factor and raises).
    """
    if method not in ("gram", "triangular"):
        raise ValueError(f"method must be 'gram' or 'triangular', got {method!r}")
    w = _weights(X, weight)
    nrm = _normalizer(w, num_samples)
    L = jnp.linalg.cholesky(hessian(W, X, weight, l2=l2, num_samples=num_samples)) if cholesky is None else cholesky
    R = residuals(W, X, y)
    n, d = X.shape
    k = W.shape[1]
    if method == "gram":
        A = cho_solve((L, True), jnp.eye(d * k, dtype=L.dtype))
        A4 = A.reshape(d, k, d, k).transpose(1, 3, 0, 2)  # [k, k', j, j'] = A[(j, k), (j', k')]
        if k == 1:
            return jnp.sum((X @ A4[0, 0]) * X, axis=-1) * R[:, 0] ** 2 / nrm
        B = A4[:-1, :-1] - A4[:-1, -1:] - A4[-1:, :-1] + A4[-1:, -1:]  # residuals sum to zero
        iu, ju = np.triu_indices(k - 1)
        S = R[:, :-1]
        coef = jnp.where(jnp.asarray(iu == ju), 1.0, 2.0).astype(S.dtype) * S[:, iu] * S[:, ju]
        T = jax.lax.map(lambda Bp: jnp.sum((X @ Bp) * X, axis=-1), B[iu, ju])  # [pairs, n]
        return jnp.sum(coef.T * T, axis=0) / nrm
    c = int(min(chunk_size, n))
    nc = -(-n // c)
    pad = nc * c - n
    Xc = jnp.pad(X, ((0, pad), (0, 0))).reshape(nc, c, d)
    Rc = jnp.pad(R, ((0, pad), (0, 0))).reshape(nc, c, k)

    def chunk(args):
        xc, rc = args
        Gt = (xc.T[:, None, :] * rc.T[None, :, :]).reshape(d * k, c)  # columns g_i = x~_i ⊗ r_i
        Z = solve_triangular(L, Gt, lower=True)
        return jnp.sum(Z * Z, axis=0)

    out = jax.lax.map(chunk, (Xc, Rc)).reshape(-1)[:n]
    return out / nrm


# ----------------------------------------------------------------------------- Newton fit


class FitInfo(NamedTuple):
    """Diagnostics of :func:`fit`: final ``grad_norm`` (Euclidean, of grad L incl. the
    regulariser), ``iterations`` taken, and ``converged`` (``grad_norm <= tol``)."""

    grad_norm: jax.Array
    iterations: jax.Array
    converged: jax.Array


def _default_tol(dtype) -> float:
    return 1e-12 if jnp.finfo(dtype).bits >= 64 else 2e-5


def fit(X, y, *, l2, num_outputs: int = 1, weight=None, num_samples=None, init=None,
        tol: float | None = None, max_iter: int = 50) -> tuple[jax.Array, FitInfo]:
    """Minimise :func:`objective` by Newton's method with backtracking (deterministic, full batch).

    Each step solves ``H d = grad L`` by Cholesky and backtracks (Armijo) from the full step; it
    stops at ``||grad L|| <= tol``, after ``max_iter`` steps, or when no step decreases L any more
    (the floating-point floor). ``l2 > 0`` (everywhere except possibly an intercept) makes the
    problem strictly convex, so the minimiser is unique and a warm start (e.g. from the model
    before a removal) converges in a few steps: leave-one-out retraining is noise-free.

    Args:
      X: design [n, d~] (see :func:`design`); its dtype sets the precision (use float64 for
        stationarity to ~1e-12).
      y: [n] integer labels.
      l2: scalar or [d~] L2 coefficients.
      num_outputs: 1 (single binary logit) or K >= 2 (softmax).
      weight: optional [n] sample weights (0 removes a sample).
      num_samples: the normaliser n of the mean loss (default: number of non-zero weights).
      init: optional [d~, K'] starting point (default zeros).
      tol: gradient-norm tolerance (default 1e-12 in float64, 2e-5 in float32).
      max_iter: maximum number of Newton steps.

    Returns:
      ``(W, FitInfo)``.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    d = X.shape[1]
    W0 = jnp.zeros((d, num_outputs), X.dtype) if init is None else jnp.asarray(init, X.dtype)
    if W0.shape != (d, num_outputs):
        raise ValueError(f"init has shape {W0.shape}, expected {(d, num_outputs)}")
    tol = _default_tol(X.dtype) if tol is None else tol
    kw = dict(l2=l2, num_samples=num_samples)
    f = functools.partial(objective, X=X, y=y, weight=weight, **kw)

    def grad_norm(W):
        g = gradient(W, X, y, weight, **kw)
        return g, jnp.sqrt(jnp.sum(g * g))

    def cond(state):
        W, g, gn, fval, it, stalled = state
        return (it < max_iter) & (gn > tol) & (~stalled)

    def body(state):
        W, g, gn, fval, it, _ = state
        H = hessian(W, X, weight, **kw)
        step = cho_solve((jnp.linalg.cholesky(H), True), g.reshape(-1)).reshape(W.shape)
        dec = jnp.sum(g * step)

        # the full Newton step is taken if it decreases L (Armijo) or, once L no longer resolves
        # the decrease (near the optimum), if it decreases ||grad L|| without increasing L beyond
        # rounding; otherwise backtrack (Armijo) from t = 1/2
        W1 = W - step
        f1 = f(W1)
        g1, gn1 = grad_norm(W1)
        rounding = 64 * jnp.finfo(X.dtype).eps * jnp.abs(fval)
        full_ok = jnp.isfinite(f1) & ((f1 <= fval - 1e-4 * dec) | ((f1 <= fval + rounding) & (gn1 < gn)))

        def ls_cond(c):
            t, fn = c
            return (fn > fval - 1e-4 * t * dec) & (t > 1e-8)

        def ls_body(c):
            t, _ = c
            return t / 2, f(W - (t / 2) * step)

        def backtrack():
            t, fn = jax.lax.while_loop(ls_cond, ls_body, (jnp.asarray(0.5, X.dtype), f(W - 0.5 * step)))
            W_t = W - t * step
            g_t, gn_t = grad_norm(W_t)
            return W_t, fn, g_t, gn_t

        W_try, fn, g_try, gn_try = jax.lax.cond(full_ok, lambda: (W1, f1, g1, gn1), backtrack)
        ok = jnp.isfinite(fn) & ((fn < fval) | ((fn <= fval + rounding) & (gn_try < gn)))
        W_new = jnp.where(ok, W_try, W)
        g_new = jnp.where(ok, g_try, g)
        gn_new = jnp.where(ok, gn_try, gn)
        return W_new, g_new, gn_new, jnp.where(ok, fn, fval), it + 1, ~ok

    g0, gn0 = grad_norm(W0)
    state = (W0, g0, gn0, f(W0), jnp.asarray(0, jnp.int32), jnp.asarray(False))
    W, g, gn, _, it, _ = jax.lax.while_loop(cond, body, state)
    return W, FitInfo(gn, it, gn <= tol)


_fit_jit = jax.jit(fit, static_argnames=("num_outputs", "tol", "max_iter"))


def refit_head(features, y, *, l2, num_outputs: int = 1, fit_intercept: bool = False,
               penalize_intercept: bool = True, weight=None, init_head: dict | None = None,
               tol: float | None = None, max_iter: int = 50) -> tuple[dict, FitInfo]:
    """Refit a network head on frozen features (the seed 004 surrogate); returns head params.

    A host-level helper: it runs a jitted :func:`fit` (arrays passed as arguments).

    Args:
      features: [n, d] frozen penultimate features.
      y: [n] labels.
      l2: mean-loss L2 coefficient (:func:`l2_from_sklearn` converts the reference's C).
      num_outputs: 1 (binary, one logit) or K (softmax).
      fit_intercept: add a bias; the reference uses none.
      penalize_intercept: include the bias in the L2 penalty (as :mod:`jaxunlearn.train` does).
      weight, tol, max_iter: as :func:`fit`.
      init_head: optional warm start, ``{"kernel", "bias"}`` (e.g. the trained network's head).

    Returns:
      ``(head params {"kernel", "bias"?}, FitInfo)``.
    """
    if num_outputs > 1 and fit_intercept and not penalize_intercept:
        raise ValueError("unpenalised softmax intercepts are not identifiable (adding a constant to "
                         "every class's bias changes nothing), so H is singular: penalise the "
                         "intercept or use a single binary logit")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 for a strictly convex surrogate with a unique optimum, got {l2}")
    X = design(features, fit_intercept=fit_intercept)
    _check_head_labels(y, num_outputs, weight, "y")
    reg = l2_vector(features.shape[1], l2, fit_intercept=fit_intercept,
                    penalize_intercept=penalize_intercept, dtype=X.dtype)
    # always the same argument structure, so refits share one compilation per shape
    w = jnp.ones((X.shape[0],), X.dtype) if weight is None else jnp.asarray(weight, X.dtype)
    init = (jnp.zeros((X.shape[1], num_outputs), X.dtype) if init_head is None
            else head_to_matrix(init_head).astype(X.dtype))
    W, info = _fit_jit(X, jnp.asarray(y), l2=reg, num_outputs=num_outputs, weight=w,
                       num_samples=jnp.sum(w != 0).astype(X.dtype), init=init, tol=tol, max_iter=max_iter)
    return matrix_to_head(W, fit_intercept=fit_intercept), info


# ----------------------------------------------------------------------------- Problem


def _check_head_labels(y, num_outputs: int, weight, name: str) -> None:
    """Labels of the non-padding rows must be classes of a head with ``num_outputs`` logits."""
    from jaxunlearn.evaluation import check_labels

    if isinstance(y, jax.core.Tracer) or isinstance(weight, jax.core.Tracer):
        return
    y = np.asarray(y)
    if weight is not None:
        y = y[np.asarray(weight) != 0]
    if np.issubdtype(y.dtype, np.integer):
        check_labels(y, 2 if int(num_outputs) == 1 else int(num_outputs), name=name)


def _data(W, X, y, weight, l2, num_samples):
    w = _weights(X, weight)
    return {"W": W, "X": X, "y": y, "weight": w, "l2": _reg(l2, X), "n": _normalizer(w, num_samples),
            "P": probabilities(W, X)}


def _grad(data):
    return gradient(data["W"], data["X"], data["y"], data["weight"], l2=data["l2"],
                    num_samples=data["n"]).reshape(-1)


def _hvp(data, v):
    return hvp(data["W"], data["X"], v, data["weight"], l2=data["l2"], num_samples=data["n"],
               probs=data["P"])


def _hess(data):
    return hessian(data["W"], data["X"], data["weight"], l2=data["l2"], num_samples=data["n"])


def _grads_dot(data, V):
    mask = (data["weight"] != 0).astype(data["X"].dtype)
    out = grads_dot(data["W"], data["X"], data["y"], V)
    return out * (mask if out.ndim == 1 else mask[:, None])


def _grads_tdot(data, U):
    mask = (data["weight"] != 0).astype(data["X"].dtype)
    return grads_tdot(data["W"], data["X"], data["y"], U * (mask if U.ndim == 1 else mask[:, None]))


def _grads_rows(data, index):
    return per_sample_grads(data["W"], data["X"][index], data["y"][index])


def _head_from_flat_intercept(data, flat):
    return matrix_to_head(flat.reshape(data["W"].shape), fit_intercept=True)


def _head_from_flat(data, flat):
    return matrix_to_head(flat.reshape(data["W"].shape), fit_intercept=False)


def make_problem(head: dict, batch: dict, *, l2, num_samples=None,
                 penalize_intercept: bool = True) -> "_scores.Problem":
    """The closed-form influence :class:`~jaxunlearn.influence.scores.Problem` of a linear head.

    The same shape as the autodiff :func:`jaxunlearn.influence.scores.make_problem`
    ``(loss_fn, params, batch, *, l2, ...)``: parameters, then the training batch, then ``l2``;
    the flat parameter order is the same too (``ravel_pytree`` of the head: bias, then kernel).
    Use it with :func:`~jaxunlearn.influence.scores.influence_scores` and measurements built on
    :func:`head_apply` (their ``params`` are the head dict, their batches hold features in ``"x"``).

    Args:
      head: ``{"kernel": [d, K'], "bias": [K'] (optional)}`` at (near) the optimum, e.g. from
        :func:`refit_head`; a ``bias`` entry means the design has an intercept column.
      batch: the training set ``{"x": [n, d] features, "y": [n] labels, "weight": [n]
        (optional; 0 = padding/excluded, scored 0)}``; other keys are ignored.
      l2: the objective's L2 coefficient (scalar; see :func:`l2_vector` for the intercept).
      num_samples: normaliser n (default: number of non-zero weights).
      penalize_intercept: whether ``l2`` covers the bias.
    """
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch must be a dict with 'x' (features [n, d]) and 'y' (labels [n]), got "
                         f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    features, y, weight = batch["x"], batch["y"], batch.get("weight")
    fit_intercept = "bias" in head and head["bias"] is not None
    W = head_to_matrix(head)
    X = design(jnp.asarray(features, W.dtype), fit_intercept=fit_intercept)
    if X.shape[1] != W.shape[0]:
        raise ValueError(f"features have {features.shape[1]} columns, the head expects {head['kernel'].shape[0]}")
    reg = l2_vector(features.shape[1], l2, fit_intercept=fit_intercept,
                    penalize_intercept=penalize_intercept, dtype=X.dtype) if jnp.ndim(l2) == 0 else l2
    y = jnp.asarray(y)
    if y.shape != (X.shape[0],):
        raise ValueError(f"y has shape {y.shape}, expected ({X.shape[0]},)")
    _check_head_labels(y, W.shape[1], weight, "the training batch's 'y'")
    data = _data(W, X, y, None if weight is None else jnp.asarray(weight), reg, num_samples)
    return _scores.Problem(
        data=data,
        flat=W.reshape(-1),
        num_train=X.shape[0],
        normalizer=float(data["n"]),
        gradient=_grad,
        hvp=_hvp,
        hessian=_hess,
        grads_dot=_grads_dot,
        grads_tdot=_grads_tdot,
        grads_rows=_grads_rows,
        params_from_flat=_head_from_flat_intercept if fit_intercept else _head_from_flat,
        self_influence=_self_influence_exact,
        preconditioner=_kronecker_preconditioner,
    )


def _kronecker_preconditioner(data, damping):
    """``R [p, q] -> M^{-1} R`` for ``M = A ⊗ B + (mean(l2) + damping) I`` ~ H + damping I.

    ``A = X^T diag(w) X / n`` [d~, d~] and ``B`` the weighted mean of ``S_i`` [K', K'] (K-FAC's
    expectation-of-a-product-as-product-of-expectations, exact when ``S_i`` is constant): with
    ``A = Qa diag(a) Qa^T``, ``B = Qb diag(b) Qb^T``, ``M^{-1} = (Qa ⊗ Qb) diag(1 / (a b^T + c))
    (Qa ⊗ Qb)^T`` in the flat order ``W.reshape(-1)``. Set-up: one d~ x d~ Gram GEMM and two eigh.
    """
    X, w, P = data["X"], data["weight"], data["P"]
    d, k = data["W"].shape
    A = (X * (w / data["n"])[:, None]).T @ X
    wn = w / jnp.maximum(jnp.sum(w), jnp.finfo(X.dtype).tiny)
    if k == 1:
        B = jnp.sum(wn * P[:, 0] * (1 - P[:, 0])).reshape(1, 1)
    else:
        B = jnp.diag(wn @ P) - (P * wn[:, None]).T @ P
    a, Qa = jnp.linalg.eigh(A)
    b, Qb = jnp.linalg.eigh(0.5 * (B + B.T))
    denom = jnp.maximum(a, 0)[:, None] * jnp.maximum(b, 0)[None, :] + jnp.mean(data["l2"]) + damping
    denom = jnp.maximum(denom, 1e-6 * jnp.max(denom))

    def apply(R):
        Rm = R.reshape(d, k, -1)
        Z = jnp.einsum("ja,jkq,kb->abq", Qa, Rm, Qb) / denom[:, :, None]
        return jnp.einsum("ja,abq,kb->jkq", Qa, Z, Qb).reshape(R.shape)

    return apply


def _self_influence_exact(data, cholesky, chunk_size):
    mask = (data["weight"] != 0).astype(data["X"].dtype)
    return mask * self_influence(data["W"], data["X"], data["y"], data["weight"], l2=data["l2"],
                                 num_samples=data["n"], chunk_size=chunk_size, cholesky=cholesky)
