"""Group fairness of hard predictions: DP, EOP (seed 004's reported metrics) and De Min's EO.

With sensitive attribute s (the group id) and hard predictions y_hat:

* Demographic parity: ``DP = P(y_hat=1 | s=1) - P(y_hat=1 | s=0)``.
* Equal opportunity: ``EOP = P(y_hat=1 | s=1, y=1) - P(y_hat=1 | s=0, y=1)`` (true-positive rates).
* Equalized odds (De Min et al., reference ``compute_equalized_odds``): ``EO = mean over target
  values t of |acc(s=0, t) - acc(s=1, t)|``, ``acc(s, t)`` the accuracy on the cell (s, y=t). For a
  binary task this is ``(|dTPR| + |dFPR|) / 2``, the average odds difference.

Group ids are arbitrary integers, ordered ascending: with two groups the signed DP / EOP is
``rate(larger id) - rate(smaller id)`` (s=1 minus s=0 for a 0/1 attribute). With more than two
groups DP and EOP are the largest gap ``max_g rate(g) - min_g rate(g)`` (>= 0; for two groups it is
|DP|), and EO averages ``|acc(g, t) - acc(g', t)|`` over all pairs g < g' (as the reference does)
and over t. Pass the sensitive attribute as the group, not De Min's cell id ``s + y |S|``.

All values are fractions in [0, 1] (or [-1, 1] signed); the reference reports EO in percent.
A group (or cell) with no samples raises a ValueError naming it.

``weight`` is a *sample weight*, as fairlearn's ``sample_weight``: every rate is a weighted rate,
e.g. ``P(y_hat=1 | s) = sum_{i in s} w_i [y_hat_i = 1] / sum_{i in s} w_i``; weight 0 drops a row
(padding), so 0/1 weights act as a mask. Weights must be finite and >= 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxunlearn.metrics.classification import _host_counts, _require_groups

__all__ = [
    "demographic_parity",
    "equal_opportunity",
    "equalized_odds",
    "demographic_parity_from_counts",
    "equal_opportunity_from_counts",
    "equalized_odds_from_counts",
]


def _check_binary_logits(pred, what: str) -> None:
    if np.ndim(pred) == 2 and np.shape(pred)[1] > 2:
        raise ValueError(f"{what} needs a binary model, got logits with {np.shape(pred)[1]} classes")


def _binary(c: np.ndarray, what: str) -> None:
    if c.shape[1] != 2:
        raise ValueError(f"{what} needs binary labels and predictions in {{0, 1}}, got {c.shape[1]} classes")


def _gap(rates: np.ndarray, absolute: bool) -> float:
    if rates.size < 2:
        raise ValueError(f"a fairness gap needs at least 2 groups, found {rates.size}")
    if rates.size == 2:
        d = float(rates[1] - rates[0])
        return abs(d) if absolute else d
    return float(rates.max() - rates.min())


def demographic_parity_from_counts(counts, *, absolute: bool = False, ids=None) -> float:
    """DP from confusion counts [G, 2, 2] (group index order; see the module docstring)."""
    c = np.asarray(counts, np.float64)
    _binary(c, "demographic parity")
    n = c.sum((1, 2))
    names = ids if ids is not None else range(c.shape[0])
    for g, m in zip(names, n):
        if m == 0:
            raise ValueError(f"demographic parity: group {g} has no samples")
    return _gap(c[:, :, 1].sum(1) / n, absolute)


def equal_opportunity_from_counts(counts, *, absolute: bool = False, ids=None) -> float:
    """EOP (difference of true-positive rates) from confusion counts [G, 2, 2]."""
    c = np.asarray(counts, np.float64)
    _binary(c, "equal opportunity")
    pos = c[:, 1, :].sum(1)
    names = ids if ids is not None else range(c.shape[0])
    for g, m in zip(names, pos):
        if m == 0:
            raise ValueError(f"equal opportunity: group {g} has no positive labels (y = 1), so its "
                             "true-positive rate is undefined")
    return _gap(c[:, 1, 1] / pos, absolute)


def equalized_odds_from_counts(counts, *, target_partition: Sequence[Sequence[int]] | None = None,
                               ids=None) -> float:
    """De Min's EO from confusion counts [G, K, K].

    Args:
      counts: [G, K, K] confusion counts.
      target_partition: optional pooling of the true labels into target values, e.g.
        ``[[0, 1, 2], [3]]`` for the reference's binarised target on a multi-class task (the cell
        accuracy stays the accuracy of the K-way prediction). Default: each class is a value.
      ids: optional group ids for error messages.
    """
    c = np.asarray(counts, np.float64)
    g_count, k = c.shape[0], c.shape[1]
    if g_count < 2:
        raise ValueError(f"equalized odds needs at least 2 groups, found {g_count}")
    parts = [[t] for t in range(k)] if target_partition is None else [list(p) for p in target_partition]
    flat = [t for p in parts for t in p]
    if sorted(flat) != sorted(set(flat)) or any(t < 0 or t >= k for t in flat) or not all(parts):
        raise ValueError(f"target_partition must be disjoint non-empty sets of labels in [0, {k}), got {parts}")
    correct = np.stack([sum(c[:, t, t] for t in p) for p in parts], 1)           # [G, T]
    total = np.stack([c[:, p, :].sum((1, 2)) for p in parts], 1)                  # [G, T]
    names = list(ids) if ids is not None else list(range(g_count))
    for gi, ti in zip(*np.nonzero(total == 0)):
        raise ValueError(f"equalized odds: the cell (group {names[gi]}, target {parts[ti]}) has no "
                         "samples, so its accuracy is undefined")
    acc = correct / total
    i, j = np.triu_indices(g_count, 1)
    return float(np.abs(acc[i] - acc[j]).mean())


def demographic_parity(pred, group, *, weight=None, absolute: bool = False) -> float:
    """DP of hard predictions (labels [n] or logits [n, K]) over sensitive groups [n].

    ``weight``: optional [n] sample weights (module docstring; 0 = padding).
    """
    _require_groups(group, "demographic parity")
    p = np.asarray(pred)
    _check_binary_logits(p, "demographic parity")
    counts, ids = _host_counts(p, np.zeros(p.shape[0], np.int64), group, weight, sample_weight=True)
    return demographic_parity_from_counts(counts, absolute=absolute, ids=ids)


def equal_opportunity(pred, y, group, *, weight=None, absolute: bool = False) -> float:
    """EOP of hard predictions given y = 1 over sensitive groups [n]."""
    _require_groups(group, "equal opportunity")
    _check_binary_logits(pred, "equal opportunity")
    counts, ids = _host_counts(pred, y, group, weight, sample_weight=True)
    return equal_opportunity_from_counts(counts, absolute=absolute, ids=ids)


def equalized_odds(pred, y, group, *, weight=None,
                   target_partition: Sequence[Sequence[int]] | None = None) -> float:
    """De Min's EO: mean over target values of the accuracy gap between sensitive groups."""
    _require_groups(group, "equalized odds")
    counts, ids = _host_counts(pred, y, group, weight, sample_weight=True)
    if target_partition is None:
        # Only the labels that occur define target values (counts may be padded to 2 classes).
        present = np.flatnonzero(counts.sum((0, 2)) > 0)
        target_partition = [[int(t)] for t in present]
    return equalized_odds_from_counts(counts, target_partition=target_partition, ids=ids)
