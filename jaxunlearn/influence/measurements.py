"""Differentiable measurements ``m(params, batch) -> scalar`` whose change influence predicts.

Each factory takes a model ``apply_fn`` (the jaxunlearn contract ``apply(variables, x, *, train)
-> (logits, aux)``; for the last-layer surrogate use
:func:`jaxunlearn.influence.last_layer.head_apply` on features) and returns a pure
``measure(params, batch)``, evaluated in eval mode on a batch ``{"x", "y", "weight"?, "group"?}``
(weight-0 rows are padding and ignored; without ``weight`` every row counts). The measurements of
seed 004 §3 and Chhabra et al. (2024):

* :func:`utility` -- the validation loss, mean or sum (seed 004 eq. (3) uses the sum);
* :func:`demographic_parity` -- the DP surrogate, the gap between groups of the mean *soft*
  probability of the positive class (eq. (4));
* :func:`equal_opportunity` -- the EOP surrogate, the gap between groups of the mean loss on the
  samples with ``y = 1`` (eq. (4));
* robustness (eq. (5)) -- :func:`utility` on adversarial validation points: the adversarial batch
  is computed *once* against the trained model (:func:`linear_adversarial_batch` for linear heads,
  :func:`attack_batch` with FGSM/PGD for networks) and then held fixed as data, so the measurement
  is a smooth function of the parameters. (There is no separate ``robustness`` factory: it would
  be ``utility`` under another name; the batch is what makes it a robustness measurement.)
* :func:`custom` -- any differentiable user function.

``aggregate`` reduces the per-group values ``v_g``:

* ``"signed"`` (the default; two groups only): the reference code's orientation, DP ``v_1 - v_0``
  (``s = 1`` minus ``s = 0``) and EOP ``v_0 - v_1``. A smooth function whose scores keep their
  sign whichever group is ahead. To reduce the *size* of a gap with signed scores, use
  ``sign(value) * scores``.
* ``"range"``: ``max_g v_g - min_g v_g``; for two groups ``|v_1 - v_0|``, the paper's
  ``f_DP = |E[ŷ|g=0] - E[ŷ|g=1]|``. Differentiable wherever the extreme groups are unique
  (almost everywhere); its gradient is that of the current extreme pair, so its scores are the
  signed scores times ``sign(gap)``: they flip when the gap changes sign. Required for more than
  two groups (or ``"mad"``).
* ``"mad"``: the mean absolute deviation ``mean_g |v_g - v̄|`` from the pooled value v̄ over all
  samples; smooth except where a group sits exactly on v̄.

Multi-class targets: ``classes`` lists the "positive" classes; the measurement is the mean over
them of the per-class gap (DP: gap of ``p(y = c)``; EOP: gap of the loss on ``y = c``). The default
is class 1 for binary models and every class for K > 2 (for EOP that is an equalised-odds gap).

A measurement whose groups (or (group, class) cells) are empty in the batch is undefined: the
factories' ``measure.validate(batch)`` raises a ValueError naming the missing cell, the measure
itself raises when called on concrete arrays, and under ``jit`` it returns NaN (never a silent
number). :func:`jaxunlearn.influence.scores.influence_scores` validates before it jits.

The score of training sample i for a measurement m is the predicted change of m, in m's own units,
when i is removed (DESIGN.md), so a negative score for a DP/EOP/robustness measurement means that
removing i would reduce unfairness / adversarial loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import attacks, losses
from jaxunlearn.models.api import as_apply

__all__ = [
    "AGGREGATES",
    "utility",
    "demographic_parity",
    "equal_opportunity",
    "custom",
    "validate_groups",
    "label_check",
    "linear_adversarial_batch",
    "attack_batch",
]

AGGREGATES = ("range", "signed", "mad")


def _variables(params, model_state):
    return {"params": params, **(model_state or {})}


def _weight(batch, n, dtype):
    w = batch.get("weight")
    return jnp.ones((n,), dtype) if w is None else jnp.asarray(w).astype(dtype)


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _attach(fn, validate, name, labels=None):
    fn.validate = validate
    fn.__name__ = name
    if labels is not None:
        fn.check_labels = labels
    return fn


def label_check(apply_fn, model_state=None):
    """``check(params, batch, name)``: a ValueError if the integer labels of the batch's non-padding
    rows are not classes of the model (its output size at ``params``; 1 logit = 2 classes).
    :func:`jaxunlearn.influence.scores.influence_scores` runs it before anything compiles."""

    def check(params, batch, name="the measurement's batch"):
        from jaxunlearn.evaluation import check_labels

        y, x = batch.get("y"), batch.get("x")
        if y is None or x is None or not _concrete(y, batch.get("weight")):
            return
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            return
        if batch.get("weight") is not None:
            y = y[np.asarray(batch["weight"]) != 0]
        xs = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), jnp.asarray(x[:1]).dtype)
        logits = jax.eval_shape(
            lambda p, xb: as_apply(apply_fn)(_variables(p, model_state), xb, train=False)[0],
            params, xs)
        check_labels(y, 2 if int(logits.shape[-1]) == 1 else int(logits.shape[-1]), name=f"{name} 'y'")

    return check


def _no_check(batch):
    del batch


@dataclasses.dataclass(frozen=True, eq=False)
class _Measure:
    """A measure built by ``factory(*args, **kwargs)``, equal to any other built from the same
    (hashable) arguments: measures are static arguments of the jitted scoring functions, so equal
    measures reuse compilations through jit's own cache (no module-level memo). Attributes of the
    built function (``validate``, ``__name__``) are forwarded."""

    factory: Callable
    args: tuple
    kwargs: tuple
    fn: Callable

    def __call__(self, params, batch):
        return self.fn(params, batch)

    def __getattr__(self, name):
        if name == "fn":   # not yet set (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def _key(self):
        return (self.factory, self.args, self.kwargs)

    def __eq__(self, other):
        return isinstance(other, _Measure) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


def _by_value(factory):
    """Factories return :class:`_Measure` values when their arguments are hashable; a
    ``model_state`` (arrays) or other unhashable arguments give a plain function."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        fn = factory(*args, **kwargs)
        if kwargs.get("model_state") is not None:
            return fn
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:
            return fn
        return _Measure(factory, *key, fn)

    return wrapper


def _loss_measure(apply_fn, loss_fn, reduction, model_state, name):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def measure(params, batch):
        logits, _ = as_apply(apply_fn)(_variables(params, model_state), batch["x"], train=False)
        values = loss_fn(logits, batch["y"])
        w = _weight(batch, values.shape[0], values.dtype)
        if reduction == "sum":
            return jnp.sum(w * values)
        return losses.weighted_mean(values, w)

    return _attach(measure, _no_check, f"{name}_{reduction}", label_check(apply_fn, model_state))


@_by_value
def utility(apply_fn, *, loss_fn=losses.cross_entropy, reduction: str = "mean",
            model_state: dict | None = None) -> Callable:
    """The loss on a (validation) batch: ``(1/m) sum_i w_i ell_i`` (mean) or ``sum_i w_i ell_i``.

    Args:
      apply_fn: the model's apply.
      loss_fn: per-example loss ``(logits, y) -> [B]``.
      reduction: ``"mean"`` (over the non-padding rows, :func:`jaxunlearn.losses.weighted_mean`) or
        ``"sum"`` (seed 004 eq. (3)/(5): ``I_util`` and ``I_robust`` sum over the validation set).
      model_state: the model's non-parameter collections (e.g. batch statistics), if any.

    Returns:
      ``measure(params, batch) -> scalar``.
    """
    return _loss_measure(apply_fn, loss_fn, reduction, model_state, "utility")


def _check_aggregate(aggregate, num_groups):
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if num_groups < 2:
        raise ValueError(f"a fairness measurement needs num_groups >= 2, got {num_groups}")
    if aggregate == "signed" and num_groups != 2:
        raise ValueError(f"aggregate='signed' (the default) needs exactly two groups, got "
                         f"num_groups={num_groups}; pass aggregate='range' or 'mad' for more groups")


def _resolve_classes(classes, num_logits):
    k = 2 if num_logits == 1 else num_logits
    if classes is None:
        cls = (1,) if k == 2 else tuple(range(k))
    else:
        cls = tuple(int(c) for c in np.atleast_1d(classes))
    bad = [c for c in cls if not 0 <= c < k]
    if bad or not cls:
        raise ValueError(f"classes {cls} must be non-empty and in [0, {k}) for a model with {k} classes")
    return cls


def _group_onehot(batch, num_groups, group_key, dtype):
    if group_key not in batch:
        raise ValueError(f"fairness measurement needs batch[{group_key!r}] (the sensitive attribute)")
    return jax.nn.one_hot(jnp.asarray(batch[group_key]), num_groups, dtype=dtype)  # [B, G]


def validate_groups(batch: dict, *, num_groups: int, classes: Sequence[int] | None = None,
                    group_key: str = "group", what: str = "measurement") -> None:
    """Raise a ValueError if a group (or a (group, class) cell) has no non-padding sample.

    Args:
      batch: ``{"group", "y"?, "weight"?}`` with concrete arrays.
      num_groups: number of groups G; every group in [0, G) must be present.
      classes: if given, every (group, y = c) cell for c in ``classes`` must be present (EOP).
      group_key: the batch key of the sensitive attribute.
      what: name used in the message.
    """
    if group_key not in batch:
        raise ValueError(f"{what} needs batch[{group_key!r}] (the sensitive attribute)")
    g = np.asarray(batch[group_key])
    w = np.ones(g.shape[0]) if batch.get("weight") is None else np.asarray(batch["weight"])
    live = w != 0
    if live.any() and (g[live].min() < 0 or g[live].max() >= num_groups):
        raise ValueError(f"batch[{group_key!r}] has values in [{g[live].min()}, {g[live].max()}], outside "
                         f"[0, {num_groups}) for num_groups={num_groups}")
    for s in range(num_groups):
        in_g = live & (g == s)
        if not in_g.any():
            raise ValueError(f"{what} refers to group {group_key}={s}, which has no sample in the data "
                             f"({int(live.sum())} non-padding rows; groups present: "
                             f"{sorted(set(g[live].tolist()))})")
        if classes is not None:
            y = np.asarray(batch["y"])
            for c in classes:
                if not (in_g & (y == c)).any():
                    raise ValueError(f"{what} refers to the cell ({group_key}={s}, y={c}), which has no "
                                     f"sample in the data")


def _group_means(values, onehot, w):
    """Per-group weighted means [G, ...] of ``values`` [B, ...] (NaN for an empty group)."""
    live = (w != 0).astype(values.dtype)
    wv = (w[:, None] * values) if values.ndim == 2 else (w * values)
    sums = jnp.tensordot(onehot, wv, axes=(0, 0))  # [G, ...]
    counts = onehot.T @ live  # [G]
    counts = counts[:, None] if values.ndim == 2 else counts
    return sums / counts  # 0/0 -> NaN: an absent group never yields a silent number


def _aggregate(v, pooled, aggregate, orientation):
    """Reduce per-group values v [G, C] to per-class gaps [C]."""
    if aggregate == "range":
        return jnp.max(v, axis=0) - jnp.min(v, axis=0)
    if aggregate == "signed":
        return orientation * (v[1] - v[0])
    return jnp.mean(jnp.abs(v - pooled[None]), axis=0)


@_by_value
def demographic_parity(apply_fn, *, num_groups: int = 2, aggregate: str = "signed",
                       classes: Sequence[int] | None = None, group_key: str = "group",
                       model_state: dict | None = None) -> Callable:
    """DP surrogate: group gap of the mean soft probability ``p(y = c | x)`` (seed 004 eq. (4)).

    Two groups, ``aggregate="signed"`` (the default): ``mean_{s=1} p - mean_{s=0} p``, the
    reference's ``loss_dp``; ``"range"`` is its absolute value (module docstring for G > 2 and
    multi-class).

    Args:
      apply_fn: the model's apply.
      num_groups: number of values of the sensitive attribute (static).
      aggregate: ``"signed"`` (default, two groups), ``"range"`` or ``"mad"``.
      classes: positive classes (default: 1 for binary, all for K > 2).
      group_key: batch key of the sensitive attribute.
      model_state: non-parameter collections, if any.

    Returns:
      ``measure(params, batch) -> scalar`` with a ``validate(batch)`` attribute.
    """
    _check_aggregate(aggregate, num_groups)

    def measure(params, batch):
        logits, _ = as_apply(apply_fn)(_variables(params, model_state), batch["x"], train=False)
        cls = _resolve_classes(classes, logits.shape[-1])
        if _concrete(batch.get(group_key), batch.get("weight")) and group_key in batch:
            validate_groups(batch, num_groups=num_groups, group_key=group_key, what="demographic_parity")
        probs = losses.probabilities(logits)[:, jnp.asarray(cls)]  # [B, C]
        w = _weight(batch, probs.shape[0], probs.dtype)
        onehot = _group_onehot(batch, num_groups, group_key, probs.dtype)
        v = _group_means(probs, onehot, w)
        pooled = None
        if aggregate == "mad":
            pooled = jnp.sum(w[:, None] * probs, 0) / jnp.maximum(jnp.sum((w != 0).astype(w.dtype)), 1.0)
        return jnp.mean(_aggregate(v, pooled, aggregate, 1.0))

    def validate(batch):
        validate_groups(batch, num_groups=num_groups, group_key=group_key, what="demographic_parity")

    return _attach(measure, validate, f"demographic_parity_{aggregate}")


@_by_value
def equal_opportunity(apply_fn, *, loss_fn=losses.cross_entropy, num_groups: int = 2,
                      aggregate: str = "signed", classes: Sequence[int] | None = None,
                      group_key: str = "group", model_state: dict | None = None) -> Callable:
    """EOP surrogate: group gap of the mean loss on samples with ``y = c`` (seed 004 eq. (4)).

    Two groups, ``aggregate="signed"`` (the default): ``mean_{s=0,y=1} ell - mean_{s=1,y=1} ell``,
    the reference's ``loss_ferm``; ``"range"`` is its absolute value. Arguments as
    :func:`demographic_parity`, plus ``loss_fn`` (per-example loss).
    """
    _check_aggregate(aggregate, num_groups)

    def measure(params, batch):
        logits, _ = as_apply(apply_fn)(_variables(params, model_state), batch["x"], train=False)
        cls = _resolve_classes(classes, logits.shape[-1])
        if _concrete(batch.get(group_key), batch.get("weight"), batch["y"]) and group_key in batch:
            validate_groups(batch, num_groups=num_groups, classes=cls, group_key=group_key,
                            what="equal_opportunity")
        values = loss_fn(logits, batch["y"])
        w = _weight(batch, values.shape[0], values.dtype)
        onehot = _group_onehot(batch, num_groups, group_key, values.dtype)
        y_is = (batch["y"][:, None] == jnp.asarray(cls)[None]).astype(values.dtype)  # [B, C]
        wc = w[:, None] * y_is  # per-class weights
        live = ((w != 0)[:, None] * y_is)
        sums = jnp.einsum("bg,bc->gc", onehot, wc * values[:, None])
        counts = jnp.einsum("bg,bc->gc", onehot, live)
        v = sums / counts
        pooled = jnp.sum(wc * values[:, None], 0) / jnp.sum(live, 0) if aggregate == "mad" else None
        return jnp.mean(_aggregate(v, pooled, aggregate, -1.0))

    def validate(batch):
        validate_groups(batch, num_groups=num_groups, classes=_classes_for_validate(classes, batch),
                        group_key=group_key, what="equal_opportunity")

    return _attach(measure, validate, f"equal_opportunity_{aggregate}",
                   label_check(apply_fn, model_state))


def _classes_for_validate(classes, batch):
    if classes is not None:
        return tuple(int(c) for c in np.atleast_1d(classes))
    y = np.asarray(batch["y"])
    k = int(y.max()) + 1 if y.size else 2
    return (1,) if k <= 2 else tuple(range(k))


def custom(fn: Callable, *, name: str = "custom", validate: Callable | None = None) -> Callable:
    """Wrap a user's differentiable ``fn(params, batch) -> scalar`` as a measurement.

    The wrapper checks that the output is a scalar (a clear error instead of a silent broadcast).
    ``validate(batch)``, if given, is called on concrete batches before scoring.
    """

    def measure(params, batch):
        out = fn(params, batch)
        if jnp.ndim(out) != 0:
            raise ValueError(f"measurement {name!r} must return a scalar, got shape {jnp.shape(out)}")
        return out

    return _attach(measure, validate or _no_check, name)


def linear_adversarial_batch(batch: dict, kernel, bias=None, *, gamma: float = 1.3) -> dict:
    """``batch`` with ``x`` replaced by its Megyeri perturbation against a linear model/head.

    For logistic regression ``x`` are the inputs; for a network head, pass a batch of penultimate
    features (:func:`jaxunlearn.train.predict`) and the head's ``kernel``/``bias``. Labels, groups
    and weights are kept. See :func:`jaxunlearn.attacks.linear_perturbation`.
    """
    out = dict(batch)
    out["x"] = attacks.linear_perturbation(jnp.asarray(batch["x"]), jnp.asarray(kernel),
                                           None if bias is None else jnp.asarray(bias), gamma=gamma)
    return out


def attack_batch(apply_fn, variables, batch: dict, *, eps: float, attack: str = "fgsm",
                 input_range=(0.0, 1.0), step_size: float | None = None, steps: int = 10,
                 key: jax.Array | None = None, random_start: bool = False,
                 loss_fn=losses.cross_entropy) -> dict:
    """``batch`` with ``x`` replaced by FGSM or PGD adversarial inputs against ``variables``.

    Compute it once, against the trained model, and keep it fixed: the robustness measurement is
    then a smooth function of the parameters (seed 004 eq. (5)).
    """
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    if attack == "fgsm":
        x_adv = attacks.fgsm(apply_fn, variables, x, y, eps=eps, input_range=input_range, loss_fn=loss_fn)
    elif attack == "pgd":
        step_size = 2.5 * eps / steps if step_size is None else step_size
        x_adv = attacks.pgd(apply_fn, variables, x, y, eps=eps, step_size=step_size, steps=steps,
                            input_range=input_range, key=key, random_start=random_start, loss_fn=loss_fn)
    else:
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    out = dict(batch)
    out["x"] = x_adv
    return out
