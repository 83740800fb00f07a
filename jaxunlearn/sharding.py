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

**FSDP-style parameters.** For models too large to replicate (ResNet-50, ViT-B and up), a 2-D mesh
``data x model`` (:func:`mesh_2d`) keeps the batch split over ``data`` while every large leaf is
split over ``model`` along one of its dimensions (:func:`fsdp_shardings`); small leaves stay
replicated. XLA all-gathers each sharded leaf where it is used and reduce-scatters its gradient,
so a step computes the same values as the replicated one (float rounding apart)::

    mesh = sharding.mesh_2d(data=2, model=4)
    variables = sharding.place(variables, sharding.fsdp_shardings(variables, mesh))
    batch = sharding.shard_batch(batch, mesh, axis="data")
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["data_axis", "data_mesh", "mesh_2d", "shard_batch", "replicate", "pad_batch", "fsdp_spec",
           "fsdp_shardings", "place"]


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) with one ``AxisType.Auto`` axis.

    Auto (not Explicit) axes, because explicit sharding in JAX 0.10 rejects some of the sharded
    contractions the influence code uses (DESIGN.md).
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (axis,), axis_types=(AxisType.Auto,))


def mesh_2d(*, data: int, model: int, devices: Sequence[jax.Device] | None = None,
            axes: tuple[str, str] = ("data", "model")) -> Mesh:
    """A ``data x model`` mesh (both axes ``AxisType.Auto``) over the first ``data * model`` devices.

    Raises:
      ValueError: ``data * model`` is not positive or exceeds the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = int(data) * int(model)
    if int(data) < 1 or int(model) < 1 or n > len(devices):
        raise ValueError(f"mesh_2d(data={data}, model={model}) needs {n} devices, "
                         f"{len(devices)} are available")
    grid = np.asarray(devices[:n], dtype=object).reshape(int(data), int(model))
    return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto, AxisType.Auto))


def data_axis(mesh: Mesh | None, axis: str | None = None) -> str | None:
    """The data axis of ``mesh``: ``axis`` if given, else ``"data"`` if the mesh has it, else its
    first axis (None without a mesh)."""
    if mesh is None:
        return None
    if axis is None:
        axis = "data" if "data" in mesh.axis_names else mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"data axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    return axis


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


def fsdp_spec(shape: Sequence[int], shards: int, *, axis: str = "model",
              min_size: int = 2 ** 16) -> P:
    """The ``PartitionSpec`` of one leaf under :func:`fsdp_shardings`.

    A leaf with at least ``min_size`` elements is split over ``axis`` along its largest dimension
    divisible by ``shards`` (the last such one on ties, e.g. a conv kernel's output channels);
    anything else (small leaves, scalars, no divisible dimension) is replicated, ``P()``.
    """
    shape = tuple(int(d) for d in shape)
    if shards <= 1 or not shape or int(np.prod(shape)) < int(min_size):
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % shards == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    return P(*([None] * best + [axis]))


def fsdp_shardings(tree, mesh: Mesh, *, axis: str = "model", min_size: int = 2 ** 16):
    """FSDP-style ``NamedSharding`` s for a pytree of arrays (parameters, variables, optimizer
    state): large leaves split over the mesh axis ``axis``, the rest replicated (:func:`fsdp_spec`).

    The choice depends only on a leaf's shape, so a parameter and its optimizer moments (same
    shape) are split alike. Place the tree with :func:`place` (or ``jax.device_put``) and shard
    batches over the other (data) axis with :func:`shard_batch`.

    Args:
      tree: pytree of arrays or ``jax.ShapeDtypeStruct`` s.
      mesh: a mesh with ``axis`` among its axes, e.g. :func:`mesh_2d`.
      axis: the mesh axis the parameters are split over.
      min_size: leaves with fewer elements stay replicated (the gather costs more than it saves).

    Returns:
      A pytree like ``tree`` of :class:`~jax.sharding.NamedSharding`.

    Raises:
      ValueError: ``axis`` is not an axis of ``mesh``.
    """
    axis = _axis(mesh, axis)
    shards = int(mesh.shape[axis])
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(getattr(a, "shape", np.shape(a)), shards,
                                                                 axis=axis, min_size=min_size)), tree)


def place(tree, shardings):
    """``jax.device_put`` of ``tree`` with a matching pytree of shardings (or one sharding)."""
    return jax.device_put(tree, shardings)
