"""Accuracy, per-group and worst-group accuracy, from one sufficient statistic.

Every classification and fairness metric in :mod:`jaxunlearn.metrics` is a function of the
confusion tensor ``counts[g, y, p]`` = number of (non-padding) samples of group g with true label
y and predicted label p. :func:`confusion_counts` computes it for one batch (pure, jit-able); it
sums across batches and shards, so streamed or sharded evaluation is ``sum`` then a
``*_from_counts`` function. The array functions (``accuracy``, ``group_accuracy``, ...) are the
same computation on whole arrays held on the host, with arbitrary integer group ids.

Weights follow DESIGN.md: a sample with ``weight == 0`` (padding or excluded) is ignored, any other
weight counts the sample once.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import losses
from jaxunlearn import evaluation
from jaxunlearn.data.batching import split_size

__all__ = [
    "predicted_labels",
    "confusion_counts",
    "count_predictions",
    "accuracy",
    "group_accuracy",
    "worst_group_accuracy",
    "accuracy_from_counts",
    "group_accuracy_from_counts",
    "worst_group_accuracy_from_counts",
]


def predicted_labels(pred) -> jax.Array:
    """Integer labels [n] from labels [n] or logits [n, K] (a single binary logit [n, 1] included)."""
    pred = jnp.asarray(pred)
    if pred.ndim == 2:
        return jnp.argmax(losses.class_logits(pred), axis=-1)
    if pred.ndim != 1:
        raise ValueError(f"predictions must be labels [n] or logits [n, K], got shape {pred.shape}")
    if not jnp.issubdtype(pred.dtype, jnp.integer) and not jnp.issubdtype(pred.dtype, jnp.bool_):
        raise ValueError(f"1-D predictions must be integer labels, got dtype {pred.dtype}; pass logits as [n, K]")
    return pred.astype(jnp.int32)


def confusion_counts(pred, y, *, group=None, weight=None, num_classes: int,
                     num_groups: int = 1) -> jax.Array:
    """Confusion counts of one batch: ``counts[g, y, p]`` [G, K, K] (float32, pure, jit-able).

    Args:
      pred: [B] predicted labels or [B, K] logits.
      y: [B] true labels in [0, K).
      group: [B] group ids in [0, G); None puts every sample in group 0. Ids outside the range
        are dropped silently here (this function cannot raise on traced values); the host
        functions and :func:`count_predictions` check them.
      weight: [B] per-sample weights; samples with weight 0 are ignored.
      num_classes: K (2 for a single binary logit).
      num_groups: G.

    Returns:
      [G, K, K] counts; add them over batches and shards.
    """
    p = predicted_labels(pred)
    y = jnp.asarray(y)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in length")
    mask = jnp.ones(p.shape, jnp.float32) if weight is None else (jnp.asarray(weight) != 0).astype(jnp.float32)
    g = jnp.zeros_like(p) if group is None else jnp.asarray(group)
    if g.shape != p.shape:
        raise ValueError(f"group {g.shape} and predictions {p.shape} differ in length")
    oh_g = jax.nn.one_hot(g, num_groups, dtype=jnp.float32) * mask[:, None]   # [B, G]
    oh_y = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)                 # [B, K]
    oh_p = jax.nn.one_hot(p, num_classes, dtype=jnp.float32)                 # [B, K]
    return jnp.einsum("bg,by,bp->gyp", oh_g, oh_y, oh_p)


def _host_counts(pred, y, group, weight, *, sample_weight: bool = False):
    """Counts on the host with arbitrary group ids; returns (counts [G, K, K], ids [G]).

    ``weight`` 0 drops a row; with ``sample_weight=True`` every kept row counts ``weight``
    (fairlearn's ``sample_weight``; weights must be finite and >= 0), else 1.
    """
    p = np.asarray(predicted_labels(pred))
    y = np.asarray(y)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must be [n] vectors of equal length")
    if not np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    keep = np.ones(p.shape, bool) if weight is None else (np.asarray(weight) != 0)
    if keep.shape != p.shape:
        raise ValueError(f"weight {keep.shape} and predictions {p.shape} differ in length")
    if group is None:
        gid = np.zeros(p.shape, np.int64)
    else:
        gid = np.asarray(group)
        if gid.shape != p.shape:
            raise ValueError(f"group {gid.shape} and predictions {p.shape} differ in length")
        if not np.issubdtype(gid.dtype, np.integer) and not np.issubdtype(gid.dtype, np.bool_):
            raise ValueError(f"group ids must be integers, got dtype {gid.dtype}")
    wk = np.ones(int(keep.sum()))
    if sample_weight and weight is not None:
        wk = np.asarray(weight, np.float64)[keep]
        if not np.all(np.isfinite(wk)) or np.any(wk < 0):
            raise ValueError("weight must be finite and >= 0 (sample weights); got "
                             f"min {np.nanmin(wk):g}" + (" and non-finite entries" if not np.all(np.isfinite(wk)) else ""))
    p, y, gid = p[keep], y[keep], gid[keep]
    if p.size == 0:
        raise ValueError("no samples (every weight is 0 or the arrays are empty)")
    if y.min() < 0 or p.min() < 0:
        raise ValueError("labels and predictions must be >= 0")
    ids, g = np.unique(gid, return_inverse=True)
    k = int(max(y.max(), p.max())) + 1
    counts = np.zeros((ids.size, max(k, 2), max(k, 2)), np.float64)
    np.add.at(counts, (g, y, p), wk)
    return counts, ids


def _require_groups(group, what: str):
    if group is None:
        raise ValueError(f"{what} needs group labels, but none were given (group is None)")


def accuracy_from_counts(counts) -> float:
    """Overall accuracy from confusion counts [G, K, K]."""
    c = np.asarray(counts, np.float64)
    total = c.sum()
    if total == 0:
        raise ValueError("accuracy of an empty set: the counts are all zero")
    return float(np.trace(c.sum(0)) / total)


def group_accuracy_from_counts(counts) -> np.ndarray:
    """Accuracy of each group [G] from confusion counts; an empty group raises."""
    c = np.asarray(counts, np.float64)
    n = c.sum((1, 2))
    empty = np.flatnonzero(n == 0)
    if empty.size:
        raise ValueError(f"group(s) {empty.tolist()} have no samples: their accuracy is undefined")
    return np.trace(c, axis1=1, axis2=2) / n


def worst_group_accuracy_from_counts(counts) -> float:
    """Minimum over groups of the group accuracy."""
    return float(group_accuracy_from_counts(counts).min())


def accuracy(pred, y, *, weight=None) -> float:
    """Fraction of correct predictions. ``pred``: labels [n] or logits [n, K]."""
    counts, _ = _host_counts(pred, y, None, weight)
    return accuracy_from_counts(counts)


def group_accuracy(pred, y, group, *, weight=None) -> dict[int, float]:
    """Accuracy of each group present: ``{group id: accuracy}`` (ids are arbitrary integers)."""
    _require_groups(group, "group accuracy")
    counts, ids = _host_counts(pred, y, group, weight)
    return {int(i): float(a) for i, a in zip(ids, group_accuracy_from_counts(counts))}


def worst_group_accuracy(pred, y, group, *, weight=None) -> float:
    """Lowest accuracy over the groups present."""
    return min(group_accuracy(pred, y, group, weight=weight).values())


def count_predictions(apply_fn, variables, split: dict, *, num_classes: int,
                      num_groups: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """Confusion counts [G, K, K] of a model over a split, streamed in padded batches (eval mode).

    Args:
      apply_fn: the model's ``apply`` (DESIGN.md contract).
      variables: its variables.
      split: ``{"x", "y", "group" (optional)}`` arrays.
      num_classes: K (2 for a single binary logit).
      num_groups: G; group ids must lie in [0, G). None: one group (no group labels needed).
      batch_size: evaluation batch size.

    Returns:
      float64 numpy counts, ready for the ``*_from_counts`` functions.
    """
    n = split_size(split)
    y = np.asarray(split["y"])
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y has labels in [{y.min()}, {y.max()}], outside [0, {num_classes})")
    if num_groups is None:
        num_groups, g = 1, np.zeros(n, np.int32)
    else:
        if "group" not in split:
            raise ValueError("group labels missing: the split has no 'group' array but num_groups was given")
        g = np.asarray(split["group"])
        if g.size and (g.min() < 0 or g.max() >= num_groups):
            raise ValueError(f"group ids in [{g.min()}, {g.max()}], outside [0, {num_groups})")
    ev = evaluation.evaluator(apply_fn, {"c": evaluation.confusion(num_classes=num_classes,
                                                                   num_groups=num_groups)},
                              batch_size=batch_size)
    unweighted = {k: v for k, v in split.items() if k != "weight"}  # every sample counts once
    return ev(variables, {**unweighted, "group": g})["c"]
