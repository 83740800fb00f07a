"""Streaming input with grain: the padded, weighted batches of :mod:`batching`, read from disk.

For data larger than host or device memory. The in-memory path (:func:`~jaxunlearn.data.batching.
batch_plan` + :func:`~jaxunlearn.data.batching.gather_batch` on device) stays the fast default for
small data; this path produces *the same batch dicts* from records read on demand, so a loop can
consume either.

How it works:

* A :class:`StreamingSource` is a random-access record source (``tfds.data_source(...)`` over
  array_record files, or any sequence of records) plus a record converter (for images,
  :class:`~jaxunlearn.data.tfds_loaders.ImageRecord`: uint8 HWC decoded by TFDS, then the same
  float32 transform as the in-memory loaders) and optionally a subset of record rows (a forget or
  retain set on disk: :meth:`StreamingSource.subset`).
* The order of an epoch is a *batch plan* ``(index, weight)`` [S, B] computed on the host by the
  same functions as the in-memory path (:func:`batch_plan`, :func:`resample_plan`): shuffled
  deterministically from a key, weight-0 samples never scheduled, the last batch padded with
  weight-0 rows. :meth:`StreamingSource.batches` reads the plan's rows with a grain
  ``MapDataset`` (one element per batch; ``num_threads`` reader threads, ``prefetch`` batches
  ahead) and yields ``{"x": [b, ...], "y": [b], "weight": [b], "group": [b], "index": [b]}``,
  equal to ``gather_batch(in_memory_split, index[s], weight[s])``.
* :class:`StreamingLoader` runs epochs with the loop's plan convention (epoch e's plan from
  ``fold_in(fold_in(key, e), 0)``, or any ``plan_fn(epoch)``) and keeps an iterator state
  ``{"epoch", "step"}`` (the next batch to yield). Save it in the checkpoint next to the train
  state (``Checkpointer.save(step, state, metadata=loader.state)``) and
  :meth:`StreamingLoader.restore` it: since the plan is a pure function of (key, epoch), the
  resumed run yields exactly the batches the interrupted one would have.

Multi-host (TPU pods, several GPU hosts): call ``jax.distributed.initialize()`` at the start of
every process, before any other JAX call. Every process then builds the same source and plan (same
seed, same weights); :meth:`StreamingSource.batches` reads only this process's slice of each global
batch, columns ``[p * B/P, (p + 1) * B/P)`` of the plan for process ``p = jax.process_index()``
of ``P = jax.process_count()`` (B must be divisible by P), and :func:`global_batch` assembles the
slices into one global ``jax.Array`` of B rows sharded over the mesh's data axis
(``jax.make_array_from_process_local_data``), the same array the single-process run builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from jaxunlearn.data.batching import batch_plan
from jaxunlearn.data.dataset import DataError

__all__ = ["StreamingSource", "StreamingLoader", "SourceArray", "streamed_split", "split_source",
           "materialize", "tfds_streaming_source", "global_batch", "process_slice"]

Convert = Callable[[Any], tuple[np.ndarray, int, int]]


def _grain():
    try:
        import grain
    except ImportError as e:  # optional dependency
        raise ImportError("streaming input needs grain: pip install 'jaxunlearn[streaming]' "
                          "(or pip install grain)") from e
    return grain


def process_slice(batch_size: int, *, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """The columns of each global batch that process ``process_index`` reads.

    Args:
      batch_size: global batch size B.
      process_index, process_count: default ``jax.process_index()``, ``jax.process_count()``.

    Raises:
      DataError: B is not divisible by the process count, or the index is out of range.
    """
    p = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= p < count:
        raise DataError(f"process_index {p} is not in [0, process_count={count})")
    if batch_size % count:
        raise DataError(f"batch size {batch_size} is not divisible by the process count {count}; "
                        f"choose a multiple of {count} so every process reads an equal slice")
    b = batch_size // count
    return slice(p * b, (p + 1) * b)


class StreamingSource:
    """The samples of one split, read from a random-access record source on demand.

    Args:
      records: random-access records (``len``, ``__getitem__``; ``__getitems__`` is used for
        batched reads when present), e.g. ``tfds.data_source(name, split=...)``.
      convert: record -> ``(x float32 [...], y, group)`` (e.g.
        :func:`~jaxunlearn.data.tfds_loaders.cifar_record`). If it has a ``labels`` attribute
        (record -> ``(y, group)``) and ``label_records`` is given, :meth:`labels` uses them and
        decodes no image.
      rows: record rows that make up this source's samples, [n] (default all records); sample i
        has ``index = rows[i]``.
      label_records: the same records with the image left undecoded (for :meth:`labels`).
      name: used in error messages.
    """

    def __init__(self, records: Sequence, convert: Convert, *, rows=None, label_records=None,
                 name: str = "source"):
        self.records = records
        self.convert = convert
        self.label_records = label_records
        self.name = name
        total = len(records)
        rows = np.arange(total, dtype=np.int64) if rows is None else np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise DataError(f"{name}: rows must be a 1-D integer array, got {rows.shape} {rows.dtype}")
        if rows.size == 0:
            raise DataError(f"{name}: rows is empty")
        if rows.min() < 0 or rows.max() >= total:
            raise DataError(f"{name}: rows out of range [0, {total}) of the record source")
        self.rows = rows.astype(np.int64)

    def __len__(self) -> int:
        return int(self.rows.size)

    def subset(self, positions, *, name: str | None = None) -> "StreamingSource":
        """The samples at ``positions`` (into this source, e.g. a forget set's rows)."""
        positions = np.asarray(positions)
        if positions.ndim != 1 or (positions.size and not np.issubdtype(positions.dtype, np.integer)):
            raise DataError(f"{self.name}: positions must be a 1-D integer array, got "
                            f"{positions.shape} {positions.dtype}")
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise DataError(f"{self.name}: positions out of range [0, {len(self)})")
        return StreamingSource(self.records, self.convert, rows=self.rows[positions],
                               label_records=self.label_records, name=name or self.name)

    def _get(self, records, keys: list[int]) -> list:
        if hasattr(records, "__getitems__"):
            try:
                return list(records.__getitems__(keys))  # batched (parallel) array_record reads
            except TypeError:  # tfds.testing.mock_data's unbound __getitems__
                pass
        return [records[k] for k in keys]

    def read(self, positions) -> dict[str, np.ndarray]:
        """Samples ``positions`` [k]: ``{"x": [k, ...] float32, "y", "group", "index": [k] int32}``."""
        positions = np.asarray(positions, np.int64)
        rows = self.rows[positions]
        # read each distinct record once (padding repeats a row)
        uniq, inverse = np.unique(rows, return_inverse=True)
        samples = [self.convert(r) for r in self._get(self.records, uniq.tolist())]
        x = np.stack([np.asarray(s[0], np.float32) for s in samples])
        y = np.asarray([s[1] for s in samples], np.int32)
        g = np.asarray([s[2] for s in samples], np.int32)
        return {"x": x[inverse], "y": y[inverse], "group": g[inverse],
                "index": rows.astype(np.int32)}

    def labels(self, *, chunk_size: int = 4096) -> dict[str, np.ndarray]:
        """``{"y", "group", "index"}`` [n] of every sample (for forget sets, group weights).

        Reads the ``label_records`` with the converter's ``labels`` when both exist (no image
        decoding), else converts the full records.
        """
        fast = self.label_records is not None and hasattr(self.convert, "labels")
        y = np.empty(len(self), np.int32)
        g = np.empty(len(self), np.int32)
        for s in range(0, len(self), chunk_size):
            keys = self.rows[s:s + chunk_size].tolist()
            if fast:
                out = [self.convert.labels(r) for r in self._get(self.label_records, keys)]
            else:
                out = [self.convert(r)[1:] for r in self._get(self.records, keys)]
            y[s:s + len(keys)] = [o[0] for o in out]
            g[s:s + len(keys)] = [o[1] for o in out]
        return {"y": y, "group": g, "index": self.rows.astype(np.int32)}

    def dataset(self, index, weight, *, process_index: int | None = None,
                process_count: int | None = None):
        """A grain ``MapDataset`` whose element s is this process's slice of batch s of the plan.

        Args:
          index: [S, B] int positions into this source (a plan of :func:`batch_plan` /
            :func:`resample_plan` over ``len(self)`` samples).
          weight: [S, B] float weights of the plan (0 on padding).
          process_index, process_count: see :func:`process_slice`.
        """
        grain = _grain()
        index = np.asarray(index)
        weight = np.asarray(weight, np.float32)
        if index.ndim != 2 or weight.shape != index.shape:
            raise DataError(f"{self.name}: the plan's index and weight must both be [S, B], got "
                            f"{index.shape} and {weight.shape}")
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise DataError(f"{self.name}: plan index out of range [0, {len(self)}); was the plan "
                            f"drawn for another set?")
        cols = process_slice(index.shape[1], process_index=process_index,
                             process_count=process_count)
        index, weight = index[:, cols], weight[:, cols]

        def load(s):
            batch = self.read(index[s])
            batch["weight"] = weight[s]
            return batch

        return grain.MapDataset.range(index.shape[0]).map(load)

    def batches(self, index, weight, *, start: int = 0, num_threads: int = 8, prefetch: int = 4,
                process_index: int | None = None,
                process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield this process's slice of batches ``start, start + 1, ...`` of a plan (numpy dicts).

        Args:
          index, weight: the plan [S, B] (see :meth:`dataset`).
          start: first batch to yield (resuming inside an epoch).
          num_threads: grain reader threads (0: read in the calling thread).
          prefetch: batches read ahead.
          process_index, process_count: see :func:`process_slice`.
        """
        ds = self.dataset(index, weight, process_index=process_index, process_count=process_count)
        if not 0 <= start <= len(ds):
            raise DataError(f"{self.name}: start {start} is not in [0, {len(ds)}]")
        ds = ds[start:]
        if num_threads <= 0:
            return iter(ds)
        grain = _grain()
        prefetch = max(1, prefetch)  # an element is a whole batch: more threads than it are idle
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=min(num_threads, prefetch),
                                                         prefetch_buffer_size=prefetch)))


@dataclasses.dataclass
class StreamingLoader:
    """Epochs of padded batches of a :class:`StreamingSource` with a resumable iterator state.

    Epoch e's plan is ``plan_fn(e)`` if given, else the loop's convention (:func:`jaxunlearn.loop.run`)
    ``batch_plan(len(source), batch_size, key=fold_in(fold_in(key, e), 0), weight=weight)`` (so
    both paths shuffle identically). :attr:`state` ``{"epoch", "step"}`` names the next batch to
    yield; it is advanced as each batch is handed out, so saved after the train step that consumed
    a batch it resumes at the following one.

    Args:
      source: the samples.
      batch_size: global batch size B (divisible by the process count).
      key: PRNG key of the shuffles (ignored with ``plan_fn``); None keeps file order.
      weight: optional [n] per-sample weights (0: never scheduled).
      plan_fn: optional ``epoch -> (index, weight)`` [S, B] (e.g. a :func:`resample_plan`).
      num_threads, prefetch, process_index, process_count: see :meth:`StreamingSource.batches`.
    """

    source: StreamingSource
    batch_size: int
    key: Any = None
    weight: Any = None
    plan_fn: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    num_threads: int = 8
    prefetch: int = 4
    process_index: int | None = None
    process_count: int | None = None
    epoch_index: int = 0
    step: int = 0

    def __post_init__(self):
        if int(self.batch_size) <= 0:
            raise DataError(f"batch_size must be positive, got {self.batch_size}")
        if self.weight is not None:
            w = np.asarray(self.weight, np.float32)
            if w.shape != (len(self.source),):
                raise DataError(f"weight has shape {w.shape}, but {self.source.name} has "
                                f"{len(self.source)} samples")
            self.weight = w

    @property
    def state(self) -> dict[str, int]:
        """``{"epoch": e, "step": s}``: the next batch to yield is batch s of epoch e (JSON-able)."""
        return {"epoch": int(self.epoch_index), "step": int(self.step)}

    def restore(self, state: dict) -> None:
        """Continue from a saved :attr:`state`."""
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data iterator state must be {{'epoch': int, 'step': int}}, got "
                            f"{state!r}") from e
        if epoch < 0 or step < 0:
            raise DataError(f"data iterator state has negative fields: {state!r}")
        self.epoch_index, self.step = epoch, step

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch plan ``(index, weight)`` [S, B] of ``epoch``."""
        if self.plan_fn is not None:
            return self.plan_fn(int(epoch))
        key = None
        if self.key is not None:
            key = jax.random.fold_in(jax.random.fold_in(self.key, int(epoch)), 0)
        return batch_plan(len(self.source), int(self.batch_size), key=key, weight=self.weight)

    def epoch(self, epoch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield the remaining batches of ``epoch`` (default: the state's epoch).

        Starts at the saved step if ``epoch`` is the state's epoch, else at batch 0; at the end
        the state moves to ``(epoch + 1, 0)``.
        """
        epoch = self.epoch_index if epoch is None else int(epoch)
        start = self.step if epoch == self.epoch_index else 0
        index, weight = self.plan(epoch)
        self.epoch_index, self.step = epoch, start
        it = self.source.batches(index, weight, start=start, num_threads=self.num_threads,
                                 prefetch=self.prefetch, process_index=self.process_index,
                                 process_count=self.process_count)
        for s, batch in enumerate(it, start):
            self.epoch_index, self.step = epoch, s + 1
            yield batch
        self.epoch_index, self.step = epoch + 1, 0


class SourceArray:
    """The ``x`` column of a *streamed split*: an array-like view of a :class:`StreamingSource`'s
    inputs that reads records only when indexed.

    A streamed split is ``{"x": SourceArray(source), "y", "group", "index"}`` (labels in memory,
    inputs on disk; :func:`streamed_split`), so code written for the split contract keeps working
    where it only indexes ``x`` (``x[:1]``, ``x[rows]``, ``x.shape``), :func:`jaxunlearn.data.take`
    gives a streamed sub-split, and :func:`jaxunlearn.loop.run` and :mod:`jaxunlearn.evaluation`
    read its batches through grain. Converting it to a whole array (``np.asarray``) raises:
    call :func:`materialize` where loading every input into memory is meant.
    """

    def __init__(self, source: StreamingSource):
        self.source = source
        self._sample_shape = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._sample_shape is None:  # one record read, cached
            self._sample_shape = tuple(self.source.read(np.zeros(1, np.int64))["x"].shape[1:])
        return self._sample_shape

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.source), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        positions = np.arange(len(self.source))[key]
        if np.ndim(positions) == 0:
            return self.source.read(np.asarray([positions]))["x"][0]
        if positions.size == 0:
            return np.zeros((0, *self.sample_shape), np.float32)
        return self.source.read(positions)["x"]

    def take(self, positions) -> "SourceArray":
        """The view of ``source.subset(positions)`` (reads nothing)."""
        out = SourceArray(self.source.subset(positions))
        out._sample_shape = self._sample_shape
        return out

    def __array__(self, dtype=None, copy=None):
        raise DataError(
            f"{self.source.name}: this split's x is streamed from disk ({len(self.source)} samples); "
            "iterate it in batches (jaxunlearn.evaluation.padded_batches, loop.run) or call "
            "jaxunlearn.data.streaming.materialize(x) to load it all into memory")

    def __repr__(self) -> str:
        return f"SourceArray({self.source.name!r}, n={len(self.source)})"


def streamed_split(source: StreamingSource, *, chunk_size: int = 4096) -> dict:
    """A streamed split of ``source``: ``{"x": SourceArray(source), "y", "group", "index"}`` with
    the labels read once (:meth:`StreamingSource.labels`; images are not decoded when the source
    has label records)."""
    labels = source.labels(chunk_size=chunk_size)
    return {"x": SourceArray(source), "y": labels["y"].astype(np.int32),
            "group": labels["group"].astype(np.int32), "index": labels["index"].astype(np.int32)}


def split_source(split) -> StreamingSource | None:
    """The :class:`StreamingSource` of a streamed set (a source, a streamed split, or
    ``{"source": source, ...}``), else None (an in-memory split)."""
    if isinstance(split, StreamingSource):
        return split
    if isinstance(split, dict) or hasattr(split, "get"):
        if isinstance(split.get("source"), StreamingSource):
            return split["source"]
        if isinstance(split.get("x"), SourceArray):
            return split["x"].source
    return None


def materialize(x) -> np.ndarray:
    """``x`` as a numpy array: a :class:`SourceArray` is read completely (every record), anything
    else goes through ``np.asarray``."""
    if isinstance(x, SourceArray):
        return x[:]
    return np.asarray(x)


def global_batch(local: dict, sharding: jax.sharding.Sharding) -> dict:
    """Assemble every process's slice of a batch into global arrays (multi-host input).

    Args:
      local: this process's batch dict (from :meth:`StreamingSource.batches`), leading axis b.
      sharding: the batch sharding, e.g. ``NamedSharding(mesh, PartitionSpec("data"))``.

    Returns:
      The batch as global ``jax.Array`` s of leading size ``b * jax.process_count()``.
    """
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def tfds_streaming_source(name: str, split: str = "train", *, convert: Convert | None = None,
                          data_dir=None, rows=None, size: int | None = None,
                          target: str = "Blond_Hair", sensitive: str = "Male",
                          crop_fraction: float | None = None,
                          download: bool = False) -> StreamingSource:
    """A :class:`StreamingSource` over ``tfds.data_source(name, split=split, data_dir=data_dir)``.

    The converter defaults to the in-memory loader's for ``cifar10``, ``cifar100`` (fine labels)
    and ``celeb_a`` (``size`` required; ``target``/``sensitive``/``crop_fraction`` as
    :func:`~jaxunlearn.data.tfds_loaders.load_celeb_a`); pass ``convert`` for anything else.

    Args:
      name: TFDS name (``"cifar10"``, ``"celeb_a"``, ...), prepared as array_record in
        ``data_dir``.
      split: TFDS split, e.g. ``"train"``, ``"test"`` or ``"train[:10%]"``.
      convert: record -> ``(x, y, group)``.
      data_dir: TFDS data directory (None: TFDS's default).
      rows: optional record rows (default all).
      download: let TFDS download and prepare the data if it is missing.

    Raises:
      MissingDataError: the prepared data is not there.
    """
    from jaxunlearn.data import tfds_loaders as tl

    base = name.split("/")[0]
    if convert is None:
        if base in ("cifar10", "cifar100"):
            convert = tl.cifar_record("label")
        elif base == "celeb_a":
            if size is None:
                raise DataError("celeb_a: pass size= (the output image side)")
            convert = tl.celeb_a_record(target, sensitive, size=size, crop_fraction=crop_fraction)
        else:
            raise DataError(f"no default record converter for {name!r}; pass convert=")
    records = tl._open(name, split, data_dir, download)
    if base == "celeb_a" and hasattr(convert, "labels"):
        attrs = list(records.dataset_info.features["attributes"].keys())
        for role, a in (("target", target), ("sensitive", sensitive)):
            if a not in attrs:
                raise DataError(f"celeb_a: unknown {role} attribute {a!r}; choose one of {attrs}")
    label_records = None
    if hasattr(convert, "labels"):
        import tensorflow_datasets as tfds

        label_records = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                         decoders={"image": tfds.decode.SkipDecoding()})
    return StreamingSource(records, convert, rows=rows, label_records=label_records,
                           name=f"{name}/{split}")
