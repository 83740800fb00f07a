"""Per-sample unlearning weights: the soft-weight QP of seed 004 §4.2 and the hard baseline.

Sign convention (seed 004 eqs. (2)-(5), DESIGN.md "influence score convention").
  ``I = (I(z_1; -1), ..., I(z_n; -1))`` is the vector of influence *scores*: ``I_i`` is the
  predicted change of a measurement if sample i were removed. Re-weighting sample i by ``1 + eps_i``
  (eps_i = -1 removes it, eq. (1)) changes the measurement by ``I(z_i; eps_i) = -eps_i * I_i``, so a
  weight vector ``eps`` predicts

      metric change  = sum_i I_metric(z_i; eps_i) = -eps . I_metric,
      utility change = sum_i I_util(z_i; eps_i)   = -eps . I_util    (validation-loss change).

  Negative changes are improvements (less unfairness / adversarial loss, lower validation loss).

The QP (eq. 6), with ``f = I_metric``, ``u = I_util``, ``lam > 0``, ``delta >= 0``::

    minimise   -eps . f + lam ||eps||^2            (6a)
    subject to -eps . f >= -delta   i.e. eps . f <= delta     (6b: no over-correction)
               -eps . u <= 0        i.e. eps . u >= 0         (6c: utility not worse)

KKT. With multipliers mu (6b), nu (6c) >= 0, stationarity gives
``eps = ((1 - mu) f + nu u) / (2 lam)``. Write ``s = f . u`` and ``f_perp = f - (s / ||u||^2) u``
(the part of f orthogonal to u; ``||f||^2 ||u||^2 - s^2 = ||u||^2 ||f_perp||^2``, the denominator of
eq. (7) case 4). The four cases of eq. (7):

  1. neither active (mu = nu = 0): ``eps = f / (2 lam)``; valid iff s >= 0 and
     ``||f||^2 / (2 lam) <= delta``.
  2. (6b) active: ``eps = delta f / ||f||^2``, mu = 1 - 2 lam delta / ||f||^2; valid iff s >= 0 and
     ``||f||^2 / (2 lam) >= delta``.
  3. (6c) active: ``eps = f_perp / (2 lam)``, nu = -s / ||u||^2; valid iff s <= 0 and
     ``||f_perp||^2 / (2 lam) <= delta``.
  4. both active: ``eps = delta (||u||^2 f - s u) / (||f||^2 ||u||^2 - s^2) = delta f_perp / ||f_perp||^2``;
     valid iff s <= 0 and ``||f_perp||^2 / (2 lam) >= delta``.

So with ``g = f`` if ``s >= 0`` else ``f_perp``, the optimum is ``eps = g * min(1 / (2 lam), delta / ||g||^2)``
and the predicted metric change is ``-min(||g||^2 / (2 lam), delta)``. The objective is strictly convex
and ``eps = 0`` is always feasible (delta >= 0), so this KKT point is the unique optimum: the QP is
never infeasible. Computing case 4 through ``f_perp`` avoids the cancellation in the eq. (7)
denominator. Degenerate inputs: ``u = 0`` makes (6c) vacuous (cases 1-2); ``f = 0`` gives eps = 0;
``f`` anti-collinear with ``u`` (``||f_perp|| <= collinear_tol ||f||`` and s < 0) gives eps = 0, because
no weighting can lower the metric without raising the validation loss.

The reference's main variant (``variant="min_norm"``, "soft-2.3" in
``XinbaoQiao/Soft-Weighted-Machine-Unlearning``) always uses the case-4 formula with
``delta = |f0|``: the minimum-norm eps with predicted metric change exactly ``-delta`` and utility
change exactly 0 (lam cancels). These two equalities are jointly infeasible when f is collinear with
u; the fallback is then the QP's own answer as lam -> 0: ``delta f / ||f||^2`` (case 2) when
``s > 0`` (lowering the metric also lowers the validation loss) and 0 when ``s < 0``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "soft_weights",
    "hard_weights",
    "sweep_hard_fraction",
    "HardSweep",
    "InfeasibleWeightsError",
    "unlearning_sets",
    "removal_eps",
    "group_weights",
]


class InfeasibleWeightsError(ValueError):
    """The requested constraints on the predicted metric / utility change cannot be met."""


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_vectors(f, u) -> None:
    if f.ndim != 1 or u.ndim != 1:
        raise ValueError(f"influence vectors must be 1-D [n], got i_metric {f.shape} and i_util {u.shape}")
    if f.shape != u.shape:
        raise ValueError(f"i_metric has {f.shape[0]} entries but i_util has {u.shape[0]}: one score "
                         "per training sample is needed in both")
    if f.shape[0] == 0:
        raise ValueError("influence vectors are empty")
    if _is_concrete(f, u):
        for name, v in (("i_metric", f), ("i_util", u)):
            bad = ~np.isfinite(np.asarray(v))
            if bad.any():
                raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (first at index "
                                 f"{int(np.flatnonzero(bad)[0])})")


def _check_scalar(name: str, value, *, positive: bool) -> None:
    if value is None:
        raise ValueError(f"{name} is required")
    if not _is_concrete(value):
        return
    v = float(np.asarray(value))
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0 (the ridge term lam ||eps||^2 of eq. (6a)), got {v}")
    if not positive and v < 0:
        raise ValueError(
            f"{name} must be >= 0, got {v}: constraint (6b) bounds the predicted metric change below "
            f"by -delta, and a negative delta would demand that the metric get worse")


def soft_weights(i_metric, i_util, *, delta, lam=None, variant: str = "qp",
                 collinear_tol: float = 1e-4, strict: bool = False, scale: str = "change"):
    """Soft unlearning weights eps from influence scores (seed 004 eqs. (6)-(7)).

    Pure and jit-able (the cases are selected with ``jnp.where``); value checks run only on
    concrete inputs. See the module docstring for the derivation and the sign convention.

    Score scale (the factor n). The QP compares ``-eps . i_metric`` with ``delta`` in the
    metric's own units, so the scores must be *predicted changes*: the default
    ``scale="change"`` is :func:`jaxunlearn.influence.influence_scores`' default output,
    ``score_i = (1/n) ∇m^T H^{-1} ∇ell_i``. Seed 004's ``I(z_i; -1)`` (``influence_scores(...,
    scale="seed004")``) is n times larger; pass ``scale="seed004"`` and it is divided by
    n = ``len(i_metric)`` first. Feeding seed-004 scores as ``"change"`` would make eps n times too
    small (variant ``"min_norm"``) or change which case of eq. (7) applies (``"qp"``).

    Args:
      i_metric: [n] scores of the fairness or robustness measurement (``scale`` above).
      i_util: [n] scores of the validation loss (same scale).
      delta: >= 0, the largest allowed predicted decrease of the metric (eq. 6b), in the metric's
        units; the paper uses the current metric value ``|f0|``.
      lam: > 0, weight of ``||eps||^2`` (eq. 6a); required for ``variant="qp"``, unused by
        ``"min_norm"``.
      variant: ``"qp"`` (eq. (6) solved exactly, eq. (7)) or ``"min_norm"`` (the reference's
        main variant: case 4 always).
      collinear_tol: I_metric counts as collinear with I_util when
        ``||f_perp|| <= collinear_tol * ||I_metric||`` (the sine of their angle).
      strict: raise :class:`InfeasibleWeightsError` instead of falling back on degenerate
        inputs (zero I_metric, collinear vectors). Needs concrete inputs.
      scale: ``"change"`` (default) or ``"seed004"`` (scores n times larger, divided by n here).

    Returns:
      ``(eps, info)``: eps [n] (training weight ``1 + eps``, see :func:`training_weights`); info
      ``{"case": int32 in 1..4 (eq. (7) formula used), "metric_change": -eps . i_metric,
      "utility_change": -eps . i_util, "degenerate": bool (a fallback was taken)}``.
    """
    if variant not in ("qp", "min_norm"):
        raise ValueError(f"variant must be 'qp' or 'min_norm', got {variant!r}")
    if scale not in ("change", "seed004"):
        raise ValueError(f"scale must be 'change' (influence_scores' default: predicted change of the "
                         f"metric, 1/n included) or 'seed004' (n times that), got {scale!r}")
    f = jnp.asarray(i_metric)
    u = jnp.asarray(i_util)
    _check_vectors(f, u)
    if scale == "seed004":
        f, u = f / f.shape[0], u / u.shape[0]
    _check_scalar("delta", delta, positive=False)
    if variant == "qp":
        _check_scalar("lam", lam, positive=True)
    if not collinear_tol >= 0:
        raise ValueError(f"collinear_tol must be >= 0, got {collinear_tol}")
    dtype = jnp.result_type(f.dtype, u.dtype, jnp.float32)
    f, u = f.astype(dtype), u.astype(dtype)
    delta = jnp.asarray(delta, dtype)

    ff, uu, s = f @ f, u @ u, f @ u
    coef = jnp.where(uu > 0, s / jnp.where(uu > 0, uu, 1), 0)
    f_perp = f - coef * u
    pp = f_perp @ f_perp
    collinear = pp <= (collinear_tol ** 2) * ff  # also true when f = 0

    if variant == "qp":
        project = s < 0
        g = jnp.where(project & collinear, 0, jnp.where(project, f_perp, f))
        gg = g @ g
        inv2lam = 1.0 / (2.0 * jnp.asarray(lam, dtype))
        step = jnp.where(gg > 0, jnp.minimum(inv2lam, delta / jnp.where(gg > 0, gg, 1)), 0)
        eps = step * g
        capped = (gg * inv2lam > delta) & (gg > 0)
        case = 1 + capped.astype(jnp.int32) + 2 * project.astype(jnp.int32)
        degenerate = (ff == 0) | (project & collinear)
    else:
        main = delta * f_perp / jnp.where(pp > 0, pp, 1)
        same_dir = (s > 0) & (ff > 0)
        fallback = jnp.where(same_dir, delta * f / jnp.where(ff > 0, ff, 1), 0)
        eps = jnp.where(collinear, fallback, main)
        case = jnp.where(collinear, jnp.where(same_dir, 2, jnp.where(s < 0, 3, 1)), 4).astype(jnp.int32)
        degenerate = collinear

    if strict:
        if not _is_concrete(f, u, delta):
            raise ValueError("strict=True needs concrete inputs; under jit read info['degenerate']")
        _raise_if_infeasible(variant, float(ff), float(s), bool(degenerate), float(pp), collinear_tol)
    info = {"case": case, "metric_change": -(eps @ f), "utility_change": -(eps @ u),
            "degenerate": degenerate}
    return eps, info


def _raise_if_infeasible(variant, ff, s, degenerate, pp, tol) -> None:
    if not degenerate:
        return
    if ff == 0:
        raise InfeasibleWeightsError(
            "i_metric is zero: no weighting changes the predicted metric, so the metric target "
            "(6b) cannot be approached")
    sine = math.sqrt(pp / ff)
    if variant == "min_norm":
        raise InfeasibleWeightsError(
            "constraints (6b) as an equality (metric change = -delta) and (6c) as an equality "
            f"(utility change = 0) are jointly infeasible: i_metric is collinear with i_util "
            f"(sine of their angle {sine:.2e} <= collinear_tol {tol:g})")
    raise InfeasibleWeightsError(
        "constraint (6c) (utility change <= 0) admits no metric decrease: i_metric is "
        f"anti-collinear with i_util (f.u = {s:.3e} < 0, sine of their angle {sine:.2e}), so "
        "eps = 0 is the only optimum")


def hard_weights(scores, fraction: float, *, negative_only: bool = False) -> jax.Array:
    """Hard unlearning weights: eps = -1 on the most harmful ``floor(fraction * n)`` samples.

    A negative score means removing the sample lowers the measurement (DESIGN.md), so the most
    harmful samples are those with the most negative scores (ties: lower index first). This is
    the hard baseline of seed 004 (the reference removes ``argsort(scores)[:int(k n)]``).

    Args:
      scores: [n] influence scores ``I_metric(z_i; -1)``.
      fraction: k in [0, 1], a Python float (it fixes a static count).
      negative_only: never remove a sample whose score is >= 0 (predicted not to help).

    Returns:
      eps [n] in {-1, 0}.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty [n] vector, got shape {scores.shape}")
    if isinstance(fraction, bool) or not (isinstance(fraction, numbers.Real) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if _is_concrete(scores) and not np.all(np.isfinite(np.asarray(scores))):
        raise ValueError("scores contain NaN or inf")
    n = scores.shape[0]
    k = min(n, int(math.floor(fraction * n + 1e-9)))
    order = jnp.argsort(scores, stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    dtype = jnp.result_type(scores.dtype, jnp.float32)
    eps = jnp.where(rank < k, -1.0, 0.0).astype(dtype)  # k only enters as a scalar: no recompiles
    if negative_only:
        eps = jnp.where(scores < 0, eps, 0.0)
    return eps


class HardSweep(NamedTuple):
    """Result of :func:`sweep_hard_fraction`.

    Attributes:
      fraction: the best fraction k.
      value: the target metric at k (lower is better).
      weights: eps [n] at k.
      fractions: [m] the fractions evaluated, in order.
      values: [m] the target metric at each.
    """

    fraction: float
    value: float
    weights: np.ndarray
    fractions: np.ndarray
    values: np.ndarray


def sweep_hard_fraction(evaluate_fn: Callable[[np.ndarray], float], scores,
                        fractions: Sequence[float], *, patience: int = 1,
                        min_improvement: float = 0.0, negative_only: bool = False) -> HardSweep:
    """Increase the removed fraction k until the target metric stops improving (seed 004 §5).

    Args:
      evaluate_fn: ``eps [n] -> float``, the target metric after unlearning with the hard weights
        eps (lower is better: e.g. ``|DP|``, ``|EOP|``, adversarial loss; pass ``-accuracy`` for
        an accuracy).
      scores: [n] influence scores (see :func:`hard_weights`).
      fractions: strictly increasing fractions in [0, 1] to try (include 0.0 to let "remove
        nothing" win).
      patience: stop after this many consecutive fractions without improvement.
      min_improvement: an improvement must lower the best value by more than this.
      negative_only: passed to :func:`hard_weights`.

    Returns:
      A :class:`HardSweep` with the best fraction, its value and weights, and the curve so far.
    """
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size == 0:
        raise ValueError("fractions must be a non-empty 1-D sequence")
    if np.any(fr < 0) or np.any(fr > 1) or np.any(np.diff(fr) <= 0):
        raise ValueError(f"fractions must be strictly increasing in [0, 1], got {fr.tolist()}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    best = None
    misses = 0
    tried, values = [], []
    for k in fr:
        eps = np.asarray(hard_weights(scores, float(k), negative_only=negative_only))
        value = float(evaluate_fn(eps))
        if not math.isfinite(value):
            raise ValueError(f"evaluate_fn returned {value} at fraction {k}")
        tried.append(float(k))
        values.append(value)
        if best is None or value < best[1] - min_improvement:
            best, misses = (float(k), value, eps), 0
        else:
            misses += 1
            if misses >= patience:
                break
    return HardSweep(best[0], best[1], best[2], np.asarray(tried), np.asarray(values))


# ----------------------------------------------------------------------------- sets from weights

def removal_eps(num_samples: int, rows) -> np.ndarray:
    """Hard eps [n] float32: -1 on ``rows`` (the forget set D_f), 0 elsewhere."""
    n = int(num_samples)
    rows = np.asarray(rows)
    if rows.dtype == np.bool_:
        if rows.shape != (n,):
            raise ValueError(f"a forget mask must have shape ({n},), got {rows.shape}")
        rows = np.flatnonzero(rows)
    rows = rows.astype(np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"forget rows must lie in [0, {n}), got [{rows.min()}, {rows.max()}]")
    eps = np.zeros(n, np.float32)
    eps[rows] = -1.0
    return eps


def unlearning_sets(split: dict, eps, *, negative_only: bool = False) -> dict:
    """``{"forget", "retain"}`` sets of the training ``split`` for per-sample weights ``eps`` [n].

    The one constructor of weighted sets (DESIGN.md "one weight path"). Both sets are the whole
    training split (its arrays shared, not copied); their ``weight`` columns are

    * forget: ``eps`` -- the signed seed-004 perturbation; -1 is the published method on that
      sample (removal / ascent), 0 leaves it out, a soft eps scales its forgetting objective by
      ``-eps`` (:mod:`jaxunlearn.methods.base`);
    * retain: ``1 + eps`` -- the reweighted risk of seed 004 eq. (1); 0 for removed samples.

    So a hard ``eps`` in {-1, 0} (:func:`removal_eps`, :func:`hard_weights`) gives exactly D_f
    (weight -1) and D_r (weight 1), and the solver's eps (:func:`soft_weights`) the SW- version of
    any method, with the same code; weight-0 samples are never scheduled. Retraining is
    ``run(methods.retrain(...), fresh, {"retain": sets["retain"]}, ...)``.

    Args:
      split: the training split ``{"x", "y", ...}``.
      eps: [n] weights.
      negative_only: keep only ``eps < 0`` in the forget set. A forget row with ``eps > 0``
        *reverses* its forgetting objective (for GA: descent, eq. (9)); for methods whose
        forgetting objective is not an ascent (RL, SalUn, BS, Bad-T, SCRUB) one may prefer to
        apply it only to the samples the solver down-weights.

    Raises:
      ValueError: eps of the wrong shape, NaN/inf, an empty forget set, or a retain set with no
        sample left (every sample removed).
    """
    eps = np.asarray(eps, np.float32)
    n = int(np.shape(split["y"])[0])
    if eps.shape != (n,):
        raise ValueError(f"eps has shape {eps.shape}, but the split has {n} samples")
    if not np.all(np.isfinite(eps)):
        raise ValueError("eps contains NaN or inf")
    forget = np.where(eps < 0, eps, 0.0).astype(np.float32) if negative_only else eps
    if not np.any(forget):
        raise ValueError("eps is 0 on every sample: the forget set is empty")
    retain = (1.0 + eps).astype(np.float32)
    if not np.any(retain):
        raise ValueError("eps = -1 on every sample: the forget set covers the whole training set, "
                         "so nothing is left to retain")
    base = {k: v for k, v in split.items() if k != "weight"}
    return {"forget": {**base, "weight": forget}, "retain": {**base, "weight": retain}}


def group_weights(y, s, retain, *, num_sensitive: int | None = None,
                  normalize: bool = False) -> np.ndarray:
    """De Min et al.'s group reweighting ``w_i = N_train(g_i) / N_retain(g_i)``, ``g = s + y |S|``.

    Sampling D_r with probabilities proportional to w (the reference: a weighted sampler with
    |D_r| draws per epoch, ``run(..., sampling=w)``) or weighting its losses by w restores the
    original group distribution: each group's total weight on D_r equals its size in the full
    training set.

    Args:
      y: [n] integer target labels of the whole training set.
      s: [n] integer sensitive attribute values (>= 0).
      retain: [n] bool, True for retained samples (False = forgotten).
      num_sensitive: |S| (default ``max(s) + 1``, so groups never collide).
      normalize: rescale so that the weights average 1 over D_r (as loss weights, this keeps the
        learning rate's effective scale; the sampling distribution is unchanged).

    Returns:
      [n] float32 weights, 0 on forgotten samples.
    """
    y = np.asarray(y)
    s = np.asarray(s)
    retain = np.asarray(retain)
    n = y.shape[0]
    if y.shape != (n,) or s.shape != (n,) or retain.shape != (n,):
        raise ValueError(f"y, s and retain must all have shape ({n},): got {y.shape}, {s.shape}, {retain.shape}")
    if retain.dtype != np.bool_:
        raise ValueError(f"retain must be a bool mask, got dtype {retain.dtype}")
    for name, a in (("y", y), ("s", s)):
        if not np.issubdtype(a.dtype, np.integer) or (a.size and a.min() < 0):
            raise ValueError(f"{name} must hold non-negative integers")
    if not retain.any():
        raise ValueError("the retain set is empty")
    size_s = int(s.max()) + 1 if num_sensitive is None else int(num_sensitive)
    if size_s <= int(s.max()):
        raise ValueError(f"num_sensitive={num_sensitive} but s takes the value {int(s.max())}")
    g = s.astype(np.int64) + y.astype(np.int64) * size_s
    n_groups = int(g.max()) + 1
    n_train = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_retain = np.bincount(g[retain], minlength=n_groups).astype(np.float64)
    w = np.zeros(n, np.float64)
    w[retain] = n_train[g[retain]] / n_retain[g[retain]]
    if normalize:
        w[retain] /= w[retain].mean()
    return w.astype(np.float32)
