"""Per-sample gradients over any parameter pytree, memory-bounded by chunking.

Conventions (DESIGN.md):

* ``loss_fn(params, batch) -> [B]`` returns *per-example*, unweighted losses; ``batch`` is a dict of
  arrays with a leading batch axis B (``x``, ``y``, ``weight``, ...). Leaves of rank 0 are shared by
  all examples. Per-sample gradients evaluate ``loss_fn`` on one-example batches, so the model must
  treat examples independently (eval mode: no batch statistics, no dropout).
* A parameter *subset* (the head, the last k blocks) is differentiated by splitting the tree with
  :func:`partition` and passing the fixed rest as ``frozen=``: ``loss_fn`` then always receives the
  full tree ``combine(params, frozen)``, while gradients are taken w.r.t. ``params`` only.
* Flat vectors follow :func:`flatten_params` (``jax.flatten_util.ravel_pytree`` order).

None of these functions jits itself; jit the caller and pass params and batches as arguments.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxunlearn import losses, subsets

__all__ = [
    "NonFiniteError",
    "flatten_params",
    "partition",
    "combine",
    "per_sample_grads",
    "per_sample_grads_flat",
    "mean_grad",
    "make_mean_objective",
    "check_finite",
    "check_like",
    "check_flat",
    "batch_size_of",
]

LossFn = Callable[[Any, dict], jax.Array]


class NonFiniteError(ValueError):
    """A gradient, vector or other quantity contains NaN or inf."""


def flatten_params(params) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """``params -> (flat [p], unflatten)``, the layout of every flat vector in the influence code.

    ``unflatten`` maps a [p] vector back to a pytree with the leaves' original shapes and dtypes.
    """
    return ravel_pytree(params)


def partition(params, select):
    """Split a pytree into ``(selected, rest)``; each holds ``None`` where the other has a leaf.

    Args:
      params: a pytree (e.g. Flax ``{"dense_0": {...}, "head": {...}}``).
      select: anything :func:`jaxunlearn.subsets.mask_of` takes: a bool mask pytree with
        ``params``' structure (Python bools, e.g. :func:`jaxunlearn.models.last_k_mask`), a path
        prefix such as ``"head"`` (paths join keys with ``/``: ``"head/kernel"``), a sequence of
        prefixes, or ``select(path, leaf) -> bool``.

    Returns:
      ``(selected, rest)``; ``combine(selected, rest)`` rebuilds ``params``.

    Raises:
      ValueError: if nothing is selected, or a mask with per-element (array) leaves.
    """
    mask = subsets.mask_of(params, select)
    if not all(isinstance(m, (bool, np.bool_)) for m in jax.tree.leaves(mask)):
        raise ValueError("select as a mask must be a pytree of Python bools (whole leaves); "
                         "influence does not take per-element masks")
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"partition: {select!r} selects no parameter")
    rest = jax.tree.map(lambda m: not m, mask)
    return subsets.select(params, mask), subsets.select(params, rest)


def combine(*trees):
    """Merge trees from :func:`partition`: at each leaf, the first one that is not ``None``."""

    def pick(*xs):
        return next((x for x in xs if x is not None), None)

    return jax.tree_util.tree_map(pick, *trees, is_leaf=lambda x: x is None)


def _full(params, frozen):
    return params if frozen is None else combine(params, frozen)


def batch_size_of(batch: dict) -> int:
    """Leading-axis size B of a batch (``weight`` if present, else the first non-scalar leaf)."""
    if isinstance(batch, dict) and "weight" in batch:
        return int(jnp.shape(batch["weight"])[0])
    for leaf in jax.tree_util.tree_leaves(batch):
        if jnp.ndim(leaf) >= 1:
            return int(jnp.shape(leaf)[0])
    raise ValueError("batch has no array with a leading batch axis")


def _split_batch(batch):
    """``(mapped, shared, rebuild)``: leaves with a batch axis, rank-0 leaves, and their merger."""
    b = batch_size_of(batch)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    for path, leaf in leaves:
        if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] != b:
            raise ValueError(f"batch leaf {subsets.path_name(path)!r} has leading size {jnp.shape(leaf)[0]}, "
                             f"expected the batch size {b}")
    is_mapped = [jnp.ndim(leaf) >= 1 for _, leaf in leaves]
    mapped = [leaf for (_, leaf), m in zip(leaves, is_mapped) if m]
    shared = [leaf for (_, leaf), m in zip(leaves, is_mapped) if not m]

    def rebuild(mapped_leaves):
        it_m, it_s = iter(mapped_leaves), iter(shared)
        return jax.tree_util.tree_unflatten(treedef, [next(it_m) if m else next(it_s) for m in is_mapped])

    return b, mapped, rebuild


def _example_loss(loss_fn, frozen, rebuild):
    """``f(params, example_leaves) -> scalar``: loss_fn on a one-example batch."""

    def f(params, example):
        one = rebuild([x[None] for x in example])
        out = loss_fn(_full(params, frozen), one)
        if jnp.shape(out) != (1,):
            raise ValueError("loss_fn must return per-example losses of shape [B]; got shape "
                             f"{jnp.shape(out)} for a batch of one example")
        return out[0]

    return f


def _map_examples(fn, mapped, b, chunk_size):
    if chunk_size is None or chunk_size >= b:
        return jax.vmap(fn)(mapped)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return jax.lax.map(fn, mapped, batch_size=int(chunk_size))


def per_sample_grads(loss_fn: LossFn, params, batch: dict, *, chunk_size: int | None = None,
                     frozen=None):
    """Gradients of each example's loss, ``grad_theta loss(theta; z_i)`` for i < B.

    Args:
      loss_fn: ``loss_fn(full_params, batch) -> [B]`` per-example losses (unweighted).
      params: pytree differentiated (all parameters, or the ``selected`` part of :func:`partition`).
      batch: dict of [B, ...] arrays (rank-0 leaves are shared).
      chunk_size: evaluate at most this many examples at once (``jax.lax.map(batch_size=...)``),
        bounding the activation memory; None vmaps the whole batch.
      frozen: the ``rest`` of :func:`partition`, held fixed; None if ``params`` is the full tree.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis [B, ...]. Weights are not applied.
    """
    b, mapped, rebuild = _split_batch(batch)
    grad_fn = jax.grad(_example_loss(loss_fn, frozen, rebuild))
    return _map_examples(lambda ex: grad_fn(params, ex), mapped, b, chunk_size)


def per_sample_grads_flat(loss_fn: LossFn, params, batch: dict, *, chunk_size: int | None = None,
                          frozen=None) -> jax.Array:
    """Per-sample gradients as one [B, p] matrix (rows in :func:`flatten_params` order).

    Same arguments as :func:`per_sample_grads`; each chunk is flattened as it is produced, so the
    only n x p array is the result itself.
    """
    b, mapped, rebuild = _split_batch(batch)
    grad_fn = jax.grad(_example_loss(loss_fn, frozen, rebuild))
    return _map_examples(lambda ex: ravel_pytree(grad_fn(params, ex))[0], mapped, b, chunk_size)


def _weight(batch, b, dtype):
    if isinstance(batch, dict) and "weight" in batch:
        return batch["weight"]
    return jnp.ones((b,), dtype)


def make_mean_objective(loss_fn: LossFn, *, l2: float = 0.0, frozen=None):
    """``objective(params, batch, frozen=None) -> scalar``: weighted mean loss + ``(l2/2)||params||^2``.

    This is the training objective of :mod:`jaxunlearn.train` (seed 004 eq. (1)); its Hessian is
    the influence Hessian H. For a parameter subset, pass the fixed rest of :func:`partition` as
    the objective's third argument (``hvp(objective, head, v, batch, rest)``: a traced argument
    under jit) or here as ``frozen`` (a closure). The penalty covers only the differentiated subset
    (the frozen part's penalty is constant and does not enter H). Batches without ``weight`` use
    weight 1 for every example.
    """
    default_frozen = frozen

    def objective(params, batch, frozen=None):
        frozen = default_frozen if frozen is None else frozen
        values = loss_fn(_full(params, frozen), batch)
        out = losses.weighted_mean(values, _weight(batch, values.shape[0], values.dtype))
        if l2:
            out = out + l2 * losses.l2_penalty(params)
        return out

    return objective


def mean_grad(loss_fn: LossFn, params, batch: dict, *, l2: float = 0.0, frozen=None):
    """Gradient of ``weighted_mean(loss_fn(params, batch), batch["weight"])`` (+ the L2 term).

    Returns:
      A pytree like ``params``. Without ``batch["weight"]`` every example has weight 1.
    """
    return jax.grad(make_mean_objective(loss_fn, l2=l2))(params, batch, frozen)


def check_finite(tree, what: str):
    """Raise :class:`NonFiniteError` naming ``what`` and the offending leaves if any is NaN/inf.

    For use outside jit on concrete arrays (e.g. on the outputs of a jitted influence call). Traced
    leaves cannot be inspected: inside jit this check is skipped, so check the jitted call's
    outputs instead. Returns ``tree`` unchanged, so it can wrap an expression.
    """
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or isinstance(leaf, jax.core.Tracer):
            continue
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.inexact):
            continue
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            name = subsets.path_name(path) or "<root>"
            bad.append(f"{name}: {n_bad} of {arr.size} entries (nan: {int(np.isnan(arr).sum())})")
    if bad:
        raise NonFiniteError(f"{what} contain non-finite values: " + "; ".join(bad)
                             + ". Check the model outputs, the learning rate and the inputs.")
    return tree


def check_like(v, params, what: str = "v"):
    """Check that pytree ``v`` has ``params``' structure and leaf shapes; cast to their dtypes.

    Raises:
      ValueError: naming the first mismatch (structure or a leaf's shape).
    """
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    v_leaves, v_def = jax.tree_util.tree_flatten(v)
    if p_def != v_def:
        raise ValueError(f"{what} has tree structure {v_def}, but the parameters have {p_def}")
    paths = [subsets.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for name, pl, vl in zip(paths, p_leaves, v_leaves):
        if jnp.shape(pl) != jnp.shape(vl):
            raise ValueError(f"{what} leaf {name!r} has shape {jnp.shape(vl)}, but the parameter has "
                             f"shape {jnp.shape(pl)}")
    return jax.tree_util.tree_unflatten(
        p_def, [jnp.asarray(vl).astype(jnp.result_type(pl)) for pl, vl in zip(p_leaves, v_leaves)])


def check_flat(v: jax.Array, p: int, what: str = "v") -> jax.Array:
    """Check that ``v`` is a flat vector [p] or a stack of columns [p, q]."""
    v = jnp.asarray(v)
    if v.ndim not in (1, 2) or v.shape[0] != p:
        raise ValueError(f"{what} must have shape [{p}] or [{p}, q] to match {p} parameters; "
                         f"got {list(v.shape)}")
    return v
