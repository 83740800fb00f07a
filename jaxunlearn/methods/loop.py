"""The one driver loop that runs every unlearning method.

Each epoch walks the retain set once in shuffled, padded batches and zips it with a *cycled*
forget loader (a fresh shuffle per pass, passes restarting every epoch), as the references'
``zip(retain_loader, cycle(forget_loader))``; a method that reads only one set walks that set
once. The whole epoch is one ``lax.scan`` over a precomputed batch plan, with the data on device
and each batch gathered inside the step, so ``update`` is traced and compiled once (shapes are
static: the last batch of a pass is padded with weight-0 samples, the epoch with skipped steps up
to what a pass over the whole split can take, and forget batches to a power of two; the compiled
epoch is cached per method, so further runs of the same method on differently weighted sets reuse
it). One-shot methods (IF, Fisher, NTK) get a single ``update`` on the whole sets (their nonzero
rows, padded with weight-0 rows to a power of two).

Per-sample weights come from each split's ``"weight"`` entry (default: -1 for the forget set,
1 for the retain set, the hard method; see :mod:`jaxunlearn.methods.base`). Weight-0 samples are
never scheduled. ``retain_sampling`` replaces the shuffled pass over D_r by |D_r| draws with
replacement, e.g. De Min et al.'s group reweighting sampler (:func:`resample_plan`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.data.batching import (batch_plan, device_data, gather_batch, num_batches,
                                      resample_plan, split_size)
from jaxunlearn.progress import progress_bar
from jaxunlearn.methods.base import Method, schedule

__all__ = ["run_method", "epoch_plan", "resample_plan", "split_weight"]

_DEFAULT_WEIGHT = {"forget": -1.0, "retain": 1.0}


def split_weight(split: dict, name: str) -> np.ndarray:
    """Per-sample weights [n] of a forget or retain split (its ``"weight"`` or the default)."""
    n = split_size(split)
    if "weight" not in split or split["weight"] is None:
        return np.full(n, _DEFAULT_WEIGHT[name], np.float32)
    w = np.asarray(split["weight"], np.float32)
    if w.shape != (n,):
        raise ValueError(f"{name} weight has shape {w.shape}, but the {name} set has {n} samples")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} weight contains NaN or inf")
    return w


def epoch_plan(key: jax.Array, uses, weights: dict, batch_size: int, *,
               forget_batch_size: int | None = None, retain_sampling=None) -> dict:
    """The batch plan of one epoch for a method reading the sets ``uses``.

    Args:
      key: the epoch's key.
      uses: the method's sets (``Method.uses``).
      weights: ``{name: [n] weights}`` of those sets (:func:`split_weight`).
      batch_size: retain batch size (and forget batch size unless given).
      forget_batch_size: forget batch size.
      retain_sampling: optional [n_r] sampling weights (:func:`resample_plan`).

    Returns:
      ``{"<set>_index", "<set>_weight": [S, B], "forget_pass": [S]}`` (numpy).
    """
    k_r, k_f = jax.random.split(key)
    bf = forget_batch_size or batch_size
    plan = {}
    steps = None
    if "retain" in uses:
        w = weights["retain"]
        if retain_sampling is None:
            idx, bw = batch_plan(w.size, batch_size, key=k_r, weight=w)
        else:
            rs = np.asarray(retain_sampling)
            if rs.shape != w.shape:
                raise ValueError(f"retain_sampling has shape {rs.shape}, the retain set has {w.size} samples")
            idx, bw = resample_plan(k_r, rs, batch_size, loss_weight=w)
        plan["retain_index"], plan["retain_weight"] = idx, bw
        steps = idx.shape[0]
    if "forget" in uses:
        w = weights["forget"]
        rows_i, rows_w, passes = [], [], []
        c = 0
        while c == 0 or (steps is not None and sum(map(len, rows_i)) < steps):
            idx, bw = batch_plan(w.size, bf, key=jax.random.fold_in(k_f, c), weight=w)
            rows_i.append(idx)
            rows_w.append(bw)
            passes.append(np.full(idx.shape[0], c, np.int32))
            c += 1
        steps = rows_i[0].shape[0] if steps is None else steps
        plan["forget_index"] = np.concatenate(rows_i)[:steps]
        plan["forget_weight"] = np.concatenate(rows_w)[:steps]
        plan["forget_pass"] = np.concatenate(passes)[:steps]
    if steps is None:
        raise ValueError("the method reads neither the forget nor the retain set; it must be one-shot")
    plan.setdefault("forget_pass", np.zeros(steps, np.int32))
    return plan


def _bucket(k: int) -> int:
    """The smallest power of two >= k: sizes that differ a little share one compiled shape."""
    return 1 << max(0, int(k) - 1).bit_length()


def _pad_plan(plan: dict, steps: int, widths: dict) -> dict:
    """``plan`` padded to ``steps`` rows and ``widths[name]`` columns, padding with weight 0.

    Padded rows are marked inactive (``plan["active"]``) and skipped by the compiled epoch, so an
    optimizer never sees an empty step; padded columns are weight-0 samples, which the weighted
    losses ignore. A grid of runs whose sets differ in size thus reuses one compiled epoch.
    """
    real = plan["forget_pass"].shape[0]
    if steps < real:
        raise ValueError(f"cannot pad a plan of {real} steps to {steps}")
    out = {"active": np.r_[np.ones(real, bool), np.zeros(steps - real, bool)]}
    for k, v in plan.items():
        name = k.rsplit("_", 1)[0]
        if k.endswith(("_index", "_weight")) and widths.get(name, v.shape[1]) > v.shape[1]:
            extra = widths[name] - v.shape[1]
            fill = np.repeat(v[:, :1], extra, 1) if k.endswith("_index") else np.zeros((real, extra), v.dtype)
            v = np.concatenate([v, fill], 1)
        rows = np.repeat(v[:1], steps - real, 0)
        if k.endswith("_weight"):
            rows = np.zeros_like(rows)
        out[k] = np.concatenate([v, rows], 0)
    return out


def _make_epoch_fn(update, uses):
    def epoch_fn(variables, state, data, plan, epoch, num_epochs, key):
        def body(carry, row):
            traced = {}

            def step(c):
                batches = {name: gather_batch(data[name], row[f"{name}_index"], row[f"{name}_weight"])
                           for name in uses}
                batches["schedule"] = schedule(epoch, num_epochs, row["forget_pass"])
                variables, state, metrics = update(*c, batches, jax.random.fold_in(key, row["step"]))
                traced["metrics"] = metrics
                return (variables, state), metrics

            def skip(c):  # a padding row: nothing moves (metric shapes from step's trace)
                metrics = traced["metrics"] if "metrics" in traced else jax.eval_shape(step, c)[1]
                return c, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

            return jax.lax.cond(row["active"], step, skip, carry)

        (variables, state), metrics = jax.lax.scan(body, (variables, state), plan)
        return variables, state, metrics

    return epoch_fn


@functools.lru_cache(maxsize=64)
def _jitted_epoch(update, uses):
    # Cached per update function, so repeated runs of one Method with equal shapes (a grid of
    # weights, seeds or epochs) reuse the compiled epoch instead of recompiling it.
    return jax.jit(_make_epoch_fn(update, uses))


@functools.lru_cache(maxsize=64)
def _jitted_update(update):
    return jax.jit(update)


def run_method(method: Method, variables, forget: dict | None, retain: dict | None, *,
               epochs: int, batch_size: int, key: jax.Array, forget_batch_size: int | None = None,
               retain_sampling=None, state=None, progress: bool = True):
    """Run an unlearning method: ``epochs`` passes of the zipped loaders, or one one-shot update.

    Args:
      method: a :class:`~jaxunlearn.methods.base.Method`.
      variables: the model's variables ``{"params": ..., ...}`` (the original model theta_0).
      forget: the forget split ``{"x", "y", ("weight", "group", "index")}`` or None if unused.
      retain: the retain split, likewise.
      epochs: number of epochs (ignored by one-shot methods).
      batch_size: retain batch size (and forget batch size unless ``forget_batch_size``).
      key: PRNG key; epoch e's plan is drawn from ``fold_in(fold_in(key, e), 0)`` and the t-th
        update of the run (counting from 0 across epochs) gets ``fold_in(fold_in(fold_in(key, e),
        1), t)``; a one-shot update gets ``key`` itself.
      forget_batch_size: forget batch size (e.g. ``B * |D_f| / |D_r|`` to mix the sets in
        proportion, as a single concatenated loader would).
      retain_sampling: optional [n_r] sampling weights: each epoch draws |D_r| retain samples with
        replacement (De Min et al.'s reweighted sampler).
      state: a method state to continue from (default ``method.init(variables)``); the epochs of
        this call are numbered from 0 in ``batches["schedule"]``.
      progress: show a progress bar over epochs (tqdm, if installed).

    Returns:
      ``(variables, state, history)``; history has one dict per epoch with ``"epoch"``,
      ``"seconds"`` and the epoch mean of every metric the update reports.

    Raises:
      ValueError: a set the method needs is missing, weights of the wrong length, bad sizes.
      FloatingPointError: the loss became NaN or inf.
    """
    if not isinstance(method, Method):
        raise ValueError(f"method must be a jaxunlearn.methods.Method, got {type(method).__name__}")
    sets = {"forget": forget, "retain": retain}
    for name in method.uses:
        if sets[name] is None:
            raise ValueError(f"{method.name} needs the {name} set")
    if int(batch_size) <= 0 or (forget_batch_size is not None and int(forget_batch_size) <= 0):
        raise ValueError(f"batch sizes must be positive, got {batch_size}, {forget_batch_size}")
    if not method.one_shot and int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if retain_sampling is not None and ("retain" not in method.uses or method.one_shot):
        raise ValueError(f"retain_sampling was given but {method.name} does not iterate over the retain set")
    weights = {name: split_weight(sets[name], name) for name in method.uses}
    data = {name: device_data(sets[name], name) for name in method.uses}
    if state is None:
        state = method.init(variables)

    if method.one_shot:
        t0 = time.perf_counter()
        batches = {}
        for name in method.uses:
            w = weights[name]
            size = min(w.size, _bucket(max(1, int(np.count_nonzero(w)))))  # weight-0 padding
            idx, bw = batch_plan(w.size, size, weight=w)
            batches[name] = gather_batch(data[name], jnp.asarray(idx[0]), jnp.asarray(bw[0]))
        batches["schedule"] = schedule(0, 1, 0)
        variables, state, metrics = _jitted_update(method.update)(variables, state, batches, key)
        row = {"epoch": 1, **{k: float(v) for k, v in metrics.items()}}
        row["seconds"] = time.perf_counter() - t0
        return variables, state, [row]

    epoch_fn = _jitted_epoch(method.update, tuple(method.uses))
    # static shapes across runs: as many steps as a pass over the whole split can take, forget
    # batches widened to a power of two (both padded with weight 0, see _pad_plan)
    bf = int(forget_batch_size or batch_size)
    widths = {"forget": _bucket(bf)} if "forget" in method.uses and "retain" in method.uses else {}
    if "retain" in method.uses:
        max_steps = num_batches(weights["retain"].size, int(batch_size))
    else:
        max_steps = num_batches(weights["forget"].size, bf)
    history = []
    step = 0
    bar = progress_bar(range(epochs), desc=method.name, enabled=progress, total=epochs)
    for e in bar:
        t0 = time.perf_counter()
        ekey = jax.random.fold_in(key, e)
        plan = epoch_plan(jax.random.fold_in(ekey, 0), method.uses, weights, batch_size,
                          forget_batch_size=forget_batch_size, retain_sampling=retain_sampling)
        steps = plan["forget_pass"].shape[0]
        plan["step"] = np.arange(step, step + steps, dtype=np.int32)
        step += steps
        plan = _pad_plan(plan, max(max_steps, steps), widths)
        active = plan["active"]
        plan = {k: jnp.asarray(v) for k, v in plan.items()}
        variables, state, metrics = epoch_fn(variables, state, data, plan, jnp.int32(e),
                                             jnp.int32(epochs), jax.random.fold_in(ekey, 1))
        row = {"epoch": e + 1, **{k: float(np.mean(np.asarray(v)[active])) for k, v in metrics.items()}}
        if not np.isfinite(row["loss"]):
            raise FloatingPointError(f"{method.name} diverged: loss is {row['loss']} in epoch {e + 1}")
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row['loss']:.4f}")
    return variables, state, history
