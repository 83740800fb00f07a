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
    I_robust(z_i; -1) = n * score_i[robustness(reduction="sum")]

which :func:`influence_scores` returns with ``scale="seed004"``.

How: one inverse-HVP solve per *measurement* (``H x_m = ∇m``, all measurements as the columns of
one solve, by any solver of :mod:`jaxunlearn.influence.solvers`), then ``scores = G x / n`` with G
the per-sample training gradients -- never a solve per training sample. A :class:`Problem` holds
what this needs as pure functions of a pytree of arrays (passed to jit as arguments, never closed
over): :func:`make_problem` builds it by autodiff for any model and parameter subset,
:func:`jaxunlearn.influence.last_layer.make_problem` in closed form for a linear head.
"""

from __future__ import annotations

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
from jaxunlearn.influence import solvers as _solvers

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
      grads_rows: ``(data, index [c]) -> G[index] [c, p]``.
      params_from_flat: ``(data, flat [p]) -> params`` as the measurements take them.
      self_influence: optional specialised ``(data, cholesky, chunk_size) -> [n]``.
    """

    data: Any
    flat: jax.Array
    num_train: int
    normalizer: float
    gradient: Callable
    hvp: Callable
    hessian: Callable
    grads_dot: Callable
    grads_rows: Callable
    params_from_flat: Callable
    self_influence: Callable | None = None


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
    """

    scores: dict
    directions: dict
    measure_grads: dict
    values: dict
    grad_norm: float
    solve: Any
    self_influence: Any = None


# ----------------------------------------------------------------------------- generic problem


def model_loss(apply_fn, *, loss_fn=losses.cross_entropy, model_state: dict | None = None):
    """Per-example loss ``loss(params, batch) -> [B]`` of a model in eval mode (for :func:`make_problem`)."""

    def loss(params, batch):
        logits, _ = apply_fn({"params": params, **(model_state or {})}, batch["x"], train=False)
        return loss_fn(logits, batch["y"])

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
    grads_rows: Callable
    params_from_flat: Callable


@functools.lru_cache(maxsize=64)
def _generic_fns(loss_fn, l2, chunk_size, hvp_mode, hessian_chunk_size) -> _Fns:
    """The autodiff functions of a :class:`Problem`, cached so repeated problems reuse compilations.

    They depend only on static settings; parameter structure and sizes come from ``data``.
    """

    def full(p, fz):
        return p if fz is None else _grads.combine(p, fz)

    def objective(p, fz, b):
        return _grads.make_mean_objective(loss_fn, l2=l2, frozen=fz)(p, b)

    def gradient(data):
        return _grads.flatten_params(jax.grad(objective)(data["params"], data["frozen"], data["batch"]))[0]

    def hvp_fn(data, V):
        return _hvp.make_flat_hvp(objective, data["params"], data["frozen"], data["batch"], mode=hvp_mode)(V)

    def hessian(data):
        return _hvp.dense_hessian(objective, data["params"], data["frozen"], data["batch"],
                                  chunk_size=hessian_chunk_size)

    def grads_dot(data, V):
        fz, b = data["frozen"], data["batch"]
        f0, unravel = _grads.flatten_params(data["params"])
        n = _grads.batch_size_of(b)
        Vm = V[:, None] if V.ndim == 1 else V

        def rows(index):
            sub = _take_rows(b, index)
            _, lin = jax.linearize(lambda f: loss_fn(full(unravel(f), fz), sub), f0)
            return jax.vmap(lin, in_axes=1, out_axes=1)(Vm)  # [c, q]: g_i^T v by forward mode

        out = jax.lax.map(rows, _row_chunks(n, chunk_size)).reshape(-1, Vm.shape[1])[:n]
        out = out * (_batch_weight(b, n, out.dtype) != 0)[:, None]
        return out[:, 0] if V.ndim == 1 else out

    def grads_rows(data, index):
        sub = _take_rows(data["batch"], index)
        return _grads.per_sample_grads_flat(loss_fn, data["params"], sub, frozen=data["frozen"],
                                            chunk_size=chunk_size)

    def params_from_flat(data, f):
        return full(_grads.flatten_params(data["params"])[1](f), data["frozen"])

    return _Fns(gradient, hvp_fn, hessian, grads_dot, grads_rows, params_from_flat)


def make_problem(loss_fn: Callable, params, batch: dict, *, l2: float = 0.0, select=None,
                 chunk_size: int | None = None, hvp_mode: str = _hvp.DEFAULT_MODE,
                 hessian_chunk_size: int | None = None) -> Problem:
    """The autodiff :class:`Problem` for any model and parameter subset.

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example, unweighted losses, examples treated
        independently (eval mode); e.g. :func:`model_loss`. Reuse the same function object across
        calls to reuse compilations.
      params: the full parameter pytree at θ̂.
      batch: the training set as one batch ``{"x", "y", "weight"?, ...}`` (weight 0 = padding).
      l2: the objective's L2 coefficient (on the differentiated parameters).
      select: None (all parameters) or a subset as in :func:`jaxunlearn.influence.grads.partition`
        (e.g. ``"head"``, a list of block prefixes, or a predicate); the rest is held fixed.
      chunk_size: rows per chunk for per-sample gradients and ``G V`` (memory bound); None: all.
      hvp_mode: the HVP composition (:mod:`jaxunlearn.influence.hvp`).
      hessian_chunk_size: columns per chunk when forming the dense Hessian.
    """
    if select is None:
        sel, frozen = params, None
    else:
        sel, frozen = _grads.partition(params, select)
    flat, _ = _grads.flatten_params(sel)
    n = _grads.batch_size_of(batch)
    w = np.asarray(_batch_weight(batch, n, flat.dtype))
    fns = _generic_fns(loss_fn, float(l2), None if chunk_size is None else int(chunk_size), hvp_mode,
                       hessian_chunk_size)
    return Problem(data={"params": sel, "frozen": frozen, "batch": batch}, flat=flat, num_train=n,
                   normalizer=float(max(np.count_nonzero(w), 1)), gradient=fns.gradient, hvp=fns.hvp,
                   hessian=fns.hessian, grads_dot=fns.grads_dot, grads_rows=fns.grads_rows,
                   params_from_flat=fns.params_from_flat)


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


def _damped_cholesky(H, damping):
    """The lower Cholesky factor of ``(H + H^T) / 2 + damping I`` (NaN if not positive definite)."""
    return jnp.linalg.cholesky(0.5 * (H + H.T) + damping * jnp.eye(H.shape[0], dtype=H.dtype))


def _si_from_hessian(data, L, normalizer, *, fns, special, num_train, chunk_size):
    """Self-influence [n] from the factor ``L`` of the damped Hessian (the closed form if any)."""
    if special is not None:
        return special(data, L, chunk_size)

    def body(index):
        G = fns.grads_rows(data, index)
        Z = solve_triangular(L, G.T.astype(L.dtype), lower=True)
        return jnp.sum(Z * Z, axis=0)

    out = jax.lax.map(body, _row_chunks(num_train, chunk_size)).reshape(-1)[:num_train]
    w = _batch_weight(data["batch"], num_train, out.dtype)
    return out * (w != 0) / normalizer


def _core(data, flat, batches, given, damping, key, normalizer, *, fns, measures, solver, kw, names,
          order, special, num_train, si_chunk):
    """Everything of :func:`influence_scores` in one compiled call (checks happen afterwards)."""
    gn = jnp.linalg.norm(fns.gradient(data))
    vals, grads = _measure_grads(data, flat, batches, params_from_flat=fns.params_from_flat,
                                 measures=measures)
    by_name = dict(zip(names, grads))
    by_name.update(given)
    B = jnp.stack([by_name[k] for k in order], axis=1)
    kw = dict(kw)
    H = fns.hessian(data) if (solver == "direct" or si_chunk is not None) else None
    L = None if si_chunk is None else _damped_cholesky(H, damping)  # factored once, shared
    if solver == "direct":
        shared = L if kw.get("method", "cholesky") == "cholesky" else None
        res = _solvers.solve_direct(H, B, damping=damping, factor=shared, **kw)
    else:
        if solver == "arnoldi":
            kw["key"] = key
        res = _solvers.make_solver(solver, damping=damping, **kw)(lambda v: fns.hvp(data, v), B)
    finite = jnp.asarray(True) if H is None else jnp.all(jnp.isfinite(H))
    S = fns.grads_dot(data, res.x)
    si = chol_ok = None
    if si_chunk is not None:
        si = _si_from_hessian(data, L, normalizer, fns=fns, special=special, num_train=num_train,
                              chunk_size=si_chunk)
        chol_ok = jnp.all(jnp.isfinite(L))
    return gn, vals, B, res, S, finite, si, chol_ok


_core_jit = jax.jit(_core, static_argnames=("fns", "measures", "solver", "kw", "names", "order",
                                            "special", "num_train", "si_chunk"))


def _fns_of(problem: Problem) -> _Fns:
    return _Fns(problem.gradient, problem.hvp, problem.hessian, problem.grads_dot, problem.grads_rows,
                problem.params_from_flat)


def influence_scores(problem: Problem, measures: Mapping[str, Any], *, solver: str = "direct",
                     damping: float = 0.0, solver_kwargs: dict | None = None, scale: str = "change",
                     stationarity_tol: float | None = 1e-3, on_nonstationary: str = "warn",
                     with_self_influence: bool = False, chunk_size: int = 2048) -> InfluenceResult:
    """Scores of every training sample for every measurement (module docstring for the convention).

    The whole computation (stationarity, measurement gradients, the solve with all measurements
    as columns, ``G x / n``) is one compiled call; the checks run on its concrete outputs.

    Args:
      problem: from :func:`make_problem` or :func:`jaxunlearn.influence.last_layer.make_problem`.
      measures: ``{name: (measure, batch)}`` or ``{name: ∇m [p]}`` (see :func:`measurement_gradients`).
      solver: ``"direct"`` (dense H, Cholesky), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
      damping: lambda added to H (0 keeps the exact influence; the L2 term already makes H
        positive definite).
      solver_kwargs: further keyword arguments of the solver (e.g. ``tol``, ``maxiter``; arnoldi
        needs ``rank``, ``num_iters``, ``key``).
      scale: ``"change"`` (DESIGN.md: predicted change of m) or ``"seed004"`` (times n: seed 004's
        I(z_i; -1), eqs. (3)-(5), with sum-reduced utility/robustness measurements).
      stationarity_tol: threshold on ``||∇L(θ̂)||`` (None: skip the check).
      on_nonstationary: ``"warn"``, ``"raise"`` (:class:`NonStationaryError`) or ``"ignore"``.
      with_self_influence: also return the exact self-influence (:func:`self_influence`), from
        the same dense Hessian and Cholesky factor as the direct solve (formed for it with
        iterative solvers).
      chunk_size: rows per triangular solve of the generic self-influence.

    Returns:
      :class:`InfluenceResult`.

    Raises:
      ValueError: unknown solver/scale, absent groups, shape mismatches;
        :class:`NonStationaryError`; solver errors (:class:`~jaxunlearn.influence.solvers.SolverError`)
        when a solve fails; :class:`~jaxunlearn.influence.grads.NonFiniteError` for NaN/inf.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if solver not in ("direct", "cg", "lissa", "arnoldi"):
        raise ValueError(f"unknown solver {solver!r}; choose 'direct', 'cg', 'lissa' or 'arnoldi'")
    if on_nonstationary not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_nonstationary must be 'warn', 'raise' or 'ignore', got {on_nonstationary!r}")
    kw = dict(solver_kwargs or {})
    raise_on_fail = kw.pop("raise_on_fail", True)
    key = kw.pop("key", jax.random.key(0)) if solver == "arnoldi" else jax.random.key(0)
    if solver == "arnoldi":
        missing = {"rank", "num_iters"} - set(kw)
        if missing:
            raise ValueError(f"solver 'arnoldi' needs solver_kwargs {sorted(missing)} (and a key)")
    names, fns, batches, given = _split_measures(problem, measures)
    order = tuple(measures)
    gn, vals, B, res, S, finite, si, chol_ok = _core_jit(
        problem.data, problem.flat, batches, given, damping, key, problem.normalizer,
        fns=_fns_of(problem), measures=fns, solver=solver,
        kw=tuple(sorted({**kw, "raise_on_fail": False}.items())), names=tuple(names), order=order,
        special=problem.self_influence, num_train=problem.num_train,
        si_chunk=int(chunk_size) if with_self_influence else None)
    gn = float(gn)
    _check_stationary(gn, stationarity_tol, on_nonstationary)
    for j, k in enumerate(order):
        _grads.check_finite(B[:, j], f"gradient of measurement {k!r} (is one of its groups or "
                                     "classes absent from its batch?)")
    if not bool(finite):
        raise _grads.NonFiniteError("the Hessian contains NaN or inf; check the model and data")
    if not bool(res.converged):
        msg = (f"{solver} solve failed: relative residual {float(jnp.nanmax(res.residual)):.3g} after "
               f"{int(res.iterations)} iterations")
        if solver == "direct":
            err = _solvers.SingularHessianError(
                f"H + {damping:g} I is singular or not positive definite ({msg}); add damping or check "
                "that theta is a minimum of the training objective")
        else:
            err = _solvers.NonConvergenceError(
                msg + "; raise maxiter/depth, add damping or precondition. An early stop with a large "
                "residual means H + damping I is not positive definite along some direction (CG met "
                "non-positive curvature, LiSSA diverged): θ̂ is not a minimum, or the model is "
                "non-convex there -- add damping or use the last-layer surrogate")
        if raise_on_fail:
            raise err
        warnings.warn(str(err), _solvers.SolverWarning, stacklevel=2)
    _grads.check_finite(res.x, "inverse-HVP solutions")
    S = S / problem.normalizer if scale == "change" else S
    _grads.check_finite(S, "influence scores")
    if si is not None:
        if not bool(chol_ok):
            raise _solvers.SingularHessianError(
                f"H + {damping:g} I is not positive definite (Cholesky failed): no self-influence")
        _grads.check_finite(si, "self-influence")
    values = dict(zip(names, (float(v) for v in vals)))
    return InfluenceResult(
        scores={k: S[:, j] for j, k in enumerate(order)},
        directions={k: res.x[:, j] for j, k in enumerate(order)},
        measure_grads={k: B[:, j] for j, k in enumerate(order)},
        values={k: values.get(k, float("nan")) for k in order},
        grad_norm=gn, solve=res, self_influence=si)


# ----------------------------------------------------------------------------- self-influence


def _self_influence_core(data, damping, normalizer, *, fns, special, num_train, chunk_size):
    gn = jnp.linalg.norm(fns.gradient(data))
    L = _damped_cholesky(fns.hessian(data), damping)
    si = _si_from_hessian(data, L, normalizer, fns=fns, special=special, num_train=num_train,
                          chunk_size=chunk_size)
    return gn, jnp.all(jnp.isfinite(L)), si


_self_influence_jit = jax.jit(_self_influence_core,
                              static_argnames=("fns", "special", "num_train", "chunk_size"))


def self_influence(problem: Problem, *, damping: float = 0.0, chunk_size: int = 2048,
                   stationarity_tol: float | None = 1e-3, on_nonstationary: str = "warn") -> jax.Array:
    """Exact self-influence ``(1/n) ∇ell_i^T H^{-1} ∇ell_i`` of every training sample, [n].

    The predicted increase of sample i's own loss when it is removed (the score of measurement
    ``m = ell_i``); large values flag memorised or mislabelled points. Computed from the Cholesky
    factor ``H = L L^T`` as ``||L^{-1} g_i||^2 / n``, ``chunk_size`` rows of G per triangular solve,
    or by the problem's closed form (the last layer's Gram method). One compiled call; use
    ``influence_scores(..., with_self_influence=True)`` to share the Hessian with a solve.

    Raises:
      SingularHessianError: H + damping I is not positive definite.
    """
    gn, chol_ok, out = _self_influence_jit(problem.data, damping, problem.normalizer,
                                           fns=_fns_of(problem), special=problem.self_influence,
                                           num_train=problem.num_train, chunk_size=int(chunk_size))
    _check_stationary(float(gn), stationarity_tol, on_nonstationary)
    if not bool(chol_ok):
        raise _solvers.SingularHessianError(
            f"H + {damping:g} I is not positive definite (Cholesky failed); add damping or check that "
            "theta is a minimum")
    return out
