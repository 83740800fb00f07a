"""A fairness-gap-preserving regulariser that any unlearning method can use (beyond the papers).

Tran & Woo (seeds 000/001) conjecture that a robust unlearning algorithm preserves the original
model's fairness-gap (Conjecture 1) and leave open how to build one (open question 3). This module
adds a penalty that keeps the per-class feature variances of the normalisation layers where the
original model theta_0 had them.

**The penalty** on a retain batch B (eval mode, both models; ``s_c^l`` is ``sigma_c^l`` of
:mod:`jaxunlearn.metrics.fairness_gap`: the mean over the layer's features of each feature's
variance over the batch samples of class c)::

    target="variances":  R(theta) = (1/L) sum_l (1/|C_l|) sum_{c in C_l} (s_c^l(th) - s_c^l(th_0))^2
    target="gap":        R(theta) = (1/L) sum_l (eps^l(th) - eps^l(th_0))^2,
                         eps^l = max_{c in C_l} s_c^l - min_{c in C_l} s_c^l   (Definition 1)

with C_l the classes of the batch that have at least ``min_count`` samples (and are in ``classes``,
if given; the forgotten class is absent from retain batches anyway) and L the number of penalised
layers. Both are 0 at theta_0 for every batch, since the reference variances are those of theta_0
on the *same* batch (one extra eval-mode forward pass). ``"variances"`` is smooth and bounds the gap
change (|eps^l(theta) - eps^l(theta_0)| <= 2 max_c |s_c^l(theta) - s_c^l(theta_0)|);
``"gap"`` is Definition 1 itself, differentiable except where the arg-max/min class changes. The
per-class statistics come from :func:`jaxunlearn.metrics.fairness_gap_update` (the one
implementation of the metric), which is differentiable; only the running BatchNorm averages are
treated as constants (eval mode).

**Composition** (:func:`with_fairness_gap_penalty`). A :class:`~jaxunlearn.methods.base.Method`
does not expose its loss, so the wrapper composes by operator splitting: each ``update`` first runs
the wrapped method's ``update``, then takes one step of its own optimizer on ``strength * R`` on
the same retain batch, restricted to the same trainable subset. With plain SGD of learning rate
eta for both, one wrapped update equals, to first order in eta, one step on ``loss + strength * R``
(Lie-Trotter splitting). The wrapper reads the retain set even if the method does not; for a
forget-only method (GA, BS) that changes the epoch to one pass over D_r with the forget set cycled
(see :func:`~jaxunlearn.loop.run`).

Typical use::

    rl = methods.random_labels(model.apply)
    rl_fgp = methods.with_fairness_gap_penalty(rl, model.apply, strength=10.0, num_classes=10)
    variables, state, history = loop.run(rl_fgp, variables, sets, ...)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn.methods import base
from jaxunlearn.metrics.fairness_gap import fairness_gap_init, fairness_gap_update
from jaxunlearn.models.api import as_apply

__all__ = [
    "TARGETS",
    "batch_class_variances",
    "fairness_gap_penalty",
    "penalty_loss",
    "with_fairness_gap_penalty",
]

TARGETS = ("variances", "gap")


def _check_norm(norm_outputs, what: str) -> None:
    if not norm_outputs:
        raise ValueError(f"{what}: the model exposes no normalisation outputs (aux['norm'] is "
                         "empty with capture_norm=True), so the fairness-gap penalty is undefined")


def batch_class_variances(norm_outputs: dict, y, weight, *, num_classes: int,
                          per_channel: bool = False) -> tuple[dict, jax.Array]:
    """Per-class feature variances of one batch, differentiable in the normalisation outputs.

    Args:
      norm_outputs: ``{layer: [B, ...]}`` (``aux["norm"]`` of ``apply(..., capture_norm=True)``).
      y: [B] integer labels in [0, K).
      weight: [B] sample weights; 0 marks padding (ignored), any other value counts once.
      num_classes: K.
      per_channel: as :mod:`jaxunlearn.metrics.fairness_gap`.

    Returns:
      ``({layer: sigma [K]}, n [K])``: ``sigma_c`` the mean over features of the per-feature
      (ddof = 0) variance over the class-c samples (0 for an empty class), and ``n_c`` the number
      of class-c samples in the batch.
    """
    _check_norm(norm_outputs, "batch_class_variances")
    stats = fairness_gap_init(norm_outputs, num_classes=num_classes, per_channel=per_channel)
    stats = fairness_gap_update(stats, norm_outputs, y, weight, per_channel=per_channel)
    active = (jnp.asarray(weight) != 0).astype(jnp.float32)
    n = jnp.sum(jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * active[:, None], axis=0)
    sigma = {name: jnp.mean(s["m2"], axis=1) / jnp.maximum(s["count"], 1.0)
             for name, s in stats.items()}
    return sigma, n


def _class_mask(num_classes: int, classes: Sequence[int] | None) -> np.ndarray:
    if classes is None:
        return np.ones(num_classes, bool)
    cls = [int(c) for c in classes]
    if len(cls) < 2 or len(set(cls)) != len(cls) or min(cls) < 0 or max(cls) >= num_classes:
        raise ValueError(f"classes must be >= 2 distinct ids in [0, {num_classes}), got {classes}")
    mask = np.zeros(num_classes, bool)
    mask[cls] = True
    return mask


def fairness_gap_penalty(norm_outputs: dict, reference_outputs: dict, y, weight, *,
                         num_classes: int, classes: Sequence[int] | None = None,
                         per_channel: bool = False, target: str = "variances",
                         layers: Sequence[str] | None = None, min_count: int = 2):
    """The penalty R (module docstring) from two models' normalisation outputs on one batch.

    Args:
      norm_outputs: ``{layer: [B, ...]}`` of the model being trained (differentiated).
      reference_outputs: the same layers of theta_0 on the same batch (treated as constants).
      y: [B] labels; weight: [B] weights (0 = padding).
      num_classes: K.
      classes: optional class ids the penalty may use (default all K).
      per_channel: as :mod:`jaxunlearn.metrics.fairness_gap`.
      target: ``"variances"`` or ``"gap"``.
      layers: optional layer names to penalise (default every normalisation layer).
      min_count: a class enters only with at least this many samples in the batch (>= 2: a single
        sample has variance 0).

    Returns:
      ``(R, {"classes_used": scalar, "gap_change": scalar})``: R is a scalar; ``gap_change`` is the
      mean over layers of ``|eps^l(theta) - eps^l(theta_0)|`` on the batch (a diagnostic).

    Raises:
      ValueError: unknown target, unknown layer names, no normalisation outputs, bad classes.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if int(min_count) < 2:
        raise ValueError(f"min_count must be >= 2 (one sample has no variance), got {min_count}")
    _check_norm(norm_outputs, "fairness_gap_penalty")
    names = sorted(norm_outputs) if layers is None else list(layers)
    missing = [n for n in names if n not in norm_outputs or n not in reference_outputs]
    if missing or not names:
        raise ValueError(f"layers {missing or names} are not normalisation outputs of the model "
                         f"(available: {sorted(norm_outputs)})")
    pick = lambda tree: {n: tree[n] for n in names}
    sigma, n = batch_class_variances(pick(norm_outputs), y, weight, num_classes=num_classes,
                                     per_channel=per_channel)
    sigma0, _ = batch_class_variances(jax.lax.stop_gradient(pick(reference_outputs)), y, weight,
                                      num_classes=num_classes, per_channel=per_channel)
    valid = (n >= min_count) & jnp.asarray(_class_mask(num_classes, classes))
    used = jnp.sum(valid.astype(jnp.float32))

    def gap(s):
        hi = jnp.max(jnp.where(valid, s, -jnp.inf))
        lo = jnp.min(jnp.where(valid, s, jnp.inf))
        return jnp.where(used >= 2, hi - lo, 0.0)

    terms, changes = [], []
    for name in names:
        s, s0 = sigma[name], sigma0[name]
        change = gap(s) - gap(s0)
        if target == "variances":
            sq = jnp.where(valid, jnp.square(s - s0), 0.0)
            terms.append(jnp.sum(sq) / jnp.maximum(used, 1.0))
        else:
            terms.append(jnp.square(change))
        changes.append(jnp.abs(change))
    return jnp.mean(jnp.stack(terms)), {"classes_used": used,
                                        "gap_change": jnp.mean(jnp.stack(changes))}


def penalty_loss(apply_fn, params, model_state: dict, reference_variables, batch: dict, *,
                 num_classes: int, classes: Sequence[int] | None = None, per_channel: bool = False,
                 target: str = "variances", layers: Sequence[str] | None = None,
                 min_count: int = 2):
    """R(theta) of a model on a batch against theta_0 (eval-mode forward passes of both).

    Args:
      apply_fn: the model's ``apply`` (must honour ``capture_norm=True``).
      params: the parameters being trained (differentiate w.r.t. these).
      model_state: the model's other collections (BatchNorm running averages; constants here).
      reference_variables: theta_0's full variables dict.
      batch: ``{"x", "y", "weight"}`` (a retain batch).
      num_classes, classes, per_channel, target, layers, min_count: see
        :func:`fairness_gap_penalty`.

    Returns:
      ``(R, diagnostics)`` as :func:`fairness_gap_penalty`.
    """
    _, aux = as_apply(apply_fn)({"params": params, **model_state}, batch["x"], train=False, capture_norm=True)
    _, aux0 = as_apply(apply_fn)(jax.lax.stop_gradient(reference_variables), batch["x"], train=False,
                       capture_norm=True)
    norm, norm0 = aux.get("norm"), aux0.get("norm")
    _check_norm(norm, "penalty_loss")
    return fairness_gap_penalty(norm, norm0, batch["y"], batch["weight"], num_classes=num_classes,
                                classes=classes, per_channel=per_channel, target=target,
                                layers=layers, min_count=min_count)


def with_fairness_gap_penalty(method: base.Method, apply_fn, *, strength: float, num_classes: int,
                              optimizer: optax.GradientTransformation | None = None,
                              trainable=None, reference=None,
                              classes: Sequence[int] | None = None, per_channel: bool = False,
                              target: str = "variances", layers: Sequence[str] | None = None,
                              min_count: int = 2, name: str | None = None) -> base.Method:
    """Wrap any method so that each update is followed by a step on ``strength * R``.

    Args:
      method: the :class:`~jaxunlearn.methods.base.Method` to regularise (not one-shot).
      apply_fn: the model's ``apply``.
      strength: lambda >= 0 (0 leaves the method's updates unchanged, up to the extra passes).
      num_classes: K.
      optimizer: the penalty step's optimizer (default plain SGD, lr 0.01, the RL/SalUn/CF lr).
      trainable: the trainable mask the wrapped method uses (None = all parameters); the penalty
        step moves exactly these elements, so frozen layers stay bit-identical.
      reference: theta_0's variables (default: the variables given to ``init``).
      classes, per_channel, target, layers, min_count: see :func:`fairness_gap_penalty`.
      name: report label (default ``method.name + "+FGP"``).

    Returns:
      A :class:`~jaxunlearn.methods.base.Method` reading the method's sets and the retain set.
      Its state is a ``MethodState`` whose ``opt_state`` is the penalty optimizer's and whose
      ``extra`` holds ``"inner"`` (the wrapped method's state) and ``"reference"`` (theta_0).
      Metrics: the method's, plus ``"fg_penalty"`` (R before the penalty step) and
      ``"fg_gap_change"``.
    """
    if not isinstance(method, base.Method):
        raise ValueError(f"method must be a jaxunlearn.methods.Method, got {type(method).__name__}")
    if method.one_shot:
        raise ValueError(f"{method.name} is one-shot; the penalty wraps iterative methods only")
    strength = base.check_positive("strength", strength, allow_zero=True)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if int(min_count) < 2:
        raise ValueError(f"min_count must be >= 2, got {min_count}")
    _class_mask(num_classes, classes)
    label = name or f"{method.name}+FGP"
    subset, tx = base.optimizer_for(label, optimizer, trainable,
                                    default=optax.sgd(0.01))
    uses = tuple(s for s in base.SETS if s in method.uses or s == "retain")
    opts = dict(num_classes=num_classes, classes=classes, per_channel=per_channel, target=target,
                layers=layers, min_count=min_count)

    def init(variables):
        ref = variables if reference is None else reference
        extra = {"inner": method.init(variables), "reference": jax.tree.map(jnp.array, ref)}
        return base.init_state(variables, tx, subset, extra)

    def update(variables, state, batches, key):
        rb = base.require(batches, "retain", label)
        inner = state.extra["inner"]._replace(epoch=state.epoch)  # the loop sets the outer epoch
        variables, inner, metrics = method.update(variables, inner, batches, key)
        ref = state.extra["reference"]

        def loss_fn(params, model_state):
            r, diag = penalty_loss(apply_fn, params, model_state, ref, rb, **opts)
            diag = {"fg_penalty": r, "fg_gap_change": diag["gap_change"]}
            return strength * r, (model_state, diag)

        variables, opt_state, _, diag = base.gradient_step(loss_fn, variables, state.opt_state, tx,
                                                           subset)
        extra = {**state.extra, "inner": inner}
        return variables, state._replace(step=state.step + 1, opt_state=opt_state, extra=extra), \
            {**metrics, **diag}

    return base.Method(init, update, uses=uses, name=label, apply_fn=apply_fn)
