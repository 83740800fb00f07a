"""Check influence scores against actual leave-one-out retraining.

For a sample of training points i, retrain with sample i's weight set to 0, warm-started from θ̂
and run to convergence by a deterministic full-batch solver (Newton for the last-layer surrogate,
L-BFGS for any model), and compare the actual change ``m(θ̂_{-i}) - m(θ̂)`` of each measurement
with its predicted score (Pearson and Spearman correlations; seed 004 Figure 3).

The retraining keeps the objective's normaliser at n (``num_samples``), which is exactly the
removal the scores predict (:mod:`jaxunlearn.influence.scores`). Run validations in float64
(``with jax.enable_x64(True):``, arrays created inside): a leave-one-out change is O(1/n) of the
measurement, near float32 rounding for n in the thousands.

Typical use::

    with jax.enable_x64(True):
        result, infl = validation.validate_last_layer(head, {"x": feats, "y": y}, measures, l2=l2)
    result.pearson, result.spearman      # {name: float}
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import losses
from jaxunlearn.influence import grads as _grads
from jaxunlearn.influence import last_layer as _ll
from jaxunlearn.influence import scores as _scores
from jaxunlearn.influence import solvers as _solvers

__all__ = [
    "ValidationResult",
    "pearson",
    "spearman",
    "select_points",
    "leave_one_out",
    "compare",
    "validate",
    "last_layer_refit",
    "lbfgs_refit",
    "validate_last_layer",
]


class ValidationResult(NamedTuple):
    """Predicted vs actual changes on the retrained points.

    Attributes:
      indices: [k] training rows removed one at a time.
      predicted: ``{name: [k]}`` predicted changes (the scores at ``indices``).
      actual: ``{name: [k]}`` ``m(θ̂_{-i}) - m(θ̂)``.
      pearson, spearman: ``{name: float}`` correlations between the two.
      max_grad_norm: largest ``||∇L||`` at a retrained optimum (the retraining's convergence).
    """

    indices: np.ndarray
    predicted: dict
    actual: dict
    pearson: dict
    spearman: dict
    max_grad_norm: float


def pearson(a, b) -> float:
    """Pearson correlation of two 1-D arrays (NaN if one is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two 1-D arrays of equal length >= 2, got {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _ranks(a):
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, np.float64)
    sa = a[order]
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j)
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return pearson(_ranks(a), _ranks(b))


def select_points(scores: Mapping[str, Any], num_points: int, *, weight=None) -> np.ndarray:
    """Training rows with a spread of scores: evenly spaced ranks of each measurement's scores.

    Each of the M measurements contributes about ``num_points / M`` rows at evenly spaced positions
    of its sorted scores (both extremes included), so the sample covers the whole range rather
    than the crowd near 0. Rows with weight 0 are never chosen. Deterministic.
    """
    names = list(scores)
    n = int(np.shape(scores[names[0]])[0])
    live = np.ones(n, bool) if weight is None else np.asarray(weight) != 0
    cand = np.flatnonzero(live)
    if num_points < 2 or num_points > cand.size:
        raise ValueError(f"num_points must be in [2, {cand.size}], got {num_points}")
    chosen: list[int] = []
    per = max(2, -(-num_points // len(names)))
    for name in names:
        s = np.asarray(scores[name])[cand]
        order = cand[np.argsort(s, kind="mergesort")]
        for pos in np.linspace(0, order.size - 1, per).round().astype(int):
            if order[pos] not in chosen:
                chosen.append(int(order[pos]))
    fill = cand[np.argsort(np.asarray(scores[names[0]])[cand], kind="mergesort")]
    for pos in np.linspace(0, fill.size - 1, 2 * num_points).round().astype(int):
        if len(chosen) >= num_points:
            break
        if fill[pos] not in chosen:
            chosen.append(int(fill[pos]))
    return np.asarray(sorted(chosen[:num_points]))


def leave_one_out(refit: Callable, params, measures: Mapping[str, Any], indices, *, n: int,
                  weight=None, progress: bool = False) -> tuple[dict, float]:
    """Actual change of each measurement when each of ``indices`` is removed.

    Args:
      refit: ``refit(weight [n], init_params) -> (params, grad_norm)``: a deterministic full-batch
        solver run to convergence (:func:`last_layer_refit`, :func:`lbfgs_refit`).
      params: θ̂ (warm start and reference point).
      measures: ``{name: (measure, batch)}``.
      indices: rows to remove, one at a time.
      n: number of training rows.
      weight: the base weights (default ones).

    Returns:
      ``({name: [k] actual changes}, max grad norm over the refits)``.
    """
    base = np.ones(n) if weight is None else np.asarray(weight, np.float64)
    evals = {k: jax.jit(m) for k, (m, _) in measures.items()}
    ref = {k: float(evals[k](params, measures[k][1])) for k in measures}
    actual = {k: np.zeros(len(indices)) for k in measures}
    worst = 0.0
    it = indices
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(indices, desc="leave-one-out", leave=False)
        except ImportError:
            pass
    for j, i in enumerate(it):
        w = base.copy()
        w[int(i)] = 0.0
        new, gn = refit(w, params)
        worst = max(worst, float(gn))
        for k in measures:
            actual[k][j] = float(evals[k](new, measures[k][1])) - ref[k]
    return actual, worst


def compare(predicted: Mapping[str, Any], actual: Mapping[str, Any], indices,
            max_grad_norm: float = float("nan")) -> ValidationResult:
    """Correlate predicted scores (full [n] vectors) at ``indices`` with the actual changes."""
    indices = np.asarray(indices)
    pred = {k: np.asarray(predicted[k], np.float64)[indices] for k in actual}
    act = {k: np.asarray(actual[k], np.float64) for k in actual}
    return ValidationResult(indices, pred, act, {k: pearson(pred[k], act[k]) for k in act},
                            {k: spearman(pred[k], act[k]) for k in act}, max_grad_norm)


def validate(refit: Callable, params, measures: Mapping[str, Any], scores: Mapping[str, Any], *,
             n: int, num_points: int = 40, indices=None, weight=None,
             progress: bool = False) -> ValidationResult:
    """Leave-one-out validation of given scores: :func:`select_points`, :func:`leave_one_out`,
    :func:`compare`.

    Args:
      refit: see :func:`leave_one_out`.
      params: θ̂.
      measures: ``{name: (measure, batch)}``, the same the scores were computed for.
      scores: ``{name: [n]}`` predicted changes (``scale="change"``).
      n: number of training rows.
      num_points: how many rows to retrain without (ignored if ``indices`` is given).
      indices: explicit rows.
      weight: base training weights.
    """
    missing = set(measures) - set(scores)
    if missing:
        raise ValueError(f"no scores for measurements {sorted(missing)}")
    if indices is None:
        indices = select_points({k: scores[k] for k in measures}, num_points, weight=weight)
    actual, worst = leave_one_out(refit, params, measures, indices, n=n, weight=weight, progress=progress)
    return compare(scores, actual, indices, worst)


def last_layer_refit(features, y, *, l2, fit_intercept: bool, num_outputs: int,
                     penalize_intercept: bool = True, num_samples: int | None = None,
                     tol: float | None = None, max_iter: int = 50) -> Callable:
    """``refit(weight, head) -> (head, grad_norm)`` by Newton's method on the linear head.

    The normaliser is fixed at ``num_samples`` (default: the number of rows), the removal that
    scores predict. One jitted Newton solve per call, warm-started from ``head``; ``tol`` defaults
    to :func:`jaxunlearn.influence.last_layer.fit`'s (1e-12 in float64: the refit must be far more
    accurate than the O(1/n) change it measures).
    """
    X = _ll.design(jnp.asarray(features), fit_intercept=fit_intercept)
    y = jnp.asarray(y)
    reg = _ll.l2_vector(X.shape[1] - int(fit_intercept), l2, fit_intercept=fit_intercept,
                        penalize_intercept=penalize_intercept, dtype=X.dtype)
    ns = jnp.asarray(X.shape[0] if num_samples is None else num_samples, X.dtype)

    def refit(weight, head):
        W, info = _ll._fit_jit(X, y, l2=reg, num_outputs=num_outputs, weight=jnp.asarray(weight, X.dtype),
                               num_samples=ns, init=_ll.head_to_matrix(head).astype(X.dtype), tol=tol,
                               max_iter=max_iter)
        return _ll.matrix_to_head(W, fit_intercept=fit_intercept), float(info.grad_norm)

    return refit


def lbfgs_refit(loss_fn: Callable, batch: dict, *, l2: float = 0.0, select=None,
                num_samples: int | None = None, tol: float | None = None, max_iter: int = 2000,
                memory_size: int = 20) -> Callable:
    """``refit(weight, params) -> (params, grad_norm)`` by full-batch L-BFGS (optax) for any model.

    Minimises ``(1/n) sum_i w_i loss_fn(params, batch)_i + (l2/2)||θ_sel||^2`` over the selected
    parameters (:func:`jaxunlearn.influence.grads.partition`; the rest is held fixed), from the
    given warm start until ``||∇|| <= tol`` (default 1e-9 in float64, 1e-5 in float32) or
    ``max_iter`` steps. Deterministic: the same input gives the same output.
    """
    n_rows = _grads.batch_size_of(batch)
    ns = n_rows if num_samples is None else num_samples

    def objective(sel, frozen, batch, weight):
        full = sel if frozen is None else _grads.combine(sel, frozen)
        vals = loss_fn(full, batch)
        return jnp.sum(weight.astype(vals.dtype) * vals) / ns + l2 * losses.l2_penalty(sel)

    @jax.jit
    def run(sel, frozen, batch, weight):
        f = lambda p: objective(p, frozen, batch, weight)  # noqa: E731
        dtype = jax.tree_util.tree_leaves(sel)[0].dtype
        t = (1e-9 if jnp.finfo(dtype).bits >= 64 else 1e-5) if tol is None else tol
        opt = optax.lbfgs(memory_size=memory_size)
        vg = optax.value_and_grad_from_state(f)

        def step(carry):
            p, s, _ = carry
            v, g = vg(p, state=s)
            upd, s = opt.update(g, s, p, value=v, grad=g, value_fn=f)
            p = optax.apply_updates(p, upd)
            return p, s, optax.tree.norm(jax.grad(f)(p))

        def cont(carry):
            _, s, gn = carry
            k = optax.tree.get(s, "count")
            return (k == 0) | ((k < max_iter) & (gn > t))

        p, _, gn = jax.lax.while_loop(cont, step, (sel, opt.init(sel), jnp.asarray(jnp.inf, dtype)))
        return p, gn

    def refit(weight, params):
        if select is None:
            sel, frozen = params, None
        else:
            sel, frozen = _grads.partition(params, select)
        p, gn = run(sel, frozen, batch, jnp.asarray(weight))
        return (p if frozen is None else _grads.combine(p, frozen)), float(gn)

    return refit


def validate_last_layer(head: dict, batch: dict, measures: Mapping[str, Any], *, l2,
                        num_points: int = 40, indices=None, penalize_intercept: bool = True,
                        solver: _solvers.Solver = _solvers.Direct(), tol: float | None = None,
                        progress: bool = False):
    """Scores on the closed-form last-layer surrogate, checked by Newton leave-one-out refits.

    Args:
      head: ``{"kernel", "bias"?}`` at the optimum of the surrogate (e.g. from
        :func:`jaxunlearn.influence.last_layer.refit_head`).
      batch: the training set ``{"x": [n, d] features, "y": [n] labels}`` (as
        :func:`jaxunlearn.influence.last_layer.make_problem`).
      measures: ``{name: (measure, batch)}`` built on
        :func:`jaxunlearn.influence.last_layer.head_apply` (batches of features).
      l2: the surrogate's L2 coefficient.
      num_points, indices: which rows to retrain without (see :func:`validate`).
      penalize_intercept: as in :func:`jaxunlearn.influence.last_layer.make_problem`.
      solver: a solver object for :func:`jaxunlearn.influence.scores.influence_scores`.
      tol: Newton tolerance of the refits.

    Returns:
      ``(ValidationResult, InfluenceResult)``.
    """
    features, y = batch["x"], batch["y"]
    problem = _ll.make_problem(head, {"x": features, "y": y}, l2=l2, penalize_intercept=penalize_intercept)
    infl = _scores.influence_scores(problem, measures, solver=solver)
    fit_intercept = "bias" in head and head["bias"] is not None
    refit = last_layer_refit(features, y, l2=l2, fit_intercept=fit_intercept,
                             num_outputs=head["kernel"].shape[1], penalize_intercept=penalize_intercept,
                             tol=tol)
    n = int(np.shape(y)[0])
    result = validate(refit, head, measures, infl.scores, n=n, num_points=num_points, indices=indices,
                      progress=progress)
    return result, infl
