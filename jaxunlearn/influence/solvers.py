"""Inverse-Hessian-vector solvers: ``x = (H + damping I)^{-1} b`` for one or many right-hand sides.

Every solver takes ``b`` of shape [p] or [p, q] (q columns solved together) and returns a
:class:`SolveResult`. Iterative solvers take ``matvec: v [p] -> H v [p]`` (e.g.
:func:`jaxunlearn.influence.hvp.make_flat_hvp` with ``damping=0``); the solver adds ``damping``
itself and maps the matvec over columns with ``vmap``.

* :func:`solve_direct` -- Cholesky or eigh of a dense H (small p); singular/indefinite -> error.
* :func:`solve_cg` -- conjugate gradients in a ``lax.while_loop`` over all columns at once, with the
  true residual re-computed after the loop (``jax.scipy.sparse.linalg.cg`` reports nothing).
* :func:`solve_lissa` -- the LiSSA recursion of Agarwal et al. (2017) as used by Koh & Liang
  (2017), with divergence detection.
* :func:`arnoldi` + :func:`solve_lowrank` -- the top-r eigenpairs by Arnoldi iteration (Schioppa
  et al. 2022) and the inverse on that subspace.

All functions are pure and jit-able (static iteration bounds or ``while_loop``). Failure is
reported in ``SolveResult.converged``; when the result is concrete (called outside jit) the
solver raises a :class:`SolverError` subclass, or warns with the residual when
``raise_on_fail=False``. After a jitted call, use :func:`check_solve` on the result.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SolveResult",
    "LowRank",
    "SolverError",
    "SingularHessianError",
    "NonConvergenceError",
    "DivergenceError",
    "SolverWarning",
    "solve_direct",
    "solve_cg",
    "solve_lissa",
    "arnoldi",
    "solve_lowrank",
    "make_solver",
    "check_solve",
    "power_iteration",
]

Matvec = Callable[[jax.Array], jax.Array]


class SolveResult(NamedTuple):
    """Outcome of a solve of ``(H + damping I) x = b``.

    Attributes:
      x: [p] or [p, q], the shape of ``b``.
      residual: relative residual ``||(H + damping I) x - b|| / ||b||``, [] or [q] (per column),
        re-computed from ``x`` after the solve. NaN where it cannot be computed (see
        :func:`solve_lowrank`).
      iterations: int32 scalar, matrix-vector products per column in the main loop (1 for direct).
      converged: bool scalar, True if every column met the solver's criterion.
    """

    x: jax.Array
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


class LowRank(NamedTuple):
    """Top-r eigenpairs of H: ``H ~= eigvecs @ diag(eigvals) @ eigvecs.T``.

    Attributes:
      eigvals: [r], ordered by decreasing magnitude.
      eigvecs: [p, r], orthonormal columns.
    """

    eigvals: jax.Array
    eigvecs: jax.Array


class SolverError(ValueError):
    """A solve failed; the message carries the residual or spectrum that shows why."""


class SingularHessianError(SolverError):
    """H + damping I is singular or not positive definite (add damping)."""


class NonConvergenceError(SolverError):
    """An iterative solver stopped before reaching its tolerance."""


class DivergenceError(SolverError):
    """An iterative solver's iterates blew up (norm growth or NaN)."""


class SolverWarning(RuntimeWarning):
    """Issued instead of a :class:`SolverError` when ``raise_on_fail=False``."""


# ---------------------------------------------------------------------------------------------
# helpers

def _columns(b, what: str = "b", p: int | None = None) -> tuple[jax.Array, bool]:
    b = jnp.asarray(b)
    if b.ndim not in (1, 2) or (p is not None and b.shape[0] != p):
        want = f"[{p}] or [{p}, q]" if p is not None else "[p] or [p, q]"
        raise ValueError(f"{what} must have shape {want}; got {list(b.shape)}")
    if not jnp.issubdtype(b.dtype, jnp.floating):
        b = b.astype(jnp.result_type(float))
    return (b[:, None], True) if b.ndim == 1 else (b, False)


def _uncolumns(x, squeeze):
    """[p, 1] -> [p] for a solution, [1] -> [] for a per-column residual."""
    if not squeeze:
        return x
    return x[:, 0] if x.ndim == 2 else x[0]


def _column_op(matvec: Matvec, damping) -> Callable[[jax.Array], jax.Array]:
    """``[p, q] -> (H + damping I) [p, q]``, mapping ``matvec`` over columns."""
    batched = jax.vmap(matvec, in_axes=1, out_axes=1)

    def op(v):
        out = batched(v)
        if out.shape != v.shape:
            raise ValueError(f"matvec returned shape {list(out.shape[:1])} for a vector of shape "
                             f"{list(v.shape[:1])}; it must map [p] -> [p]")
        return out + damping * v

    return op


def _norms(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=0))


def _safe(bnorm):
    return jnp.where(bnorm > 0, bnorm, 1.0)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _report(result: SolveResult, *, raise_on_fail: bool, error: type, message: Callable[[], str]):
    """Raise ``error`` or warn when a concrete result did not converge."""
    if _is_concrete(result.converged) and not bool(result.converged):
        msg = message()
        if raise_on_fail:
            raise error(msg)
        warnings.warn(msg, SolverWarning, stacklevel=3)
    return result


def _fmt(x) -> str:
    x = np.atleast_1d(np.asarray(x, np.float64))
    if x.size == 1:
        return f"{x[0]:.3g}"
    worst = np.nan if np.isnan(x).any() else x.max()
    return f"max {worst:.3g} over {x.size} columns"


def check_solve(result: SolveResult, what: str = "solve", *, raise_on_fail: bool = True) -> SolveResult:
    """Check a concrete :class:`SolveResult` (e.g. returned from a jitted function).

    Raises:
      NonConvergenceError: if ``result.converged`` is False (or warns if ``raise_on_fail=False``).
    """
    return _report(result, raise_on_fail=raise_on_fail, error=NonConvergenceError,
                   message=lambda: f"{what} did not converge: relative residual "
                                   f"{_fmt(result.residual)} after {int(result.iterations)} iterations")


def power_iteration(matvec: Matvec, p: int, *, num_iters: int = 20, key: jax.Array | None = None,
                    dtype=jnp.float32) -> jax.Array:
    """Estimate the largest-magnitude eigenvalue of a symmetric operator (Rayleigh quotient).

    The estimate's magnitude is a lower bound on ``|lambda_max|``, typically within a few percent
    after 20 iterations. ``key`` seeds the start vector (default ``jax.random.key(0)``: it is
    only a probe).
    """
    key = jax.random.key(0) if key is None else key
    v = jax.random.normal(key, (p,), dtype)
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        w = matvec(v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(dtype).tiny)

    v = jax.lax.fori_loop(0, num_iters, body, v)
    return jnp.vdot(v, matvec(v))


# ---------------------------------------------------------------------------------------------
# direct

def solve_direct(H: jax.Array, b: jax.Array, *, damping: float = 0.0, method: str = "cholesky",
                 rcond: float | None = None, raise_on_fail: bool = True,
                 factor: jax.Array | None = None) -> SolveResult:
    """Dense solve of ``(H + damping I) x = b`` for a symmetric H [p, p].

    ``H`` is read as ``(H + H.T) / 2`` (``jnp.linalg.cholesky`` and ``eigh`` symmetrise). The
    system is accepted when ``A = H + damping I`` is positive definite with
    ``lambda_min(A) > rcond * lambda_max(A)``:

    * ``"cholesky"``: ``A = L L^T`` (a NaN factor means A is not positive definite); lambda_min is
      estimated by two steps of block inverse iteration on 4 random probes with the factor and
      lambda_max by 20 steps of power iteration (O(p^2) each, cheap next to the O(p^3/3)
      factorisation). The estimate of lambda_min is an upper bound: an exactly singular A is always
      caught; a merely ill-conditioned one may pass, with its residual reported.
    * ``"eigh"``: the full spectrum, ``x = V diag(1/w) V^T b`` (about 4x the cost of Cholesky).

    Args:
      H: [p, p] Hessian (without damping).
      b: [p] or [p, q] right-hand sides.
      damping: lambda >= 0 added to the diagonal.
      method: ``"cholesky"`` or ``"eigh"``.
      rcond: smallest accepted ``lambda_min / lambda_max``; default ``50 * eps`` of the dtype
        (6e-6 in float32, 1.1e-14 in float64).
      raise_on_fail: raise :class:`SingularHessianError` (else warn) when A is rejected and the
        result is concrete; inside jit only ``converged`` reports it.
      factor: optional lower Cholesky factor of ``(A + A^T) / 2`` that the caller already has
        (e.g. for self-influence); ``"cholesky"`` then skips the factorisation.

    Returns:
      :class:`SolveResult` with ``iterations = 1``.
    """
    H = jnp.asarray(H)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix [p, p]; got {list(H.shape)}")
    p = H.shape[0]
    bm, squeeze = _columns(b, "b", p)
    dtype = jnp.result_type(H.dtype, bm.dtype)
    H, bm = H.astype(dtype), bm.astype(dtype)
    rcond = 50 * float(jnp.finfo(dtype).eps) if rcond is None else rcond
    A = H + damping * jnp.eye(p, dtype=dtype)  # cholesky / eigh read it as (A + A^T) / 2
    if method == "cholesky":
        L = jnp.linalg.cholesky(A) if factor is None else jnp.asarray(factor, dtype)
        tri = jax.scipy.linalg.solve_triangular

        def inv(v):
            return tri(L.T, tri(L, v, lower=True), lower=False)

        # two steps of block inverse iteration on 4 probe vectors; the first rides along with b
        probe = jax.random.normal(jax.random.key(0), (p, 4), dtype)
        sol = inv(jnp.concatenate([bm, probe], axis=1))
        x, z = sol[:, :bm.shape[1]], sol[:, bm.shape[1]:]
        z = inv(z / _safe(_norms(z)))
        z = z / _safe(_norms(z))
        lam_min = jnp.min(jnp.sum(z * (A @ z), axis=0))
        lam_max = power_iteration(lambda u: A @ u, p, dtype=dtype)
        ok = jnp.all(jnp.isfinite(L))
    elif method == "eigh":
        w, V = jnp.linalg.eigh(A)
        x = V @ ((V.T @ bm) / w[:, None])
        lam_min, lam_max = w[0], w[-1]
        ok = jnp.all(jnp.isfinite(w))
    else:
        raise ValueError(f"unknown method {method!r}; choose 'cholesky' or 'eigh'")
    ok = ok & (lam_min > rcond * jnp.abs(lam_max)) & jnp.all(jnp.isfinite(x))
    residual = _norms(A @ x - bm) / _safe(_norms(bm))
    result = SolveResult(_uncolumns(x, squeeze), _uncolumns(residual, squeeze), jnp.asarray(1, jnp.int32), ok)
    return _report(
        result, raise_on_fail=raise_on_fail, error=SingularHessianError,
        message=lambda: (f"H + {damping:g} I is singular or not positive definite ({method}: smallest "
                         f"eigenvalue ~ {float(lam_min):.3g}, largest ~ {float(lam_max):.3g}, "
                         f"accepted ratio > {rcond:.2g}); add damping or check that theta is a minimum"))


# ---------------------------------------------------------------------------------------------
# conjugate gradients

def solve_cg(matvec: Matvec, b: jax.Array, *, damping: float = 0.0, tol: float = 1e-6,
             maxiter: int | None = None, x0: jax.Array | None = None,
             preconditioner: Matvec | None = None, check_tol: float | None = None,
             raise_on_fail: bool = True) -> SolveResult:
    """(Preconditioned) conjugate gradients for ``(H + damping I) x = b``, all columns at once.

    One ``lax.while_loop`` runs until every column's recursive relative residual is <= ``tol`` or
    ``maxiter`` is reached; a converged column is frozen while the others continue, and a column
    meeting non-positive curvature (``d^T A d <= 0``: A indefinite) stops. Afterwards the true
    residual ``||A x - b|| / ||b||`` is re-computed from ``x`` with one more product.

    ``converged`` requires (i) every column reached ``tol`` in the loop, (ii) no non-positive
    curvature, and (iii) the re-checked residual <= ``check_tol + 10 eps ||A|| ||x|| / ||b||``. The
    second term is the residual that rounding x to the working precision alone causes (||A|| is
    the largest Rayleigh quotient seen in the loop): in float32 with ``||x|| / ||b|| = 1e3`` a
    perfectly solved system shows a true residual near 1e-4.

    The loop never applies ``matvec`` to a constant zero vector (with ``x0=None`` the first
    residual is ``b`` itself), which avoids the XLA:CPU forward-mode bug of DESIGN.md.

    Args:
      matvec: ``v [p] -> H v [p]`` (symmetric; mapped over columns with vmap).
      b: [p] or [p, q].
      damping: lambda added to H.
      tol: stopping tolerance on the (recursive) relative residual.
      maxiter: iteration bound; default ``10 * p``.
      x0: optional start [p] / [p, q] (default 0).
      preconditioner: optional ``r [p] -> M^{-1} r`` (symmetric positive definite), e.g. the inverse
        diagonal of A.
      check_tol: bound on the re-checked residual (plus the rounding term); default ``10 * tol``.
      raise_on_fail: raise :class:`NonConvergenceError` (else warn with the residual) when the
        concrete result has not converged.

    Returns:
      :class:`SolveResult`; ``iterations`` counts loop steps (matvecs per column).
    """
    bm, squeeze = _columns(b)
    p, q = bm.shape
    maxiter = 10 * p if maxiter is None else int(maxiter)
    check_tol = 10 * tol if check_tol is None else check_tol
    A = _column_op(matvec, damping)
    M = (lambda r: r) if preconditioner is None else jax.vmap(preconditioner, in_axes=1, out_axes=1)
    bnorm = _safe(_norms(bm))
    if x0 is None:
        x, r = jnp.zeros_like(bm), bm
    else:
        x, _ = _columns(x0, "x0", p)
        x = jnp.broadcast_to(x.astype(bm.dtype), bm.shape)
        r = bm - A(x)
    z = M(r)
    zeros = jnp.zeros(q, bm.dtype)
    init = (jnp.asarray(0, jnp.int32), x, r, z, jnp.sum(r * z, axis=0), jnp.zeros(q, bool), zeros)

    def active(state):
        _, _, r, _, _, stopped, _ = state
        return (_norms(r) / bnorm > tol) & ~stopped

    def cond(state):
        return (state[0] < maxiter) & jnp.any(active(state))

    def body(state):
        k, x, r, d, rz, stopped, anorm = state
        act = active(state)
        Ad = A(d)
        dAd = jnp.sum(d * Ad, axis=0)
        dd = jnp.sum(d * d, axis=0)
        anorm = jnp.maximum(anorm, jnp.where(act & (dd > 0), jnp.abs(dAd) / jnp.where(dd > 0, dd, 1.0), 0.0))
        curv_ok = dAd > 0
        step = act & curv_ok
        alpha = jnp.where(step, rz / jnp.where(curv_ok, dAd, 1.0), 0.0)
        x = x + alpha * d
        r = r - alpha * Ad
        z = M(r)
        rz_new = jnp.sum(r * z, axis=0)
        beta = jnp.where(step, rz_new / jnp.where(rz != 0, rz, 1.0), 0.0)
        d = jnp.where(step, z + beta * d, d)
        rz = jnp.where(step, rz_new, rz)
        stopped = stopped | (act & ~curv_ok) | ~jnp.isfinite(rz_new)
        return k + 1, x, r, d, rz, stopped, anorm

    final = jax.lax.while_loop(cond, body, init)
    k, x, _, _, _, stopped, anorm = final
    residual = _norms(A(x) - bm) / bnorm
    floor = 10 * jnp.finfo(bm.dtype).eps * anorm * _norms(x) / bnorm
    converged = (~jnp.any(active(final)) & ~jnp.any(stopped)
                 & jnp.all(residual <= check_tol + floor))
    result = SolveResult(_uncolumns(x, squeeze), _uncolumns(residual, squeeze), k, converged)
    return _report(
        result, raise_on_fail=raise_on_fail, error=NonConvergenceError,
        message=lambda: (f"CG did not converge: relative residual {_fmt(residual)} after {int(k)} "
                         f"iterations (tol {tol:g}, maxiter {maxiter})"
                         + ("; non-positive curvature met: H + damping I is not positive definite, "
                            "add damping" if bool(jnp.any(stopped)) else
                            "; increase maxiter or damping, or precondition")))


# ---------------------------------------------------------------------------------------------
# LiSSA

def solve_lissa(matvec: Matvec, b: jax.Array, *, damping: float = 0.0, scale: float | None = None,
                depth: int = 10_000, tol: float = 1e-5, divergence: float = 1e4,
                check_tol: float | None = None, key: jax.Array | None = None,
                raise_on_fail: bool = True) -> SolveResult:
    """LiSSA (Agarwal et al. 2017; Koh & Liang 2017): a truncated Neumann series for A^{-1} b.

    With ``A = H + damping I`` and ``h_0 = 0``, the recursion

        h_{t+1} = b + h_t - A h_t / scale,    x_t = h_t / scale

    gives ``x_t = (1/scale) sum_{k<t} (I - A/scale)^k b -> A^{-1} b``. (Koh & Liang write
    ``h_{t+1} = b + (1 - d) h_t - H h_t / s``, i.e. this recursion with damping ``d * s``.) It
    converges iff ``0 < lambda(A) < 2 * scale``, at the rate ``1 - lambda_min / scale`` per step.
    Since ``b - A x_t = h_{t+1} - h_t`` the residual is known at every step: the loop stops once
    every column's relative residual is <= ``tol``. It is declared divergent when a residual
    exceeds ``divergence * ||b||`` or becomes non-finite (scale too small, or A indefinite).

    Args:
      matvec: ``v [p] -> H v [p]`` (a full-data product; deterministic).
      b: [p] or [p, q].
      damping: lambda added to H.
      scale: must exceed ``lambda_max(A) / 2``; default: a 20-step power-iteration estimate of
        ``lambda_max(A)`` (multiplied by 1.05 for safety).
      depth: maximum number of recursion steps.
      tol: stopping tolerance on the relative residual.
      divergence: residual growth factor (relative to ``||b||``) that counts as divergence.
      check_tol: re-checked residual bound for ``converged`` (plus the rounding term of
        :func:`solve_cg`, with ``||A|| ~ scale``); default ``10 * tol``.
      key: seed of the power iteration's probe vector.
      raise_on_fail: raise :class:`DivergenceError` / :class:`NonConvergenceError` (else warn) for a
        concrete failed result.

    Returns:
      :class:`SolveResult`; ``iterations`` is the number of recursion steps taken.
    """
    bm, squeeze = _columns(b)
    p, _ = bm.shape
    check_tol = 10 * tol if check_tol is None else check_tol
    A = _column_op(matvec, damping)
    if scale is None:
        scale = 1.05 * jnp.abs(power_iteration(lambda v: A(v[:, None])[:, 0], p, key=key, dtype=bm.dtype))
    scale = jnp.asarray(scale, bm.dtype)
    bnorm = _safe(_norms(bm))

    eps = jnp.finfo(bm.dtype).eps

    def floor(h):  # the residual that rounding x = h / scale alone causes (see solve_cg)
        return 10 * eps * _norms(h) / bnorm

    def cond(state):
        k, _, done, diverged = state
        return (k < depth) & ~jnp.all(done) & ~jnp.any(diverged)

    def body(state):
        k, h, _, diverged = state
        r = bm - A(h) / scale  # = b - A x_t
        rel = _norms(r) / bnorm
        diverged = diverged | ~jnp.isfinite(rel) | (rel > divergence)
        return k + 1, h + r, rel <= tol + floor(h), diverged

    init = (jnp.asarray(0, jnp.int32), jnp.zeros_like(bm), jnp.zeros(bm.shape[1], bool),
            jnp.zeros(bm.shape[1], bool))
    k, h, _, diverged = jax.lax.while_loop(cond, body, init)
    x = h / scale
    residual = _norms(A(x) - bm) / bnorm
    any_div = jnp.any(diverged) | ~jnp.all(jnp.isfinite(residual))
    converged = ~any_div & jnp.all(residual <= check_tol + floor(h))
    result = SolveResult(_uncolumns(x, squeeze), _uncolumns(residual, squeeze), k, converged)
    if _is_concrete(any_div) and bool(any_div):
        return _report(result, raise_on_fail=raise_on_fail, error=DivergenceError,
                       message=lambda: (f"LiSSA diverged after {int(k)} steps (scale {float(scale):.4g}): "
                                        f"the residual grew past {divergence:g} x ||b|| or became "
                                        "non-finite; scale must exceed lambda_max(H + damping I) / 2 "
                                        "and H + damping I must be positive definite"))
    return _report(result, raise_on_fail=raise_on_fail, error=NonConvergenceError,
                   message=lambda: (f"LiSSA did not converge: relative residual {_fmt(residual)} after "
                                    f"{int(k)} steps (scale {float(scale):.4g}, depth {depth}); it needs "
                                    "about (scale / lambda_min) * ln(1/tol) steps: raise depth or damping"))


# ---------------------------------------------------------------------------------------------
# Arnoldi / low rank

def arnoldi(matvec: Matvec, p: int, *, rank: int, num_iters: int, key: jax.Array,
            dtype=jnp.float32) -> LowRank:
    """Top-``rank`` eigenpairs of a symmetric operator by Arnoldi iteration (Schioppa et al. 2022).

    ``num_iters`` steps build an orthonormal Krylov basis Q [p, n] (full re-orthogonalisation,
    Gram-Schmidt applied twice) and the projected matrix T = Q^T H Q [n, n] (Hessenberg; symmetric
    tridiagonal up to rounding for symmetric H, so it is symmetrised and diagonalised with eigh).
    The Ritz pairs of largest |eigenvalue| are returned. If the Krylov space becomes invariant
    (e.g. H of rank < n), the iteration restarts from a fresh random vector orthogonal to Q, so
    ``num_iters = p`` recovers the full spectrum exactly.

    Args:
      matvec: ``v [p] -> H v [p]`` (no damping: it is applied in :func:`solve_lowrank`).
      p: dimension.
      rank: r <= num_iters, number of eigenpairs kept.
      num_iters: n <= p, Krylov dimension (matvecs). Schioppa et al. use n of a few times r.
      key: PRNG key for the start (and restart) vectors.
      dtype: float dtype of the basis.

    Returns:
      :class:`LowRank` with eigenvalues ordered by decreasing magnitude.
    """
    if not 1 <= rank <= num_iters <= p:
        raise ValueError(f"arnoldi needs 1 <= rank <= num_iters <= p; got rank={rank}, "
                         f"num_iters={num_iters}, p={p}")
    n = int(num_iters)
    eps = jnp.finfo(dtype).eps

    def orthogonalise(Q, w):
        for _ in range(2):
            h = Q @ w
            w = w - Q.T @ h
        return w

    def random_unit(k, Q):
        v = orthogonalise(Q, jax.random.normal(jax.random.fold_in(key, k), (p,), dtype))
        return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(dtype).tiny)

    Q0 = jnp.zeros((n + 1, p), dtype)
    Q0 = Q0.at[0].set(random_unit(0, Q0))

    def body(k, state):
        Q, T = state
        w0 = matvec(Q[k]).astype(dtype)
        h1 = Q @ w0  # rows > k of Q are still zero
        w = w0 - Q.T @ h1
        h2 = Q @ w
        w = w - Q.T @ h2
        h = h1 + h2
        beta = jnp.linalg.norm(w)
        breakdown = beta <= 10 * eps * jnp.maximum(jnp.linalg.norm(w0), jnp.linalg.norm(h))
        q_next = jax.lax.cond(breakdown, lambda: random_unit(k + 1, Q),
                              lambda: w / jnp.where(breakdown, 1.0, beta))
        h = h.at[k + 1].set(jnp.where(breakdown, 0.0, beta))
        return Q.at[k + 1].set(q_next), T.at[:, k].set(h)

    Q, T = jax.lax.fori_loop(0, n, body, (Q0, jnp.zeros((n + 1, n), dtype)))
    T = T[:n]
    w, V = jnp.linalg.eigh(0.5 * (T + T.T))
    top = jnp.argsort(-jnp.abs(w))[:rank]
    return LowRank(w[top], Q[:n].T @ V[:, top])


def solve_lowrank(lowrank: LowRank, b: jax.Array, *, damping: float = 0.0,
                  complement: str = "ignore", matvec: Matvec | None = None, tol: float | None = None,
                  raise_on_fail: bool = True) -> SolveResult:
    """Inverse of ``H + damping I`` using the top-r eigenpairs ``H ~= V diag(l) V^T``.

    ``x = V diag(1 / (l + damping)) V^T b`` on the subspace. The complement (directions outside
    span V, whose eigenvalues are below those kept) is handled by ``complement``:

    * ``"ignore"`` (Schioppa et al. 2022): the component of b outside span V is dropped, i.e. the
      influence is computed in the top-r subspace only;
    * ``"damping"``: H is taken as 0 there, so that component is divided by ``damping`` (exact when
      H has rank r; needs ``damping > 0``).

    Args:
      lowrank: from :func:`arnoldi`.
      b: [p] or [p, q].
      damping: lambda added to H.
      complement: ``"ignore"`` or ``"damping"``.
      matvec: optional ``v -> H v`` to compute the true residual. Without it the residual is the
        dropped fraction ``||(I - V V^T) b|| / ||b||`` for ``"ignore"`` (the true residual when the
        eigenvectors are exact) and NaN for ``"damping"``.
      tol: if given, ``converged`` also requires ``residual <= tol``.
      raise_on_fail: raise :class:`SingularHessianError` if some ``l + damping <= 0``, and
        :class:`NonConvergenceError` if ``tol`` is given and missed (else warn).

    Returns:
      :class:`SolveResult` with ``iterations = 0``.
    """
    if complement not in ("ignore", "damping"):
        raise ValueError(f"complement must be 'ignore' or 'damping'; got {complement!r}")
    if complement == "damping" and not damping > 0:
        raise ValueError("complement='damping' divides by damping: it must be > 0")
    lam, V = lowrank
    bm, squeeze = _columns(b, "b", V.shape[0])
    bm = bm.astype(V.dtype)
    denom = lam + damping
    coef = V.T @ bm
    x = V @ (coef / denom[:, None])
    outside = bm - V @ coef
    if complement == "damping":
        x = x + outside / damping
    bnorm = _safe(_norms(bm))
    if matvec is not None:
        residual = _norms(_column_op(matvec, damping)(x) - bm) / bnorm
    elif complement == "ignore":
        residual = _norms(outside) / bnorm
    else:
        residual = jnp.full(bm.shape[1], jnp.nan, bm.dtype)
    positive = jnp.all(denom > 0)
    ok = positive & jnp.all(jnp.isfinite(x))
    if tol is not None:
        ok = ok & jnp.all(residual <= tol)
    result = SolveResult(_uncolumns(x, squeeze), _uncolumns(residual, squeeze), jnp.asarray(0, jnp.int32), ok)
    if _is_concrete(positive) and not bool(positive):
        return _report(result, raise_on_fail=raise_on_fail, error=SingularHessianError,
                       message=lambda: (f"low-rank H + {damping:g} I has non-positive eigenvalues "
                                        f"(min {float(jnp.min(denom)):.3g}); add damping"))
    return _report(result, raise_on_fail=raise_on_fail, error=NonConvergenceError,
                   message=lambda: f"low-rank solve residual {_fmt(residual)} exceeds tol {tol}")


# ---------------------------------------------------------------------------------------------
# one API

def _as_matvec(A) -> Matvec:
    if callable(A):
        return A
    A = jnp.asarray(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a matvec or a square matrix [p, p]; got shape {list(A.shape)}")
    return lambda v: A @ v


def _as_dense(A, p: int, dtype) -> jax.Array:
    if callable(A):
        return jax.vmap(A, in_axes=1, out_axes=1)(jnp.eye(p, dtype=dtype))
    return jnp.asarray(A)


_SOLVERS = {"direct": solve_direct, "cg": solve_cg, "lissa": solve_lissa}
_ARNOLDI_KW = {"rank", "num_iters", "key", "damping", "complement", "tol", "raise_on_fail"}


def make_solver(name: str, **kw) -> Callable[[Matvec | jax.Array, jax.Array], SolveResult]:
    """One API for every solver: ``solve = make_solver(name, **kw); solve(H_or_matvec, b)``.

    Args:
      name: ``"direct"`` (a dense H, or a matvec that is expanded to one with p products),
        ``"cg"``, ``"lissa"`` (a matvec, or a dense H used as ``H @ v``) or ``"arnoldi"`` (same;
        needs ``rank``, ``num_iters`` and ``key``; the decomposition is recomputed per call, and
        the residual is the true one).
      **kw: the keyword arguments of :func:`solve_direct`, :func:`solve_cg`, :func:`solve_lissa`,
        or (arnoldi) ``rank, num_iters, key, damping, complement, tol, raise_on_fail``.

    Returns:
      ``solve(H_or_matvec, b) -> SolveResult``.
    """
    if name == "arnoldi":
        allowed = _ARNOLDI_KW
        missing = {"rank", "num_iters", "key"} - set(kw)
        if missing:
            raise ValueError(f"make_solver('arnoldi') needs {sorted(missing)}")
    elif name in _SOLVERS:
        params = inspect.signature(_SOLVERS[name]).parameters
        allowed = {k for k, v in params.items() if v.kind == inspect.Parameter.KEYWORD_ONLY}
    else:
        raise ValueError(f"unknown solver {name!r}; choose 'direct', 'cg', 'lissa' or 'arnoldi'")
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"make_solver({name!r}) got unknown arguments {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")

    def solve(A, b) -> SolveResult:
        b = jnp.asarray(b)
        if name == "direct":
            return solve_direct(_as_dense(A, b.shape[0], b.dtype), b, **kw)
        mv = _as_matvec(A)
        if name == "arnoldi":
            lr = arnoldi(mv, b.shape[0], rank=kw["rank"], num_iters=kw["num_iters"], key=kw["key"],
                         dtype=b.dtype if jnp.issubdtype(b.dtype, jnp.floating) else jnp.float32)
            rest = {k: v for k, v in kw.items() if k not in ("rank", "num_iters", "key")}
            return solve_lowrank(lr, b, matvec=mv, **rest)
        return _SOLVERS[name](mv, b, **kw)

    return solve
