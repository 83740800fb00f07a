"""Data-parallel SPMD helpers: a 1-D ``data`` mesh, batch sharding, replication.

Parallelism is ``jax.jit`` over arrays placed with ``NamedSharding`` (no pmap): shard the batch
along its leading axis, replicate the parameters, and call the jitted function as usual. XLA
partitions the computation and inserts the reductions, so a mean over the batch (a gradient, an
HVP, a metric's sufficient statistics) is summed across devices and equals the single-device
result to float rounding::

    mesh = sharding.data_mesh()
    batch = sharding.shard_batch(batch, mesh, pad=True)
    params = sharding.replicate(params, mesh)
    grads = jax.jit(per_sample_grads_flat, static_argnums=0)(loss_fn, params, batch)

The library never picks a mesh itself (DESIGN.md); drivers call these helpers. Multi-host runs
call ``jax.distributed.initialize()`` first; each process then passes its own slice of the batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["data_mesh", "shard_batch", "replicate", "pad_batch"]


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) with one ``AxisType.Auto`` axis.

    Auto (not Explicit) axes, because explicit sharding in JAX 0.10 rejects some of the sharded
    contractions the influence code uses (DESIGN.md).
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (axis,), axis_types=(AxisType.Auto,))


def _axis(mesh: Mesh, axis: str | None) -> str:
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh has axes {mesh.axis_names}; name the data axis with axis=")
        return mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not in the mesh axes {mesh.axis_names}")
    return axis


def _leading(batch) -> int:
    if isinstance(batch, dict) and "weight" in batch:
        return int(np.shape(batch["weight"])[0])
    for leaf in jax.tree_util.tree_leaves(batch):
        if np.ndim(leaf) >= 1:
            return int(np.shape(leaf)[0])
    raise ValueError("batch has no array with a leading batch axis")


def pad_batch(batch: dict, multiple: int) -> dict:
    """Pad every leading axis up to a multiple of ``multiple`` with weight-0 copies of row 0.

    Weight 0 means "absent" for every weighted reduction (:func:`jaxunlearn.losses.weighted_mean`),
    so means and sums are unchanged; per-example outputs gain rows to drop (the first B are real).

    Raises:
      ValueError: if padding is needed and the batch has no ``weight``.
    """
    b = _leading(batch)
    extra = (-b) % multiple
    if extra == 0:
        return batch
    if not isinstance(batch, dict) or "weight" not in batch:
        raise ValueError(f"padding {b} samples to a multiple of {multiple} needs batch['weight'] "
                         "(padded rows get weight 0)")

    def pad(path, leaf):
        if np.ndim(leaf) == 0:
            return leaf
        key = getattr(path[0], "key", None) if path else None
        if key == "weight":
            return jnp.concatenate([jnp.asarray(leaf), jnp.zeros((extra,), jnp.asarray(leaf).dtype)])
        leaf = jnp.asarray(leaf)
        return jnp.concatenate([leaf, jnp.repeat(leaf[:1], extra, axis=0)])

    return jax.tree_util.tree_map_with_path(pad, batch)


def shard_batch(batch: dict, mesh: Mesh, *, axis: str | None = None, pad: bool = False) -> dict:
    """Place a batch on ``mesh``: leading axes split over ``axis``, rank-0 leaves replicated.

    Args:
      batch: dict of [B, ...] arrays (numpy or jax). With several processes, each passes its local
        slice and the global batch is their concatenation.
      mesh: e.g. :func:`data_mesh`.
      axis: the data axis name (default: the mesh's only axis).
      pad: if B is not divisible by the number of devices on ``axis``, pad with weight-0 copies
        (:func:`pad_batch`) instead of raising. Padded rows change no weighted mean; per-example
        outputs have the padded length.

    Returns:
      The batch as global ``jax.Array`` s with ``NamedSharding(mesh, P(axis))``.

    Raises:
      ValueError: B not divisible by the number of devices (and ``pad=False``), or a leaf whose
        leading size differs from B.
    """
    axis = _axis(mesh, axis)
    n_shards = mesh.shape[axis]
    multi = jax.process_count() > 1
    local_shards = max(1, n_shards // jax.process_count()) if multi else n_shards
    b = _leading(batch)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if np.ndim(leaf) >= 1 and np.shape(leaf)[0] != b:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has leading size "
                             f"{np.shape(leaf)[0]}, expected {b}")
    if b % local_shards:
        if not pad:
            raise ValueError(f"batch size {b} is not divisible by the {local_shards} devices on mesh "
                             f"axis {axis!r}; pass pad=True to pad with weight-0 rows")
        batch = pad_batch(batch, local_shards)
    sharded, replicated = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())

    def put(leaf):
        s = sharded if np.ndim(leaf) >= 1 else replicated
        if multi:
            return jax.make_array_from_process_local_data(s, np.asarray(leaf))
        return jax.device_put(leaf, s)

    return jax.tree_util.tree_map(put, batch)


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` (parameters, vectors) fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
