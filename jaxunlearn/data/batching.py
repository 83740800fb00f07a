"""Weighted, padded batching: static shapes so nothing recompiles.

A batch is ``{"x": [B, ...], "y": [B], "weight": [B], "group": [B], "index": [B]}`` (DESIGN.md).
Samples whose weight is exactly 0 are never scheduled, so training with weight 0 is the same as
training without the sample; the last batch is padded with weight-0 copies of real samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.data.splits import host_rng

__all__ = ["batch_plan", "resample_plan", "gather_batch", "num_batches", "iterate_batches", "split_size",
           "device_data"]

DATA_KEYS = ("x", "y", "group", "index")


def split_size(split: dict) -> int:
    """Number of samples in a split dict (length of ``y``, else of ``x``)."""
    return int(np.shape(split["y"] if "y" in split else split["x"])[0])


def num_batches(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def batch_plan(n: int, batch_size: int, *, key: jax.Array | None = None,
               weight: np.ndarray | None = None,
               name: str = "the set") -> tuple[np.ndarray, np.ndarray]:
    """Index and weight matrices [num_batches, batch_size] for one pass over ``n`` samples.

    Args:
      n: dataset size.
      batch_size: B.
      key: shuffle with this key (None: keep order); the permutation is drawn on the host
        (:func:`jaxunlearn.data.splits.host_rng`).
      weight: optional [n] per-sample weights (default 1). Samples with weight 0 are dropped.
      name: what the samples are, for error messages (e.g. ``"the forget set"``).

    Returns:
      ``(index, weight)``; padding slots repeat index 0 of the plan with weight 0.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    w = np.ones(n, np.float32) if weight is None else np.asarray(weight, np.float32)
    if w.shape != (n,):
        raise ValueError(f"the weight of {name} has shape {w.shape}, expected ({n},)")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"the weight of {name} contains NaN or inf")
    active = np.flatnonzero(w != 0)
    if active.size == 0:
        raise ValueError(f"every sample of {name} has weight 0: {name} is empty, nothing to batch")
    if key is not None:
        active = active[host_rng(key).permutation(active.size)]  # host draw: no compile per size
    nb = num_batches(active.size, batch_size)
    pad = nb * batch_size - active.size
    index = np.concatenate([active, np.full(pad, active[0], active.dtype)]).reshape(nb, batch_size)
    bw = np.concatenate([w[active], np.zeros(pad, np.float32)]).reshape(nb, batch_size)
    return index.astype(np.int32), bw


def resample_plan(key: jax.Array, sampling_weight, batch_size: int, *, num_draws: int | None = None,
                  loss_weight=None) -> tuple[np.ndarray, np.ndarray]:
    """A weighted sampler with replacement as a padded batch plan [S, B].

    Args:
      key: PRNG key of the draws.
      sampling_weight: [n] non-negative sampling weights (need not sum to 1).
      batch_size: B.
      num_draws: number of draws (default: the number of samples that can be drawn, i.e. |D_r|
        draws per epoch as PyTorch's ``WeightedRandomSampler(w, len(dataset))``).
      loss_weight: optional [n] loss weight of each sample (default 1); samples of loss weight 0
        are never drawn, and a drawn sample carries its loss weight.

    Returns:
      ``(index, weight)`` [S, B]; padding slots repeat the first draw with weight 0.
    """
    p = np.asarray(sampling_weight, np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"sampling_weight must be a non-empty [n] vector, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("sampling_weight must be finite and >= 0")
    n = p.size
    lw = np.ones(n, np.float32) if loss_weight is None else np.asarray(loss_weight, np.float32)
    if lw.shape != (n,):
        raise ValueError(f"loss_weight has shape {lw.shape}, expected ({n},)")
    p = p * (lw != 0)
    if p.sum() <= 0:
        raise ValueError("sampling_weight is zero on every sample that can be drawn")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    draws = int(np.count_nonzero(p)) if num_draws is None else int(num_draws)
    if draws <= 0:
        raise ValueError(f"num_draws must be positive, got {num_draws}")
    idx = host_rng(key).choice(n, draws, replace=True, p=p / p.sum())  # host draw: no compile per size
    nb = -(-draws // batch_size)
    pad = nb * batch_size - draws
    index = np.concatenate([idx, np.full(pad, idx[0])]).reshape(nb, batch_size).astype(np.int32)
    weight = np.concatenate([lw[idx], np.zeros(pad, np.float32)]).reshape(nb, batch_size)
    return index, weight


def gather_batch(data: dict, index, weight) -> dict:
    """Select rows ``index`` [B] of every array in ``data`` and attach ``weight`` [B] (jit-able)."""
    batch = {k: v[index] for k, v in data.items() if k != "weight"}
    batch["weight"] = weight
    if "index" not in batch:
        batch["index"] = index
    return batch


def iterate_batches(data: dict, batch_size: int, *, key=None, weight=None):
    """Yield padded numpy batches (host-side iteration, e.g. for evaluation or user loops)."""
    n = split_size(data)
    index, bw = batch_plan(n, batch_size, key=key, weight=weight)
    for i in range(index.shape[0]):
        yield gather_batch({k: np.asarray(v) for k, v in data.items()}, index[i], bw[i])


def device_data(split: dict, name: str = "split") -> dict:
    """The arrays batches are gathered from (``x``, ``y``, ``group``, ``index``), checked, on device.

    Raises:
      ValueError: ``x`` or ``y`` missing, arrays of different lengths, NaN or inf in ``x``.
    """
    data = {k: jnp.asarray(split[k]) for k in DATA_KEYS if k in split and split[k] is not None}
    if "x" not in data or "y" not in data:
        raise ValueError(f"the {name} set needs 'x' and 'y'")
    n = split_size(split)
    for k, v in data.items():
        if v.shape[0] != n:
            raise ValueError(f"{name}[{k!r}] has {v.shape[0]} rows, {name}['y'] has {n}")
    if jnp.issubdtype(data["x"].dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(data["x"]))):
        raise ValueError(f"{name} features contain NaN or inf")
    return data
