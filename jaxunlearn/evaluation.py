"""The one evaluator: streamed, padded, optionally sharded passes of a model over a split.

Every evaluation-time quantity (accuracy and loss, confusion counts, fairness-gap statistics,
predictions) is a :class:`Metric` with sufficient statistics -- ``init``, ``update``, ``merge``,
``finalize``, as :mod:`jaxunlearn.metrics.fairness_gap` defines them -- fed by one forward pass per
batch in eval mode::

    ev = evaluation.evaluator(model.apply, {"acc": evaluation.accuracy()})   # compiles once
    ev(variables, ds.test)            # {"acc": {"accuracy": ..., "loss": ..., "n": ...}}
    ev(other_variables, ds.val)       # same compiled step

Batches are padded with weight-0 rows to a static size (so nothing recompiles); padding rows are
ignored by every statistic. With ``mesh``, each batch is split over the data axis and the
statistics, being sums, are the single-device ones to float rounding. :func:`accumulate` is the
generic streamed reduction the evaluator (and other passes over a split, e.g. the Fisher diagonal)
are built on; :func:`predict` collects per-example outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import losses, sharding
from jaxunlearn.data.batching import batch_plan, split_size
from jaxunlearn.data.streaming import split_source
from jaxunlearn.models.api import as_apply

__all__ = ["Metric", "Evaluator", "evaluator", "evaluate", "accuracy", "confusion", "predict",
           "padded_batches", "accumulate", "check_labels"]


class Metric(NamedTuple):
    """A streamed statistic.

    Attributes:
      init: ``init(outputs) -> stats``; ``outputs`` are the forward outputs of one batch (arrays or
        ``jax.ShapeDtypeStruct``: only shapes are read).
      update: ``update(stats, outputs, batch) -> stats`` (jit-able); ``outputs`` has ``"logits"``,
        ``"features"`` and, for metrics with ``needs_norm``, ``"norm"``.
      finalize: ``finalize(stats) -> result`` (host side).
      merge: ``merge(a, b) -> stats`` of two independently accumulated statistics (default: sum).
      needs_norm: the forward pass must capture normalisation-layer outputs.
    """

    init: Callable[[dict], Any]
    update: Callable[[Any, dict, dict], Any]
    finalize: Callable[[Any], Any]
    merge: Callable[[Any, Any], Any] = lambda a, b: jax.tree.map(jnp.add, a, b)
    needs_norm: bool = False


def check_labels(y, num_classes: int, name: str = "y") -> None:
    """Raise if integer labels are outside [0, num_classes)."""
    y = np.asarray(y)
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        lo, hi = (y.min(), y.max()) if y.size else (None, None)
        raise ValueError(f"{name} has labels in [{lo}, {hi}] (dtype {y.dtype}), outside the "
                         f"model's classes [0, {num_classes}); relabel the data or build the model "
                         f"with num_outputs matching the labels")


def _num_classes(logits_shape) -> int:
    k = int(logits_shape[-1])
    return 2 if k == 1 else k


def accuracy(loss_fn=losses.cross_entropy) -> Metric:
    """``{"accuracy", "loss", "n"}`` over the nonzero-weight samples (each counts once)."""

    def init(outputs):
        del outputs
        return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
                "count": jnp.zeros((), jnp.float32)}

    def update(stats, outputs, batch):
        logits, y = outputs["logits"], batch["y"]
        mask = (batch["weight"] != 0).astype(jnp.float32)
        correct = (jnp.argmax(losses.class_logits(logits), -1) == y).astype(jnp.float32)
        loss_sum, count = losses.weighted_sum_and_count(loss_fn(logits, y).astype(jnp.float32), mask)
        return {"loss": stats["loss"] + loss_sum, "correct": stats["correct"] + jnp.sum(correct * mask),
                "count": stats["count"] + count}

    def finalize(stats):
        n = float(stats["count"])
        if n == 0:
            raise ValueError("no sample with a nonzero weight was evaluated")
        return {"accuracy": float(stats["correct"]) / n, "loss": float(stats["loss"]) / n, "n": int(n)}

    return Metric(init, update, finalize)


def confusion(*, num_classes: int, num_groups: int | None = None) -> Metric:
    """Confusion counts [G, K, K] (float64 numpy after finalize), for every ``*_from_counts``
    function of :mod:`jaxunlearn.metrics.classification`; ``num_groups=None``: one group."""
    from jaxunlearn.metrics.classification import confusion_counts

    g_count = 1 if num_groups is None else int(num_groups)

    def init(outputs):
        del outputs
        return jnp.zeros((g_count, num_classes, num_classes), jnp.float32)

    def update(stats, outputs, batch):
        group = batch["group"] if num_groups is not None else jnp.zeros_like(batch["y"])
        return stats + confusion_counts(outputs["logits"], batch["y"], group=group,
                                        weight=batch["weight"], num_classes=num_classes,
                                        num_groups=g_count)

    return Metric(init, update, lambda s: np.asarray(s, np.float64))


def padded_batches(split: Mapping, batch_size: int, *, multiple: int = 1,
                   keys=("x", "y", "group", "index")) -> Iterator[dict]:
    """Numpy batches of ``split`` in order, each of ``batch_size`` rows (rounded up to ``multiple``),
    the last padded with weight-0 copies; ``split["weight"]`` (if any) is carried, 0 rows skipped.

    A streamed split (``x`` a :class:`~jaxunlearn.data.streaming.SourceArray`) is read from disk
    batch by batch with grain (:meth:`~jaxunlearn.data.StreamingSource.batches`). Every process
    reads whole batches (evaluation batches are placed as replicated host values, unlike the
    per-process slices of :func:`jaxunlearn.loop.run`)."""
    n = split_size(split)
    b = -(-min(int(batch_size), max(n, 1)) // multiple) * multiple
    weight = split.get("weight")
    index, bw = batch_plan(n, b, weight=None if weight is None else np.asarray(weight, np.float32),
                           name="the evaluated split (e.g. an empty forget or retain set)")
    source = split_source(split)
    if source is not None:
        for batch in source.batches(index, bw, process_index=0, process_count=1):
            yield {k: batch[k] for k in (*keys, "weight") if k in batch}
        return
    cols = {k: np.asarray(split[k]) for k in keys if split.get(k) is not None}
    for i in range(index.shape[0]):
        batch = {k: v[index[i]] for k, v in cols.items()}
        batch["weight"] = bw[i]
        yield batch


def _placer(mesh: Mesh | None, axis: str | None):
    if mesh is None:
        return lambda batch: batch
    spec = NamedSharding(mesh, P(sharding.data_axis(mesh, axis)))
    return lambda batch: jax.device_put(batch, spec)


def _multiple(mesh: Mesh | None, axis: str | None) -> int:
    if mesh is None:
        return 1
    return int(mesh.shape[sharding.data_axis(mesh, axis)])


def accumulate(step: Callable, stats, args, split: Mapping, *, batch_size: int,
               mesh: Mesh | None = None, axis: str | None = None, keys=("x", "y", "group", "index")):
    """``stats = step(stats, args, batch)`` over the padded batches of ``split``.

    ``step`` is the caller's jitted reduction (so it compiles once per shape); ``args`` are its
    other array arguments (variables, ...). With ``mesh`` each batch is split over the data axis.
    """
    place = _placer(mesh, axis)
    for batch in padded_batches(split, batch_size, multiple=_multiple(mesh, axis), keys=keys):
        stats = step(stats, args, place(batch))
    return stats


class Evaluator(NamedTuple):
    """Compiled evaluation of a fixed set of metrics (from :func:`evaluator`); call it as
    ``ev(variables, split) -> {name: result}``."""

    step: Callable
    forward: Callable
    metrics: Mapping[str, Metric]
    batch_size: int
    mesh: Mesh | None
    axis: str | None

    def stats(self, variables, split: Mapping) -> dict:
        """The unfinalized statistics (merge them across hosts with each metric's ``merge``)."""
        outputs = jax.eval_shape(self.forward, variables, next(padded_batches(split, 1)))
        if "y" in split:
            check_labels(split["y"], _num_classes(outputs["logits"].shape))
        stats = {name: m.init(outputs) for name, m in self.metrics.items()}
        return accumulate(self.step, stats, variables, split, batch_size=self.batch_size,
                          mesh=self.mesh, axis=self.axis)

    def __call__(self, variables, split: Mapping) -> dict:
        stats = self.stats(variables, split)
        return {name: m.finalize(stats[name]) for name, m in self.metrics.items()}


def evaluator(apply_fn, metrics: Mapping[str, Metric], *, batch_size: int = 1024,
              mesh: Mesh | None = None, axis: str | None = None) -> Evaluator:
    """Build (and jit, once) the evaluation of ``metrics`` for a model's ``apply``."""
    if not metrics:
        raise ValueError("evaluator needs at least one metric")
    for name, m in metrics.items():
        if not isinstance(m, Metric):
            raise ValueError(f"metric {name!r} is a {type(m).__name__}, not a jaxunlearn.evaluation.Metric")
    capture = any(m.needs_norm for m in metrics.values())

    def forward(variables, batch):
        kw = {"capture_norm": True} if capture else {}
        logits, aux = as_apply(apply_fn)(variables, batch["x"], train=False, **kw)
        out = {"logits": logits, "features": aux.get("features", logits)}
        if capture:
            out["norm"] = aux.get("norm") or {}
        return out

    def step(stats, variables, batch):
        outputs = forward(variables, batch)
        return {name: m.update(stats[name], outputs, batch) for name, m in metrics.items()}

    return Evaluator(jax.jit(step), forward, dict(metrics), int(batch_size), mesh, axis)


def evaluate(apply_fn, variables, split: Mapping, *, batch_size: int = 1024,
             loss_fn=losses.cross_entropy, mesh: Mesh | None = None) -> dict:
    """Accuracy and mean loss over a split: ``{"accuracy", "loss", "n"}`` (compiles per call; build
    an :func:`evaluator` once to evaluate many models)."""
    ev = evaluator(apply_fn, {"m": accuracy(loss_fn)}, batch_size=batch_size, mesh=mesh)
    return ev(variables, split)["m"]


def _to_host(a) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on every process."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def predict(apply_fn, variables, x, *, batch_size: int = 1024, mesh: Mesh | None = None,
            axis: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, K] and penultimate features [n, F] for inputs ``x`` [n, ...] (eval mode); ``x``
    may be a streamed split's :class:`~jaxunlearn.data.streaming.SourceArray` (read in batches)."""
    if split_source({"x": x}) is None:
        x = np.asarray(x)
    n = x.shape[0]

    @jax.jit
    def forward(variables, xb):
        logits, aux = as_apply(apply_fn)(variables, xb, train=False)
        return logits, aux.get("features", logits)

    place = _placer(mesh, axis)
    logits, feats = [], []
    for batch in padded_batches({"x": x, "y": np.zeros(n, np.int32)}, batch_size,
                                multiple=_multiple(mesh, axis), keys=("x",)):
        lo, fe = forward(variables, place(batch)["x"])
        logits.append(_to_host(lo))
        feats.append(_to_host(fe))
    return np.concatenate(logits)[:n], np.concatenate(feats)[:n]
