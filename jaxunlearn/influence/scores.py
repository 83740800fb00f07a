"""Influence scores for any measurement, through one code path.

Convention (DESIGN.md, binding). For a model trained to a minimum θ̂ of

    L(θ) = (1/n) sum_i w_i ell_i(θ) + (l2/2) ||θ||^2        (jaxunlearn.train's objective)

the score of training sample i for a measurement m is the predicted change of m, in m's own units,
if i were removed:

    score_i = (1/n) ∇m(θ̂)^T H^{-1} ∇ell_i(θ̂),        H = ∇^2 L(θ̂) (regulariser included),

from θ̂_{-i} - θ̂ ≈ (1/n) H^{-1} ∇ell_i (seed 004 eq. (2)). A negative score for a fairness or
robustness measurement means removing i would reduce unfairness / adversarial loss. "Removed" means
sample i's weight set to 0 with the normaliser n kept (seed 004 eq. (1)); retraining with
:func:`jaxunlearn.losses.weighted_mean`'s normaliser n - 1 instead shifts every θ̂_{-i} by the same
first-order amount, so it moves all actual changes by one constant.

Seed 004's vectors ``I_util``, ``I_fair``, ``I_robust`` (eqs. (3)-(5)) drop the 1/n and take the
utility and robustness measurements as *sums* over the validation set:

    I_util(z_i; -1)   = n * score_i[utility(reduction="sum")]
    I_fair(z_i; -1)   = n * score_i[demographic_parity / equal_opportunity]
    I_robust(z_i; -1) = n * score_i[utility(reduction="sum") on the adversarial batch]

which :func:`influence_scores` returns with ``scale="seed004"``.

How: one inverse-HVP solve per *measurement* (``H x_m = ∇m``, all measurements as the columns of
one solve, by any solver object of :mod:`jaxunlearn.influence.solvers`: ``Direct()``,
``CG(tol=...)``, ``LiSSA(...)``, ``Arnoldi(...)``), then ``scores = G x / n`` with G
the per-sample training gradients -- never a solve per training sample. A :class:`Problem` holds
what this needs as pure functions of a pytree of arrays (passed to jit as arguments, never closed
over): :func:`make_problem` builds it by autodiff for any model and parameter subset,
:func:`jaxunlearn.influence.last_layer.make_problem` in closed form for a linear head.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from jaxunlearn import losses
from jaxunlearn.influence import grads as _grads
from jaxunlearn.influence import hvp as _hvp
from jaxunlearn.influence import measurements as _measurements
from jaxunlearn.influence import solvers as _solvers
from jaxunlearn.influence.solvers import DenseFactor, Direct, LinearOperator, Solver
from jaxunlearn.models.api import as_apply

__all__ = [
    "Problem",
    "InfluenceResult",
    "NonStationaryError",
    "NonStationaryWarning",
    "SCALES",
    "make_problem",
    "model_loss",
    "stationarity",
    "measurement_gradients",
    "influence_scores",
    "self_influence",
    "HESSIAN_CHUNK",
]

SCALES = ("change", "seed004")


class NonStationaryError(ValueError):
    """θ is not a stationary point of the training objective: influence scores are not valid."""


class NonStationaryWarning(RuntimeWarning):
    """Issued instead of :class:`NonStationaryError` with ``on_nonstationary="warn"``."""


class Problem(NamedTuple):
    """What influence needs about a trained model, as pure functions of ``data``.

    Flat vectors [p] are over the differentiated parameters (a subset if one was selected).

    Attributes:
      data: pytree of arrays (parameters at θ̂, training data, weights); the functions below take
        it as their first argument so that it can be a jit argument.
      flat: [p] the differentiated parameters at θ̂.
      num_train: n rows of the per-sample gradient matrix G (training rows, padding included).
      normalizer: the n of the objective's ``(1/n) sum_i w_i ell_i``.
      gradient: ``data -> ∇L [p]`` (regulariser included): the stationarity check.
      hvp: ``(data, V [p] or [p, q]) -> H V``.
      hessian: ``data -> H [p, p]``.
      grads_dot: ``(data, V [p, q]) -> G V [n, q]`` (0 on padding rows).
      grads_tdot: ``(data, U [n] or [n, q]) -> G^T U [p] or [p, q]`` (padding rows count 0),
        e.g. ``sum_i eps_i ∇ell_i`` for the influence update.
      grads_rows: ``(data, index [c]) -> G[index] [c, p]``.
      params_from_flat: ``(data, flat [p]) -> params`` as the measurements take them.
      self_influence: optional specialised ``(data, cholesky, chunk_size) -> [n]``.
      preconditioner: optional ``(data, damping) -> (R [p, q] -> M^{-1} R)``, M ~ H + damping I
        (used by :class:`~jaxunlearn.influence.solvers.CG`).
    """

    data: Any
    flat: jax.Array
    num_train: int
    normalizer: float
    gradient: Callable
    hvp: Callable
    hessian: Callable
    grads_dot: Callable
    grads_tdot: Callable
    grads_rows: Callable
    params_from_flat: Callable
    self_influence: Callable | None = None
    preconditioner: Callable | None = None


class InfluenceResult(NamedTuple):
    """Output of :func:`influence_scores`.

    Attributes:
      scores: ``{name: [n]}`` predicted change of each measurement when each sample is removed
        (times n with ``scale="seed004"``).
      directions: ``{name: [p]}`` the solutions ``H^{-1} ∇m`` (reusable, e.g. for IF updates).
      measure_grads: ``{name: [p]}`` the measurement gradients ``∇m``.
      values: ``{name: float}`` the measurements at θ̂ (NaN when given as a gradient).
      grad_norm: ``||∇L(θ̂)||``, the stationarity check.
      solve: the :class:`~jaxunlearn.influence.solvers.SolveResult` (residual per measurement).
      self_influence: [n] exact self-influence (:func:`self_influence`) when requested with
        ``with_self_influence=True`` (sharing the Hessian with the solve), else None.
      factor: the :class:`~jaxunlearn.influence.solvers.DenseFactor` (H and its Cholesky factor)
        when one was formed (direct solve or self-influence), else None; pass it to
        :func:`self_influence`, :func:`influence_scores` or the influence update to reuse it.
    """

    scores: dict
    directions: dict
    measure_grads: dict
    values: dict
    grad_norm: float
    solve: Any
    self_influence: Any = None
    factor: Any = None


# ----------------------------------------------------------------------------- generic problem


def model_loss(apply_fn, *, loss_fn=losses.cross_entropy, model_state: dict | None = None):
    """Per-example loss ``loss(params, batch) -> [B]`` of a model in eval mode (for :func:`make_problem`)."""

    def loss(params, batch):
        logits, _ = as_apply(apply_fn)({"params": params, **(model_state or {})}, batch["x"], train=False)
        return loss_fn(logits, batch["y"])

    loss.check_labels = _measurements.label_check(apply_fn, model_state)
    return loss


def _batch_weight(batch, n, dtype):
    w = batch.get("weight") if isinstance(batch, Mapping) else None
    return jnp.ones((n,), dtype) if w is None else jnp.asarray(w).astype(dtype)


def _take_rows(batch, index):
    return jax.tree_util.tree_map(lambda a: a[index] if jnp.ndim(a) >= 1 else a, batch)


def _row_chunks(n: int, chunk_size: int | None):
    c = n if chunk_size is None else int(min(chunk_size, n))
    if c <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    nc = -(-n // c)
    index = np.arange(nc * c) % n  # padding repeats real rows; sliced off afterwards
    return jnp.asarray(index.reshape(nc, c).astype(np.int32))


class _Fns(NamedTuple):
    gradient: Callable
    hvp: Callable
    hessian: Callable
    grads_dot: Callable
    grads_tdot: Callable
    grads_rows: Callable
    params_from_flat: Callable


@dataclasses.dataclass(frozen=True)
class _Autodiff:
    """The autodiff functions of a :class:`Problem` for one loss and its static settings.

    A value, not a cache: two problems built with the same ``loss_fn`` object and settings hold
    equal objects, so the jitted scoring functions (which take the problem's functions as static
    arguments) reuse their compilations through jit's own cache. Parameter structure and sizes
    come from ``data``.
    """

    loss_fn: Callable
    l2: float
    chunk_size: int | None
    hvp_mode: str
    hessian_chunk_size: int

    def _objective(self, p, fz, b):
        return _grads.make_mean_objective(self.loss_fn, l2=self.l2, frozen=fz)(p, b)

    def gradient(self, data):
        return _grads.flatten_params(jax.grad(self._objective)(data["params"], data["frozen"], data["batch"]))[0]

    def hvp(self, data, V):
        return _hvp.make_flat_hvp(self._objective, data["params"], data["frozen"], data["batch"],
                                  mode=self.hvp_mode)(V)

    def hessian(self, data):
        return _hvp.dense_hessian(self._objective, data["params"], data["frozen"], data["batch"],
                                  chunk_size=self.hessian_chunk_size)

    def grads_dot(self, data, V):
        fz, b = data["frozen"], data["batch"]
        f0, unravel = _grads.flatten_params(data["params"])
        n = _grads.batch_size_of(b)
        Vm = V[:, None] if V.ndim == 1 else V

        def rows(index):
            sub = _take_rows(b, index)
            _, lin = jax.linearize(lambda f: self.loss_fn(_full(unravel(f), fz), sub), f0)
            return jax.vmap(lin, in_axes=1, out_axes=1)(Vm)  # [c, q]: g_i^T v by forward mode

        out = jax.lax.map(rows, _row_chunks(n, self.chunk_size)).reshape(-1, Vm.shape[1])[:n]
        out = out * (_batch_weight(b, n, out.dtype) != 0)[:, None]
        return out[:, 0] if V.ndim == 1 else out

    def grads_tdot(self, data, U):
        fz, b = data["frozen"], data["batch"]
        f0, unravel = _grads.flatten_params(data["params"])
        n = _grads.batch_size_of(b)
        Um = (U[:, None] if U.ndim == 1 else U).astype(f0.dtype)
        Um = Um * (_batch_weight(b, n, Um.dtype) != 0)[:, None]
        index = _row_chunks(n, self.chunk_size)
        nc, c = index.shape
        Uc = jnp.concatenate([Um, jnp.zeros((nc * c - n, Um.shape[1]), Um.dtype)]).reshape(nc, c, -1)

        def body(acc, args):  # sum_i u_i g_i by reverse mode over a chunk of rows
            idx, u = args
            sub = _take_rows(b, idx)
            _, vjp = jax.vjp(lambda f: self.loss_fn(_full(unravel(f), fz), sub), f0)
            return acc + jax.vmap(lambda col: vjp(col.astype(f0.dtype))[0], in_axes=1, out_axes=1)(u), None

        acc, _ = jax.lax.scan(body, jnp.zeros((f0.shape[0], Um.shape[1]), f0.dtype), (index, Uc))
        return acc[:, 0] if U.ndim == 1 else acc

    def grads_rows(self, data, index):
        sub = _take_rows(data["batch"], index)
        return _grads.per_sample_grads_flat(self.loss_fn, data["params"], sub, frozen=data["frozen"],
                                            chunk_size=self.chunk_size)

    def params_from_flat(self, data, f):
        return _full(_grads.flatten_params(data["params"])[1](f), data["frozen"])


def _full(p, fz):
    return p if fz is None else _grads.combine(p, fz)


@dataclasses.dataclass(frozen=True)
class _Method:
    """``owner.name`` as a callable that compares by value (bound methods compare by identity)."""

    owner: Any
    name: str

    def __call__(self, *args):
        return getattr(self.owner, self.name)(*args)


HESSIAN_CHUNK = 256  # Hessian columns per chunk (2,560 columns at once: 11 GB, 151 s on workload A)


def make_problem(loss_fn: Callable, params, batch: dict, *, l2: float = 0.0, select=None,
                 chunk_size: int | None = None, hvp_mode: str = _hvp.DEFAULT_MODE,
                 hessian_chunk_size: int | None = None) -> Problem:
    """The autodiff :class:`Problem` for any model and parameter subset.

    Flat vectors follow :func:`~jaxunlearn.influence.grads.flatten_params` (``ravel_pytree``:
    dict keys sorted), the same order as the closed-form
    :func:`jaxunlearn.influence.last_layer.make_problem` (``{"bias", "kernel"}``: bias first).

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example, unweighted losses, examples treated
        independently (eval mode); e.g. :func:`model_loss`. Reuse the same function object across
        calls to reuse compilations.
      params: the full parameter pytree at θ̂.
      batch: the training set as one batch ``{"x", "y", "weight"?, ...}`` (weight 0 = padding).
      l2: the objective's L2 coefficient (on the differentiated parameters).
      select: None (all parameters) or a subset as in :func:`jaxunlearn.influence.grads.partition`:
        a bool mask pytree with ``params``' structure (Python bools, e.g.
        :func:`jaxunlearn.models.partition.last_k_mask`), ``"head"``, a list of block prefixes, or
        a predicate; the rest is held fixed.
      chunk_size: rows per chunk for per-sample gradients and ``G V`` (memory bound); None: all.
      hvp_mode: the HVP composition (:mod:`jaxunlearn.influence.hvp`).
      hessian_chunk_size: columns per chunk when forming the dense Hessian; None: 256
        (:data:`HESSIAN_CHUNK`). The Hessian is never formed with all p tangents at once.
    """
    if hessian_chunk_size is not None and int(hessian_chunk_size) <= 0:
        raise ValueError(f"hessian_chunk_size must be a positive int or None, got {hessian_chunk_size!r}")
    if select is None:
        sel, frozen = params, None
    else:
        sel, frozen = _grads.partition(params, select)
    if hasattr(loss_fn, "check_labels"):
        loss_fn.check_labels(params, batch, "the training batch's")
    flat, _ = _grads.flatten_params(sel)
    n = _grads.batch_size_of(batch)
    w = np.asarray(_batch_weight(batch, n, flat.dtype))
    hc = int(min(HESSIAN_CHUNK if hessian_chunk_size is None else hessian_chunk_size, flat.shape[0]))
    ad = _Autodiff(loss_fn, float(l2), None if chunk_size is None else int(chunk_size), hvp_mode, hc)
    fns = {name: _Method(ad, name) for name in _Fns._fields}
    return Problem(data={"params": sel, "frozen": frozen, "batch": batch}, flat=flat, num_train=n,
                   normalizer=float(max(np.count_nonzero(w), 1)), **fns)


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("fn",))
def _call(data, *args, fn):
    return fn(data, *args)


def stationarity(problem: Problem) -> float:
    """``||∇L(θ̂)||`` (Euclidean, regulariser included). Influence assumes it is ~0."""
    g = _call(problem.data, fn=problem.gradient)
    _grads.check_finite(g, "training gradients")
    return float(jnp.linalg.norm(g))


def _check_stationary(gn: float, tol: float | None, on_nonstationary: str) -> None:
    if on_nonstationary not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_nonstationary must be 'warn', 'raise' or 'ignore', got {on_nonstationary!r}")
    if not np.isfinite(gn):
        raise _grads.NonFiniteError(f"the training gradient is not finite (norm {gn}); check the model and data")
    if tol is None or on_nonstationary == "ignore" or gn <= tol:
        return
    msg = (f"||grad L(theta)|| = {gn:.3g} > {tol:g}: theta is not a minimum of the training objective "
           "(with its L2 term), so influence scores are unreliable. Train to convergence (e.g. "
           "last_layer.refit_head / a full-batch solver) or raise stationarity_tol.")
    if on_nonstationary == "raise":
        raise NonStationaryError(msg)
    warnings.warn(msg, NonStationaryWarning, stacklevel=3)


def _split_measures(problem: Problem, measures: Mapping[str, Any]):
    """``(names, fns, batches, given)``: callables with their batches, and gradients given directly."""
    if not measures:
        raise ValueError("no measurement given")
    p = problem.flat.shape[0]
    names, fns, batches, given = [], [], [], {}
    for name, spec in measures.items():
        if isinstance(spec, tuple):
            if len(spec) != 2 or not callable(spec[0]):
                raise ValueError(f"measurement {name!r} must be (measure, batch) or a [p] gradient")
            measure, batch = spec
            validate = getattr(measure, "validate", None)
            if validate is not None:
                validate(batch)
            labels = getattr(measure, "check_labels", None)
            if labels is not None:
                labels(problem.params_from_flat(problem.data, problem.flat), batch,
                       f"measurement {name!r}: its batch's")
            names.append(name)
            fns.append(measure)
            batches.append(batch)
        else:
            g = jnp.asarray(spec, problem.flat.dtype)
            if g.shape != (p,):
                raise ValueError(f"gradient of measurement {name!r} has shape {list(g.shape)}, "
                                 f"expected [{p}] (the differentiated parameters)")
            given[name] = g
    return names, tuple(fns), batches, given


def _measure_grads(data, flat, batches, *, params_from_flat, measures):
    vals, grads = [], []
    for m, b in zip(measures, batches):
        v, g = jax.value_and_grad(lambda f: m(params_from_flat(data, f), b))(flat)
        vals.append(v)
        grads.append(g)
    return vals, grads


_measure_grads_jit = jax.jit(_measure_grads, static_argnames=("params_from_flat", "measures"))


def measurement_gradients(problem: Problem, measures: Mapping[str, Any]) -> tuple[dict, dict]:
    """``∇m`` [p] for each measurement, in the problem's flat coordinates.

    Args:
      problem: a :class:`Problem`.
      measures: ``{name: (measure, batch)}`` with ``measure(params, batch) -> scalar`` (e.g. from
        :mod:`jaxunlearn.influence.measurements`), or ``{name: gradient [p]}`` given directly.

    Returns:
      ``(grads {name: [p]}, values {name: float})`` (value NaN for a given gradient).

    Raises:
      ValueError: a measurement's groups are absent from its batch, or a gradient has the wrong
        shape; :class:`~jaxunlearn.influence.grads.NonFiniteError` for NaN/inf gradients.
    """
    names, fns, batches, given = _split_measures(problem, measures)
    vals, grads = ([], []) if not fns else _measure_grads_jit(
        problem.data, problem.flat, batches, params_from_flat=problem.params_from_flat, measures=fns)
    out = dict(zip(names, grads))
    values = {k: float(v) for k, v in zip(names, vals)}
    for name in measures:
        if name in given:
            out[name], values[name] = given[name], float("nan")
        _grads.check_finite(out[name], f"gradient of measurement {name!r}")
    return {k: out[k] for k in measures}, {k: values[k] for k in measures}


def _operator(data, fns, pre=None) -> LinearOperator:
    """H of the problem as a solver operator: its block HVP, dense Hessian and preconditioner."""
    return LinearOperator(lambda V: fns.hvp(data, V), lambda: fns.hessian(data),
                          None if pre is None else (lambda damping: pre(data, damping)))


def _si_from_factor(data, L, normalizer, *, fns, special, num_train, chunk_size):
    """Self-influence [n] from the factor ``L`` of the damped Hessian (the closed form if any)."""
    if special is not None:
        return special(data, L, chunk_size)

    def body(index):
        G = fns.grads_rows(data, index)
        Z = solve_triangular(L, G.T.astype(L.dtype), lower=True)
        return jnp.sum(Z * Z, axis=0)

    out = jax.lax.map(body, _row_chunks(num_train, chunk_size)).reshape(-1)[:num_train]
    w = _batch_weight(data["batch"], num_train, out.dtype) if "batch" in data else data["weight"]
    return out * (w != 0) / normalizer


def _needs_factor(solver: Solver, with_self_influence: bool) -> bool:
    return with_self_influence or (isinstance(solver, Direct) and solver.method == "cholesky")


def _core(data, flat, batches, given, solver, factor, x0, normalizer, *, fns, measures, names,
          order, special, num_train, si_chunk, need_factor, pre):
    """Everything of :func:`influence_scores` in one compiled call (checks happen afterwards)."""
    gn = jnp.linalg.norm(fns.gradient(data))
    vals, grads = _measure_grads(data, flat, batches, params_from_flat=fns.params_from_flat,
                                 measures=measures)
    by_name = dict(zip(names, grads))
    by_name.update(given)
    B = jnp.stack([by_name[k] for k in order], axis=1)
    op = _operator(data, fns, pre)
    if factor is None and need_factor:  # formed and factored once, shared by solve and self-influence
        factor = Direct(damping=solver.damping).factorize(op, dtype=flat.dtype)
    if isinstance(solver, Direct):
        res = solver.solve(factor if solver.method == "cholesky" else op, B)
    else:
        res = solver.solve(op, B, x0=x0)
    finite = jnp.asarray(True) if factor is None else jnp.all(jnp.isfinite(factor.hessian))
    S = fns.grads_dot(data, res.x)
    si = None
    if si_chunk is not None:
        si = _si_from_factor(data, factor.cholesky, normalizer, fns=fns, special=special,
                             num_train=num_train, chunk_size=si_chunk)
    return gn, vals, B, res, S, finite, si, factor


_core_jit = jax.jit(_core, static_argnames=("fns", "measures", "names", "order", "special",
                                            "num_train", "si_chunk", "need_factor", "pre"))


def _fns_of(problem: Problem) -> _Fns:
    return _Fns(problem.gradient, problem.hvp, problem.hessian, problem.grads_dot, problem.grads_tdot,
                problem.grads_rows, problem.params_from_flat)


def _check_solver(solver) -> None:
    if not isinstance(solver, Solver):
        raise ValueError(f"solver must be a solver object such as infl.Direct(), infl.CG(tol=1e-6), "
                         f"infl.LiSSA(...) or infl.Arnoldi(rank=..., num_iters=..., key=...); got "
                         f"{solver!r}")


def _check_factor(factor, solver: Solver, p: int) -> None:
    if factor is None:
        return
    if not isinstance(factor, DenseFactor):
        raise ValueError(f"factor must be a DenseFactor (e.g. InfluenceResult.factor), got {type(factor).__name__}")
    if factor.cholesky.shape != (p, p):
        raise ValueError(f"factor is for {factor.cholesky.shape[0]} parameters, the problem has {p}")
    if not np.isclose(float(factor.damping), solver.damping):
        raise ValueError(f"factor includes damping {float(factor.damping):g} but the solver has "
                         f"damping {solver.damping:g}; use one damping for both")


def solve_failure(res, solver: Solver, what: str = "solve") -> Exception:
    """The :class:`~jaxunlearn.influence.solvers.SolverError` describing a failed result."""
    msg = (f"{type(solver).__name__} {what} failed: relative residual "
           f"{float(jnp.nanmax(res.residual)):.3g} after {int(res.iterations)} iterations")
    if isinstance(solver, Direct):
        return _solvers.SingularHessianError(
            f"H + {solver.damping:g} I is singular or not positive definite ({msg}); add damping or "
            "check that theta is a minimum of the training objective")
    if isinstance(solver, _solvers.Arnoldi):
        return _solvers.NonConvergenceError(
            f"{msg}, above tol {solver.tol:g}: the rank-{solver.rank} inverse is a truncation; raise "
            "rank / num_iters, or pass raise_on_fail=False to accept the approximation")
    if isinstance(solver, _solvers.LiSSA):
        res_max = float(jnp.nanmax(res.residual))
        if not np.isfinite(res_max) or res_max > solver.divergence:
            return _solvers.DivergenceError(
                f"{msg}: LiSSA diverged. It converges only if every eigenvalue of H + damping I "
                "lies in (0, 2 scale): pass a larger LiSSA(scale=...) (at least lambda_max(H + "
                "damping I) / 2; scale=None estimates it by power iteration) and, if H has "
                "negative curvature at θ̂ (a non-convex model), damping above |lambda_min|; or use "
                "the Direct/CG solvers or the last-layer surrogate")
        return _solvers.NonConvergenceError(
            f"{msg}: LiSSA needs about (scale / lambda_min(H + damping I)) * ln(1/tol) steps, "
            f"more than depth={solver.depth}: raise depth, or add damping (it raises lambda_min: "
            "faster, but a biased inverse), or use CG/Direct for an ill-conditioned H")
    return _solvers.NonConvergenceError(
        msg + "; raise maxiter/depth, add damping or precondition. An early stop with a large "
        "residual means H + damping I is not positive definite along some direction (CG met "
        "non-positive curvature, LiSSA diverged): θ̂ is not a minimum, or the model is "
        "non-convex there -- add damping or use the last-layer surrogate")


def report_solve(res, solver: Solver, what: str = "solve", stacklevel: int = 3) -> None:
    """Raise (``solver.raise_on_fail``) or warn when a concrete result did not converge."""
    if bool(res.converged):
        return
    err = solve_failure(res, solver, what)
    if solver.raise_on_fail:
        raise err
    warnings.warn(str(err), _solvers.SolverWarning, stacklevel=stacklevel)


def influence_scores(problem: Problem, measures: Mapping[str, Any], *, solver: Solver = Direct(),
                     scale: str = "change", stationarity_tol: float | None = 1e-3,
                     on_nonstationary: str = "warn", with_self_influence: bool = False,
                     factor: DenseFactor | None = None, x0: Mapping[str, Any] | None = None,
                     chunk_size: int = 2048) -> InfluenceResult:
    """Scores of every training sample for every measurement (module docstring for the convention).

    The whole computation (stationarity, measurement gradients, the solve with all measurements
    as columns, ``G x / n``) is one compiled call; the checks run on its concrete outputs.

    Args:
      problem: from :func:`make_problem` or :func:`jaxunlearn.influence.last_layer.make_problem`.
      measures: ``{name: (measure, batch)}`` or ``{name: ∇m [p]}`` (see :func:`measurement_gradients`).
      solver: a solver object (:mod:`jaxunlearn.influence.solvers`): ``Direct()`` (dense H,
        Cholesky; the default), ``CG(tol=...)``, ``LiSSA(...)`` or ``Arnoldi(...)``. Its
        ``damping`` is added to H (0 keeps the exact influence; the L2 term already makes H
        positive definite); its ``raise_on_fail`` decides between an error and a warning.
      scale: ``"change"`` (DESIGN.md: predicted change of m) or ``"seed004"`` (times n: seed 004's
        I(z_i; -1), eqs. (3)-(5), with sum-reduced utility/robustness measurements).
      stationarity_tol: threshold on ``||∇L(θ̂)||`` (None: skip the check).
      on_nonstationary: ``"warn"``, ``"raise"`` (:class:`NonStationaryError`) or ``"ignore"``.
      with_self_influence: also return the exact self-influence (:func:`self_influence`), from
        the same dense Hessian and Cholesky factor as the direct solve (formed for it with
        iterative solvers).
      factor: a :class:`~jaxunlearn.influence.solvers.DenseFactor` from an earlier call
        (``InfluenceResult.factor``): H is not formed again.
      x0: warm starts ``{name: [p]}`` for iterative solvers (e.g. an earlier result's
        ``directions``); missing names start from 0.
      chunk_size: rows per triangular solve of the generic self-influence.

    Returns:
      :class:`InfluenceResult`.

    Raises:
      ValueError: bad solver/scale, absent groups, shape mismatches;
        :class:`NonStationaryError`; solver errors (:class:`~jaxunlearn.influence.solvers.SolverError`)
        when a solve fails; :class:`~jaxunlearn.influence.grads.NonFiniteError` for NaN/inf.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    _check_solver(solver)
    if on_nonstationary not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_nonstationary must be 'warn', 'raise' or 'ignore', got {on_nonstationary!r}")
    p = problem.flat.shape[0]
    _check_factor(factor, solver, p)
    names, fns, batches, given = _split_measures(problem, measures)
    order = tuple(measures)
    X0 = None
    if x0 is not None:
        unknown = set(x0) - set(order)
        if unknown:
            raise ValueError(f"x0 has entries {sorted(unknown)} that are not measurements {list(order)}")
        X0 = jnp.stack([jnp.asarray(x0[k], problem.flat.dtype) if k in x0 else
                        jnp.zeros((p,), problem.flat.dtype) for k in order], axis=1)
        if X0.shape != (p, len(order)):
            raise ValueError(f"each x0 entry must have shape [{p}]")
    gn, vals, B, res, S, finite, si, factor = _core_jit(
        problem.data, problem.flat, batches, given, solver, factor, X0, problem.normalizer,
        fns=_fns_of(problem), measures=fns, names=tuple(names), order=order,
        special=problem.self_influence, num_train=problem.num_train,
        si_chunk=int(chunk_size) if with_self_influence else None,
        need_factor=_needs_factor(solver, with_self_influence), pre=problem.preconditioner)
    gn = float(gn)
    _check_stationary(gn, stationarity_tol, on_nonstationary)
    for j, k in enumerate(order):
        _grads.check_finite(B[:, j], f"gradient of measurement {k!r} (is one of its groups or "
                                     "classes absent from its batch?)")
    if not bool(finite):
        raise _grads.NonFiniteError("the Hessian contains NaN or inf; check the model and data")
    report_solve(res, solver)
    _grads.check_finite(res.x, "inverse-HVP solutions")
    S = S / problem.normalizer if scale == "change" else S
    _grads.check_finite(S, "influence scores")
    if si is not None:
        if not bool(jnp.all(jnp.isfinite(factor.cholesky))):
            raise _solvers.SingularHessianError(
                f"H + {solver.damping:g} I is not positive definite (Cholesky failed): no self-influence")
        _grads.check_finite(si, "self-influence")
    values = dict(zip(names, (float(v) for v in vals)))
    return InfluenceResult(
        scores={k: S[:, j] for j, k in enumerate(order)},
        directions={k: res.x[:, j] for j, k in enumerate(order)},
        measure_grads={k: B[:, j] for j, k in enumerate(order)},
        values={k: values.get(k, float("nan")) for k in order},
        grad_norm=gn, solve=res, self_influence=si, factor=factor)


# ----------------------------------------------------------------------------- self-influence


def _self_influence_core(data, flat, factor, damping, normalizer, *, fns, special, num_train, chunk_size):
    gn = jnp.linalg.norm(fns.gradient(data))
    if factor is None:
        factor = Direct(damping=damping).factorize(_operator(data, fns), dtype=flat.dtype)
    si = _si_from_factor(data, factor.cholesky, normalizer, fns=fns, special=special,
                         num_train=num_train, chunk_size=chunk_size)
    return gn, jnp.all(jnp.isfinite(factor.cholesky)), si


_self_influence_jit = jax.jit(_self_influence_core, static_argnames=("damping", "fns", "special",
                                                                     "num_train", "chunk_size"))


def self_influence(problem: Problem, *, solver: Direct = Direct(), factor: DenseFactor | None = None,
                   chunk_size: int = 2048, stationarity_tol: float | None = 1e-3,
                   on_nonstationary: str = "warn") -> jax.Array:
    """Exact self-influence ``(1/n) ∇ell_i^T H^{-1} ∇ell_i`` of every training sample, [n].

    The predicted increase of sample i's own loss when it is removed (the score of measurement
    ``m = ell_i``); large values flag memorised or mislabelled points. Computed from the Cholesky
    factor ``H + damping I = L L^T`` as ``||L^{-1} g_i||^2 / n``, ``chunk_size`` rows of G per
    triangular solve, or by the problem's closed form (the last layer's Gram method). Staged: pass
    ``factor`` (``InfluenceResult.factor`` of a direct solve, or ``Direct().factorize(problem)``)
    and H is neither formed nor factored again -- for autodiff problems too.

    Args:
      problem: a :class:`Problem`.
      solver: a :class:`~jaxunlearn.influence.solvers.Direct` solver (its ``damping``); exact
        self-influence needs the dense factor, so iterative solvers are refused.
      factor: optional :class:`~jaxunlearn.influence.solvers.DenseFactor` to reuse.
      chunk_size, stationarity_tol, on_nonstationary: as :func:`influence_scores`.

    Raises:
      SingularHessianError: H + damping I is not positive definite.
    """
    if not isinstance(solver, Direct):
        raise ValueError(f"self_influence needs a Direct solver (exact, from the Cholesky factor; an "
                         f"iterative solver would need one solve per training sample), got {solver!r}")
    _check_factor(factor, solver, problem.flat.shape[0])
    gn, chol_ok, out = _self_influence_jit(problem.data, problem.flat, factor, float(solver.damping),
                                           problem.normalizer, fns=_fns_of(problem),
                                           special=problem.self_influence,
                                           num_train=problem.num_train, chunk_size=int(chunk_size))
    _check_stationary(float(gn), stationarity_tol, on_nonstationary)
    if not bool(chol_ok):
        raise _solvers.SingularHessianError(
            f"H + {solver.damping:g} I is not positive definite (Cholesky failed); add damping or "
            "check that theta is a minimum")
    return out
