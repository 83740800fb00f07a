"""Tran & Woo's fairness-gap per normalisation layer (seeds 000/001, Definition 1), streamed.

For normalisation layer l and class c, ``sigma_c^l`` is the variance of the layer's output features
over the samples of class c, and the fairness-gap is ``eps^l = max_c sigma_c^l - min_c sigma_c^l``.
The paper does not spell out "variance of the features"; here it is

    sigma_c^l = (1/D) sum_d Var_{i in c}(h_{i,d}),

the mean over the D output features of each feature's (population, ddof = 0) variance across the
samples of class c, i.e. ``trace(Cov_c(h)) / D``. What a "feature" is, is the one choice:

* ``per_channel=True``: a feature is a channel (the last axis) and the spatial positions or tokens
  of every sample are pooled as observations: the statistics a normalisation layer itself
  normalises with (BatchNorm pools batch and positions per channel), O(C) memory per class. This
  is our reading of Definition 1 ("the variance of the features at a normalisation layer") and the
  statistic the Tran & Woo study (``experiments/fairness_gap.py``) reports in every preset.
* ``per_channel=False`` (the default, kept for compatibility): the per-unit variant, a feature is
  one output unit: a [H, W, C] BatchNorm output has D = H*W*C features and a [T, C] LayerNorm
  output D = T*C. By the law of total variance the per-channel variance equals this one plus
  the spread over positions of each channel's class mean. Both agree on [B, C] outputs.

Statistics. Per layer and class: ``count`` [K], ``mean`` [K, D] and ``m2`` [K, D] (sum of squared
deviations from the mean). Each batch is reduced exactly (two passes over the batch) and merged
with Chan et al.'s parallel update, which stays accurate in float32: the textbook
``sum(x^2) - n mean^2`` cancels catastrophically when |mean| >> std (BatchNorm outputs carry the
learnt shift beta) and float64 is unavailable under the default ``jax_enable_x64=False``. Inside a
jitted update over a sharded batch the reductions are global, so the statistics are the same on
any number of devices; independently accumulated statistics (e.g. per host) combine with
:func:`fairness_gap_merge`, which is associative. Memory is 2*K*D floats per layer, never the
activations of the dataset.

Weights follow DESIGN.md: samples with ``weight == 0`` (padding) are ignored, others count once.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import evaluation

__all__ = [
    "fairness_gap_init",
    "fairness_gap_update",
    "fairness_gap_merge",
    "fairness_gap_finalize",
    "class_variances",
    "fairness_gap_metric",
    "fairness_gap_stats",
    "fairness_gap",
]


def _num_features(shape, per_channel: bool) -> int:
    if len(shape) < 2:
        raise ValueError(f"a normalisation output must be [B, ...features], got shape {tuple(shape)}")
    return int(shape[-1]) if per_channel else int(math.prod(shape[1:]))


def fairness_gap_init(norm_outputs: dict, *, num_classes: int, per_channel: bool = False) -> dict:
    """Empty statistics for the layers of ``norm_outputs``.

    Args:
      norm_outputs: ``{layer name: [B, ...]}`` arrays or ``jax.ShapeDtypeStruct`` (only shapes are
        read), e.g. ``aux["norm"]`` of ``apply(..., capture_norm=True)`` or its ``jax.eval_shape``.
      num_classes: K.
      per_channel: see the module docstring.

    Returns:
      ``{layer: {"count": [K], "mean": [K, D], "m2": [K, D]}}`` (float32 zeros).
    """
    if not norm_outputs:
        raise ValueError("no normalisation outputs: the model exposes no normalisation layers "
                         "(aux['norm'] is empty), so the fairness-gap is undefined")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    stats = {}
    for name, h in norm_outputs.items():
        d = _num_features(h.shape, per_channel)
        stats[name] = {"count": jnp.zeros((num_classes,), jnp.float32),
                       "mean": jnp.zeros((num_classes, d), jnp.float32),
                       "m2": jnp.zeros((num_classes, d), jnp.float32)}
    return stats


def _merge(a: dict, b: dict) -> dict:
    na, nb = a["count"], b["count"]
    n = na + nb
    safe = jnp.where(n > 0, n, 1.0)
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * (nb / safe)[:, None]
    m2 = a["m2"] + b["m2"] + jnp.square(delta) * (na * nb / safe)[:, None]
    return {"count": n, "mean": mean, "m2": m2}


def fairness_gap_merge(a: dict, b: dict) -> dict:
    """Combine two statistics accumulated on disjoint data (Chan et al.'s parallel variance)."""
    if set(a) != set(b):
        raise ValueError(f"statistics cover different layers: {sorted(set(a) ^ set(b))}")
    return {k: _merge(a[k], b[k]) for k in a}


def fairness_gap_update(stats: dict, norm_outputs: dict, y, weight=None, *,
                        per_channel: bool = False) -> dict:
    """Add one batch to the statistics (pure, jit-able).

    Args:
      stats: from :func:`fairness_gap_init` or a previous update.
      norm_outputs: ``{layer: [B, ...]}`` normalisation outputs of the batch (``aux["norm"]``).
      y: [B] integer class labels in [0, K).
      weight: [B] per-sample weights; 0 marks padding (ignored).
      per_channel: must match :func:`fairness_gap_init`.

    Returns:
      The updated statistics.
    """
    y = jnp.asarray(y)
    out = {}
    for name, s in stats.items():
        if name not in norm_outputs:
            raise ValueError(f"normalisation output {name!r} missing from this batch "
                             f"(got {sorted(norm_outputs)})")
        h = jnp.asarray(norm_outputs[name])
        k, d = s["mean"].shape
        if _num_features(h.shape, per_channel) != d or h.shape[0] != y.shape[0]:
            raise ValueError(f"layer {name!r}: output {tuple(h.shape)} does not match {d} features "
                             f"(per_channel={per_channel}) and {y.shape[0]} labels")
        b = h.shape[0]
        h = h.reshape(b, -1, h.shape[-1]) if per_channel else h.reshape(b, 1, -1)
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        mask = jnp.ones((b,), h.dtype) if weight is None else (jnp.asarray(weight) != 0).astype(h.dtype)
        onehot = jax.nn.one_hot(y, k, dtype=h.dtype) * mask[:, None]           # [B, K]
        count = jnp.sum(onehot, 0) * h.shape[1]                                  # [K]
        safe = jnp.where(count > 0, count, 1.0)[:, None]
        mean = jnp.einsum("bk,bpd->kd", onehot, h) / safe                       # [K, D]
        dev = h - mean[jnp.clip(y, 0, k - 1)][:, None, :]
        m2 = jnp.einsum("bk,bpd->kd", onehot, jnp.square(dev))
        batch = {"count": count.astype(jnp.float32), "mean": mean.astype(jnp.float32),
                 "m2": m2.astype(jnp.float32)}
        out[name] = _merge(s, batch)
    return out


def _class_list(num_classes: int, classes: Sequence[int] | None) -> list[int]:
    cls = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if len(cls) < 2 or len(set(cls)) != len(cls) or min(cls) < 0 or max(cls) >= num_classes:
        raise ValueError(f"classes must be >= 2 distinct ids in [0, {num_classes}), got {cls}")
    return cls


def class_variances(stats: dict, *, classes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``{layer: sigma_c [len(classes)]}``: the per-class feature variance of each layer.

    Args:
      stats: accumulated statistics.
      classes: the classes to report (default all K). A class without samples raises; after
        class-wise forgetting, pass the retained classes when measuring on retain data.
    """
    out = {}
    for name, s in stats.items():
        count = np.asarray(s["count"], np.float64)
        cls = _class_list(count.shape[0], classes)
        empty = [c for c in cls if count[c] == 0]
        if empty:
            raise ValueError(f"layer {name!r}: class(es) {empty} have no samples, so their variance is "
                             "undefined (pass classes= to measure only the classes present)")
        var = np.asarray(s["m2"], np.float64)[cls] / count[cls][:, None]
        out[name] = var.mean(axis=1)
    return out


def fairness_gap_finalize(stats: dict, *, classes: Sequence[int] | None = None) -> dict[str, float]:
    """``{layer: max_c sigma_c - min_c sigma_c}`` (Definition 1), as Python floats."""
    return {name: float(v.max() - v.min()) for name, v in class_variances(stats, classes=classes).items()}


def fairness_gap_metric(*, num_classes: int, per_channel: bool = False):
    """The fairness-gap statistics as a :class:`jaxunlearn.evaluation.Metric` (finalized to the
    raw statistics; apply :func:`fairness_gap_finalize` or :func:`class_variances` to them)."""
    def init(outputs):
        if not outputs.get("norm"):
            raise ValueError("the model exposes no normalisation outputs (aux['norm'] is empty or "
                             "missing with capture_norm=True), so the fairness-gap is undefined")
        return fairness_gap_init(outputs["norm"], num_classes=num_classes, per_channel=per_channel)

    def update(stats, outputs, batch):
        return fairness_gap_update(stats, outputs["norm"], batch["y"], batch["weight"],
                                   per_channel=per_channel)

    return evaluation.Metric(init, update, lambda stats: stats, merge=fairness_gap_merge, needs_norm=True)


def fairness_gap_stats(apply_fn, variables, split: dict, *, num_classes: int, batch_size: int = 256,
                       per_channel: bool = False, mesh=None) -> dict:
    """Accumulate fairness-gap statistics of a model over a split (eval mode, padded batches).

    Args:
      apply_fn: the model's ``apply``; it must honour ``capture_norm=True`` (DESIGN.md contract).
      variables: the model's variables.
      split: ``{"x", "y"}`` arrays (the retain set in the paper's protocol); every sample counts once.
      num_classes: K.
      batch_size: evaluation batch size (memory is one batch of activations plus the statistics).
      per_channel: see the module docstring.
      mesh: optional device mesh (batches split over its data axis).
    """
    split = {k: v for k, v in split.items() if k in ("x", "y")}
    evaluation.check_labels(split["y"], num_classes)
    ev = evaluation.evaluator(apply_fn, {"gap": fairness_gap_metric(num_classes=num_classes,
                                                                     per_channel=per_channel)},
                              batch_size=batch_size, mesh=mesh)
    try:
        return ev.stats(variables, split)["gap"]
    except TypeError as e:
        raise ValueError(f"the model's apply does not support capture_norm=True ({e}); the "
                         "fairness-gap needs normalisation-layer outputs in aux['norm']") from e


def fairness_gap(apply_fn, variables, split: dict, *, num_classes: int, batch_size: int = 256,
                 per_channel: bool = False, classes: Sequence[int] | None = None) -> dict[str, float]:
    """Fairness-gap of every normalisation layer of a model on a split: ``{layer: gap}``.

    Layer names are those of ``aux["norm"]``; the dict is ordered by name (JAX sorts dict keys),
    not by depth. See :func:`fairness_gap_stats` and :func:`class_variances` for the arguments.
    """
    stats = fairness_gap_stats(apply_fn, variables, split, num_classes=num_classes,
                               batch_size=batch_size, per_channel=per_channel)
    return fairness_gap_finalize(stats, classes=classes)
