"""Influence-based unlearning: the update of seed 004 eq. (8) and the hard-fraction sweep on it.

With forget weights ``eps`` (``eps_i = -1`` removes sample i, soft weights re-weight it by
``1 + eps_i``; :mod:`jaxunlearn.weights`), the influence update is the first Newton step, from the
trained optimum θ̂, towards the minimiser of the reweighted objective
``(1/n) sum_i (1 + eps_i) ell_i + (l2/2)||θ||^2`` (seed 004 eq. (1)):

    θ_new = θ̂ - (1/n) H^{-1} sum_i eps_i ∇ell_i(θ̂)                                  (8)

with H the Hessian of the mean training objective (regulariser included) and n its normaliser
(``Problem.normalizer``). It is the parameter-space counterpart of the scores of
:mod:`jaxunlearn.influence.scores`: for any measurement m, ``m(θ_new) - m(θ̂) ≈ -eps . scores``.

* :func:`influence_update` -- eq. (8) on a :class:`~jaxunlearn.influence.scores.Problem` with any
  solver object; returns the new parameters.
* :func:`sweep_influence_update` -- the hard baseline of seed 004 §5: remove the k most harmful
  samples (:func:`jaxunlearn.weights.hard_weights`), apply eq. (8), evaluate, and grow k while
  the target improves (:func:`jaxunlearn.weights.sweep_hard_fraction`). The Hessian factor is
  formed once (direct solver) or each solve starts from the previous one (iterative solvers).
* :func:`influence_step` -- eq. (8) itself given ``sum_i eps_i ∇ell_i`` and an inverse-HVP, the
  one place the formula is written; the one-shot Method
  :func:`jaxunlearn.methods.influence_unlearning` (the IF method of the unlearning loop, which
  reads ``eps`` from its forget batches) uses it too.

Naming: ``influence.influence_update`` is this pure parameter update; ``methods.influence_unlearning``
is the unlearning *method* (an ``init``/``update`` pair run by the method loop) built on it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import weights as _weights
from jaxunlearn.influence import grads as _grads
from jaxunlearn.influence import scores as _scores
from jaxunlearn.influence.solvers import DenseFactor, Direct, Solver

__all__ = ["influence_step", "influence_update", "sweep_influence_update"]


def influence_step(params, grad_sum, inverse_hvp: Callable, num_train) -> tuple[Any, Any]:
    """Seed 004 eq. (8): ``θ - (1/n) H^{-1} g`` for ``g = sum_i eps_i ∇ell_i(θ)``.

    Args:
      params: θ, a pytree (or a flat [p] vector).
      grad_sum: g, the same structure as ``params``.
      inverse_hvp: ``g -> H^{-1} g`` on that structure.
      num_train: n, the normaliser of the training objective.

    Returns:
      ``(new params, step)`` with ``step = -(1/n) H^{-1} g`` (the structure of ``params``).
    """
    direction = inverse_hvp(grad_sum)
    step = jax.tree.map(lambda p, h: (-h / num_train).astype(jnp.result_type(p)), params, direction)
    return jax.tree.map(lambda p, s: p + s, params, step), step


def _needs_factor(solver: Solver) -> bool:
    return isinstance(solver, Direct) and solver.method == "cholesky"


def _update_core(data, flat, eps, solver, factor, x0, normalizer, *, fns, pre):
    g = fns.grads_tdot(data, eps)  # sum_i eps_i ∇ell_i (padding rows count 0)
    op = _scores._operator(data, fns, pre)
    if factor is None and _needs_factor(solver):
        factor = Direct(damping=solver.damping).factorize(op, dtype=flat.dtype)
    box = {}

    def inverse_hvp(v):
        box["res"] = solver.solve(factor if _needs_factor(solver) else op, v, x0=x0)
        return box["res"].x

    new_flat, _ = influence_step(flat, g, inverse_hvp, normalizer)
    return fns.params_from_flat(data, new_flat), box["res"], factor


_update_jit = jax.jit(_update_core, static_argnames=("fns", "pre"))


def _checked_eps(problem, eps) -> jax.Array:
    eps = jnp.asarray(eps)
    if eps.shape != (problem.num_train,):
        raise ValueError(f"eps must have shape [{problem.num_train}] (one weight per training row of "
                         f"the problem), got {list(eps.shape)}")
    if not jnp.issubdtype(eps.dtype, jnp.floating):
        eps = eps.astype(problem.flat.dtype)
    if not isinstance(eps, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(eps))):
        raise ValueError("eps contains NaN or inf")
    return eps


def _update(problem, solver, eps, factor=None, x0=None):
    _scores._check_solver(solver)
    _scores._check_factor(factor, solver, problem.flat.shape[0])
    params, res, factor = _update_jit(problem.data, problem.flat, _checked_eps(problem, eps), solver,
                                      factor, x0, problem.normalizer, fns=_scores._fns_of(problem),
                                      pre=problem.preconditioner)
    if not isinstance(res.converged, jax.core.Tracer):
        _scores.report_solve(res, solver, "influence-update solve", stacklevel=4)
        _grads.check_finite(params, "influence-updated parameters")
    return params, res, factor


def influence_update(problem: "_scores.Problem", solver: Solver, eps, *,
                     factor: DenseFactor | None = None, x0: jax.Array | None = None):
    """Unlearn by the influence update, seed 004 eq. (8): ``θ̂ - (1/n) H^{-1} sum_i eps_i ∇ell_i``.

    Pure: the result depends only on the arguments (one compiled call with the problem's arrays
    as arguments; it can also be called inside the caller's ``jit``).

    Args:
      problem: from :func:`jaxunlearn.influence.scores.make_problem` or
        :func:`jaxunlearn.influence.last_layer.make_problem` (θ̂, the data, H).
      solver: a solver object (``Direct()``, ``CG(tol=...)``, ...); its ``damping`` is added to H.
      eps: [n] forget weights, one per training row (``-1`` removes the sample; soft weights from
        :func:`jaxunlearn.weights.soft_weights`; 0 leaves it).
      factor: optional :class:`~jaxunlearn.influence.solvers.DenseFactor` to reuse (direct solver).
      x0: optional warm start [p] of ``H^{-1} sum_i eps_i ∇ell_i`` (iterative solvers).

    Returns:
      The new parameters, as the problem's measurements take them (``Problem.params_from_flat``:
      the full parameter tree for the autodiff problem, the head dict for the last layer).

    Raises:
      ValueError: ``eps`` of the wrong shape or non-finite; a
        :class:`~jaxunlearn.influence.solvers.SolverError` when the solve fails (a warning with
        ``raise_on_fail=False``).
    """
    return _update(problem, solver, eps, factor, x0)[0]


def sweep_influence_update(problem: "_scores.Problem", scores, evaluate_fn: Callable[[Any], float],
                           fractions: Sequence[float], *, solver: Solver = Direct(),
                           patience: int = 1, min_improvement: float = 0.0,
                           negative_only: bool = False) -> _weights.HardSweep:
    """The hard baseline of seed 004 §5 with the influence update: grow the removed fraction k.

    For each k: ``eps = hard_weights(scores, k)`` (-1 on the ``floor(k n)`` most negative scores),
    ``params = influence_update(problem, solver, eps)``, ``value = evaluate_fn(params)``; stop after
    ``patience`` fractions without an improvement larger than ``min_improvement``
    (:func:`jaxunlearn.weights.sweep_hard_fraction`). A direct solver factors H once for the
    whole sweep; an iterative one warm-starts each solve from the previous fraction's solution.

    Args:
      problem: the influence problem (θ̂, data, H).
      scores: [n] influence scores of the target measurement (negative: removing helps).
      evaluate_fn: ``params -> float``, the target metric of the updated model, lower is better
        (e.g. |DP| on the validation set).
      fractions: strictly increasing fractions in [0, 1] (include 0.0 to let "remove nothing" win).
      solver: the solver object of the update.
      patience, min_improvement, negative_only: as :func:`jaxunlearn.weights.sweep_hard_fraction`.

    Returns:
      :class:`jaxunlearn.weights.HardSweep` (best fraction, its value and eps, the curve so far).
    """
    state = {"factor": None, "x0": None}

    def evaluate(eps):
        params, res, factor = _update(problem, solver, eps, state["factor"], state["x0"])
        state["factor"] = factor
        if not isinstance(solver, Direct):
            state["x0"] = res.x
        return evaluate_fn(params)

    return _weights.sweep_hard_fraction(evaluate, scores, fractions, patience=patience,
                                        min_improvement=min_improvement, negative_only=negative_only)
