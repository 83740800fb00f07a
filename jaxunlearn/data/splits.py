"""Seeded splits of a split dict and a standardiser fitted on train only.

Randomness is explicit: every random function takes ``key``, a ``jax.random`` key or an integer
seed (or a tuple of non-negative ints, e.g. ``(seed, purpose)``). Data preparation runs once on
the host, so draws come from numpy's PCG64 seeded by the key's raw data (:func:`host_rng`):
``jax.random.permutation`` would compile an XLA program for every new length (about a second
each), which dominated loading times.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import numpy as np

from jaxunlearn.data.dataset import DataError, split_len

__all__ = [
    "host_rng",
    "take",
    "split_rows",
    "random_split",
    "subsample_rows",
    "Standardizer",
    "fit_standardizer",
    "standardize",
    "standardize_splits",
]


def take(split: Mapping[str, np.ndarray], rows) -> dict:
    """Rows ``rows`` of every array in a split (``index`` keeps the original positions); a
    streamed ``x`` (:class:`~jaxunlearn.data.streaming.SourceArray`) stays streamed."""
    rows = np.asarray(rows)
    if rows.size == 0:
        rows = rows.astype(np.int64)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise DataError(f"rows must be a 1-D integer array, got shape {rows.shape} {rows.dtype}")
    n = split_len(split)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise DataError(f"rows out of range [0, {n})")
    from jaxunlearn.data.streaming import SourceArray  # lazy: streaming imports this module

    return {k: v.take(rows) if isinstance(v, SourceArray) else np.asarray(v)[rows]
            for k, v in split.items()}


def host_rng(key) -> np.random.Generator:
    """A numpy Generator determined by ``key`` (jax PRNG key, int seed or tuple of ints)."""
    if isinstance(key, jax.Array):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        entropy = np.asarray(key).astype(np.uint32).ravel().tolist()
    elif isinstance(key, (int, np.integer)):
        entropy = int(key)
    elif isinstance(key, tuple) and all(isinstance(k, (int, np.integer)) for k in key):
        entropy = [int(k) for k in key]
    else:
        raise DataError(f"key must be a jax PRNG key, an int seed or a tuple of ints, got "
                        f"{type(key).__name__}")
    try:
        return np.random.default_rng(entropy)
    except ValueError as e:  # e.g. negative seeds
        raise DataError(f"invalid seed {key!r}: {e}") from None


def _permutation(key, n: int) -> np.ndarray:
    return host_rng(key).permutation(n).astype(np.int64)


def split_rows(n: int, fractions: Sequence[float], *, key) -> tuple[np.ndarray, ...]:
    """Cut ``range(n)`` into disjoint random parts of the given fractions.

    Part ``j < last`` gets ``floor(fractions[j] * n)`` rows, the last part the remainder, so the
    parts cover every row. Each part is returned sorted (file order is kept inside a part).

    Args:
      n: number of rows.
      fractions: positive fractions summing to 1 (e.g. ``(0.6, 0.2, 0.2)``).
      key: jax PRNG key or int seed (:func:`host_rng`).

    Returns:
      One int64 row array per fraction.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) < 2 or any(not f > 0 for f in fractions):
        raise DataError(f"fractions must be at least two positive numbers, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    counts = [int(np.floor(f * n)) for f in fractions[:-1]]
    counts.append(n - sum(counts))
    if min(counts) < 1:
        raise DataError(f"cannot split {n} rows into parts {fractions}: a part would be empty "
                        f"(sizes {counts})")
    perm = _permutation(key, n)
    bounds = np.cumsum([0] + counts)
    return tuple(np.sort(perm[bounds[j]:bounds[j + 1]]) for j in range(len(counts)))


def random_split(split: Mapping[str, np.ndarray], fractions: Sequence[float], *,
                 key) -> tuple[dict, ...]:
    """Split a split dict into random disjoint parts (see :func:`split_rows`)."""
    return tuple(take(split, r) for r in split_rows(split_len(split), fractions, key=key))


def subsample_rows(n: int, max_examples: int | None, *, key) -> np.ndarray:
    """Sorted random subset of ``min(n, max_examples)`` rows (all rows when None)."""
    if max_examples is None or max_examples >= n:
        return np.arange(n, dtype=np.int64)
    if max_examples < 1:
        raise DataError(f"max_examples must be positive, got {max_examples}")
    return np.sort(_permutation(key, n)[:max_examples])


class Standardizer(NamedTuple):
    """Per-feature affine map ``(x - mean) / scale`` (shapes: the per-example feature shape)."""

    mean: np.ndarray
    scale: np.ndarray


def fit_standardizer(x: np.ndarray, *, eps: float = 1e-12) -> Standardizer:
    """Fit mean and (population) standard deviation per feature on ``x`` [n, ...].

    Constant features (std <= eps) get scale 1, so they map to 0 (as scikit-learn's
    StandardScaler does). Statistics are accumulated in float64.
    """
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"fit_standardizer needs x of shape [n >= 1, d, ...], got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError("fit_standardizer: x contains NaN or inf")
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    scale = np.where(std > eps, std, 1.0)
    return Standardizer(mean=mean, scale=scale)


def standardize(x: np.ndarray, standardizer: Standardizer) -> np.ndarray:
    """Apply a fitted :class:`Standardizer`; returns float32."""
    x = np.asarray(x)
    if x.shape[1:] != standardizer.mean.shape:
        raise DataError(f"x has feature shape {x.shape[1:]}, the standardizer was fitted on "
                        f"{standardizer.mean.shape}")
    return ((x - standardizer.mean) / standardizer.scale).astype(np.float32)


def standardize_splits(train: Mapping, *others: Mapping) -> tuple[Standardizer, dict, ...]:
    """Fit a standardiser on ``train["x"]`` only and apply it to ``train`` and every other split.

    Returns:
      ``(standardizer, train', *others')`` with new dicts (input arrays are not modified).
    """
    std = fit_standardizer(train["x"])
    out = [{**s, "x": standardize(s["x"], std)} for s in (train, *others)]
    return (std, *out)
