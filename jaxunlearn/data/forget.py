"""Forget-set builders and what unlearning needs from them: forget/retain splits and weights.

Every builder returns a sorted int32 array of *row numbers* of the training split (0..n-1; the
split's ``index`` field maps them back to the original dataset when the split was subsampled).
A forget set must be non-empty, free of duplicates, inside ``[0, n)`` and smaller than the
training set (unlearning everything leaves nothing to retain); violations raise
:class:`ForgetSetError`.

Builders: :func:`forget_class` (one class), :func:`forget_random` (a random fraction),
:func:`forget_group` (a fraction r of one (target, sensitive) cell, De Min et al.),
:func:`forget_indices` (explicit rows), :func:`forget_top_k` / :func:`forget_top_fraction` (the
extreme scores, e.g. influence-based hard unlearning, seed 004).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxunlearn.data.dataset import DataError, split_len
from jaxunlearn.data.splits import host_rng, take

__all__ = [
    "ForgetSetError",
    "check_forget_rows",
    "forget_class",
    "forget_random",
    "forget_group",
    "forget_indices",
    "forget_top_k",
    "forget_top_fraction",
    "forget_mask",
    "forget_retain_splits",
    "group_cells",
]


class ForgetSetError(DataError):
    """An invalid forget set (empty, everything, out of range, duplicated, absent class/group)."""


def check_forget_rows(rows, n: int) -> np.ndarray:
    """Validate forget rows against a training set of ``n`` samples; return them sorted int32.

    Raises:
      ForgetSetError: not 1-D integers, empty, out of ``[0, n)``, duplicated, or all ``n`` rows.
    """
    rows = np.asarray(rows)
    if rows.ndim != 1:
        raise ForgetSetError(f"forget rows must be 1-D, got shape {rows.shape}")
    if rows.size == 0:
        raise ForgetSetError("the forget set is empty")
    if not np.issubdtype(rows.dtype, np.integer):
        raise ForgetSetError(f"forget rows must be integers, got dtype {rows.dtype}")
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= n:
        raise ForgetSetError(f"forget rows out of range: min {lo}, max {hi}, training set size {n}")
    uniq = np.unique(rows)
    if uniq.size != rows.size:
        dup = np.unique(rows[np.flatnonzero(np.bincount(rows, minlength=n)[rows] > 1)])
        raise ForgetSetError(f"forget rows contain duplicates, e.g. {dup[:5].tolist()}")
    if uniq.size == n:
        raise ForgetSetError(f"the forget set covers all {n} training samples; nothing would be "
                             "retained")
    return uniq.astype(np.int32)


def _check_fraction(fraction: float, what: str) -> float:
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ForgetSetError(f"{what} must be in (0, 1], got {fraction}")
    return fraction


def _sample(key, candidates: np.ndarray, count: int) -> np.ndarray:
    return candidates[host_rng(key).permutation(candidates.size)[:count]]


def forget_class(split: Mapping[str, np.ndarray], label: int) -> np.ndarray:
    """All training rows of class ``label`` (full-class unlearning).

    Raises:
      ForgetSetError: the class does not occur, or it is the only class present.
    """
    y = np.asarray(split["y"])
    rows = np.flatnonzero(y == label)
    if rows.size == 0:
        raise ForgetSetError(f"class {label} does not occur in the training split (classes "
                             f"present: {np.unique(y).tolist()})")
    return check_forget_rows(rows, y.size)


def forget_random(split: Mapping[str, np.ndarray], fraction: float, *,
                  key) -> np.ndarray:
    """``floor(fraction * n)`` training rows drawn uniformly without replacement.

    Args:
      split: the training split.
      fraction: in (0, 1); the forget set must be non-empty and not everything.
      key: jax PRNG key or int seed (draws use :func:`~jaxunlearn.data.splits.host_rng`).
    """
    fraction = _check_fraction(fraction, "fraction")
    n = split_len(split)
    count = int(np.floor(fraction * n))
    if count == 0:
        raise ForgetSetError(f"fraction {fraction} of {n} samples selects no sample")
    return check_forget_rows(_sample(key, np.arange(n), count), n)


def forget_group(split: Mapping[str, np.ndarray], *, target: int, group: int, fraction: float,
                 key) -> np.ndarray:
    """A random fraction r of the training cell ``y == target and group == group`` (De Min et al.).

    The forget set is ``floor(r * |cell|)`` rows drawn uniformly without replacement from the cell
    (as their reference's ``int(len(cell) * r)``), so it is dominated by one (target, sensitive)
    group instead of being uniform over the data. The paper uses r in {0.1, 0.5, 0.9}.

    Args:
      split: the training split.
      target: the class of the cell.
      group: the sensitive-attribute value of the cell.
      fraction: r in (0, 1].
      key: jax PRNG key or int seed (draws use :func:`~jaxunlearn.data.splits.host_rng`).

    Raises:
      ForgetSetError: r outside (0, 1], the cell is empty (class or group absent), r selects no
        sample, or the cell is the whole training set and r = 1.
    """
    fraction = _check_fraction(fraction, "fraction r")
    y, g = np.asarray(split["y"]), np.asarray(split["group"])
    if not np.any(y == target):
        raise ForgetSetError(f"class {target} does not occur in the training split")
    if not np.any(g == group):
        raise ForgetSetError(f"group {group} does not occur in the training split")
    cell = np.flatnonzero((y == target) & (g == group))
    if cell.size == 0:
        raise ForgetSetError(f"no training sample has class {target} and group {group}")
    count = int(np.floor(fraction * cell.size))
    if count == 0:
        raise ForgetSetError(f"fraction {fraction} of the {cell.size} samples of cell "
                             f"(class {target}, group {group}) selects no sample")
    return check_forget_rows(_sample(key, cell, count), y.size)


def forget_indices(split: Mapping[str, np.ndarray], rows) -> np.ndarray:
    """Explicit training rows, validated (see :func:`check_forget_rows`)."""
    return check_forget_rows(rows, split_len(split))


def forget_top_k(scores, k: int, *, largest: bool) -> np.ndarray:
    """The ``k`` rows with the largest (``largest=True``) or smallest scores.

    With jaxunlearn's influence convention (``score_i`` = predicted change of a measurement if
    sample i were removed; DESIGN.md), the samples whose removal most *reduces* unfairness or
    adversarial loss are the most negative ones: ``largest=False``. Ties are broken by row number
    (stable sort).

    Args:
      scores: [n] finite scores, one per training row.
      k: number of rows, 1 <= k < n.
      largest: pick the largest scores instead of the smallest.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ForgetSetError(f"scores must be 1-D [n], got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ForgetSetError("scores contain NaN or inf")
    n = scores.size
    if not isinstance(k, (int, np.integer)) or not 1 <= k < n:
        raise ForgetSetError(f"k must satisfy 1 <= k < n = {n}, got {k}")
    order = np.argsort(-scores if largest else scores, kind="stable")
    return check_forget_rows(order[:k], n)


def forget_top_fraction(scores, fraction: float, *, largest: bool) -> np.ndarray:
    """The top ``floor(fraction * n)`` rows by score (see :func:`forget_top_k`)."""
    fraction = _check_fraction(fraction, "fraction")
    n = np.shape(scores)[0] if np.ndim(scores) else 0
    k = int(np.floor(fraction * n))
    if k == 0:
        raise ForgetSetError(f"fraction {fraction} of {n} samples selects no sample")
    return forget_top_k(scores, k, largest=largest)


def forget_mask(n: int, rows) -> np.ndarray:
    """[n] bool, True on forget rows."""
    rows = check_forget_rows(rows, n)
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


def forget_retain_splits(split: Mapping[str, np.ndarray], rows) -> tuple[dict, dict]:
    """``(forget, retain)`` sub-splits of the training split (``index`` keeps original ids)."""
    mask = forget_mask(split_len(split), rows)
    return take(split, np.flatnonzero(mask)), take(split, np.flatnonzero(~mask))


def group_cells(split: Mapping[str, np.ndarray], num_groups: int) -> np.ndarray:
    """Cell id ``group + y * num_groups`` per row (De Min et al.'s g = s + y * |S|), int32 [n]."""
    y, g = np.asarray(split["y"]), np.asarray(split["group"])
    if g.size and (g.min() < 0 or g.max() >= num_groups):
        raise DataError(f"group values must lie in [0, {num_groups})")
    return (g + y * num_groups).astype(np.int32)
