"""The one loop: training and every unlearning method run through :func:`run`.

A :class:`~jaxunlearn.methods.Method` (optax-shaped ``init``/``update``) is run over named sets of
samples, e.g. ``{"train": ds.train}`` for training or ``{"forget": ..., "retain": ...}`` (from
:func:`jaxunlearn.weights.unlearning_sets`) for unlearning::

    trainer = methods.train(model.apply, optax.adam(1e-3), l2=1e-4)
    variables, state, history = loop.run(trainer, variables, {"train": ds.train},
                                         epochs=10, batch_size=256, key=key)

**Epochs.** The method's primary set (``"retain"`` when the method reads it, else its first set)
is walked once per epoch in shuffled batches; every other set it reads is *cycled* (a fresh shuffle
per pass, passes restarting every epoch), as the references' ``zip(retain_loader,
cycle(forget_loader))``. Each cycled batch carries ``"pass"`` [B], the index of its pass within the
epoch, and the method state carries ``epoch`` and ``step`` (:class:`~jaxunlearn.methods.MethodState`),
so epoch-dependent methods need nothing else. One-shot methods (IF, Fisher, NTK) take a single
update on every nonzero-weight sample of their sets.

**Weights.** A set's ``"weight"`` column ([n], default 1 where absent, except for ``"forget"``,
which must carry its signed weights eps, see :mod:`jaxunlearn.weights`) is the only carrier of
per-sample weights; it reaches the method as each batch's ``weight``. Weight-0 samples are never
scheduled. ``sampling`` replaces the shuffled pass over the primary set by as many draws with
replacement as it has nonzero-weight samples (De Min et al.'s reweighting sampler).

**Compilation.** The whole epoch is one ``lax.scan`` over a precomputed batch plan, with the data
on device and each batch gathered inside the step. Shapes are static: the last batch of a pass is
padded with weight-0 samples, the epoch with skipped steps up to what a pass over the whole set can
take, cycled batches are widened to a power of two and every batch to a multiple of the mesh's
data-axis size. :func:`compile` jits a method's epoch once; pass the :class:`Program` to
:func:`run` again (a grid of weightings, seeds or epochs) and nothing recompiles. Given a plain
method, :func:`run` compiles it for that call.

**Devices.** With ``mesh`` (a :class:`jax.sharding.Mesh` with a data axis, e.g.
:func:`jaxunlearn.sharding.data_mesh`), variables, state and data are replicated and every batch is
split over the data axis (``NamedSharding``): data-parallel SPMD, equal to the single-device run to
float rounding.

**Resume.** With ``checkpoints`` (:class:`jaxunlearn.checkpoint.Checkpointer`), variables, state
and the history so far are saved after every epoch and a rerun resumes after the last saved epoch,
taking exactly the steps an uninterrupted run would (epoch e's plan comes from ``fold_in(key, e)``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import sharding
from jaxunlearn.data.batching import batch_plan, gather_batch, num_batches, resample_plan, split_size
from jaxunlearn.data.streaming import StreamingSource, global_batch, split_source
from jaxunlearn.evaluation import check_labels
from jaxunlearn.methods.base import Method, MethodState
from jaxunlearn.models.api import as_apply
from jaxunlearn.progress import progress_bar

__all__ = ["Program", "compile", "run", "set_weight", "epoch_plan", "primary_set", "DATA_KEYS"]

DATA_KEYS = ("x", "y", "group", "index")


class Program(NamedTuple):
    """A method with its compiled epoch (from :func:`compile`).

    Attributes:
      method: the :class:`~jaxunlearn.methods.Method`.
      epoch: the jitted ``epoch(variables, state, data, plan, epoch, key)`` (in-memory sets).
      step: the jitted ``step(variables, state, batches, key)`` (streamed sets: one update a call).
      mesh: the mesh it runs on, or None (one device).
      axis: the data axis of ``mesh``.
      layout: ``tree -> shardings`` of ``(variables, state)`` on ``mesh`` (None: replicated),
        e.g. ``functools.partial(sharding.fsdp_shardings, mesh=mesh)``.
    """

    method: Method
    epoch: Callable
    step: Callable
    mesh: Mesh | None
    axis: str | None
    layout: Callable | None = None


def primary_set(method: Method) -> str | None:
    """The set walked once per epoch: ``"retain"`` if the method reads it, else its first set
    (None for a method that reads no set, e.g. Fisher forgetting's noise step)."""
    if not method.uses:
        return None
    return "retain" if "retain" in method.uses else method.uses[0]


def set_weight(split: Mapping, name: str) -> np.ndarray:
    """The [n] float32 weights of set ``name`` (its ``"weight"`` column, checked; default 1).

    Raises:
      ValueError: a forget set without weights, weights of the wrong length, NaN or inf.
    """
    n = len(_source(split)) if _source(split) is not None else split_size(split)
    w = None if isinstance(split, StreamingSource) else split.get("weight")
    if w is None:
        if name == "forget":
            raise ValueError(
                "the forget set has no 'weight': its weights are the signed eps of seed 004 "
                "(-1 = the published method); build the sets with "
                "jaxunlearn.weights.unlearning_sets(train, eps)")
        return np.ones(n, np.float32)
    w = np.asarray(w, np.float32)
    if w.shape != (n,):
        raise ValueError(f"the {name} set's weight has shape {w.shape}, but the set has {n} samples")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"the {name} set's weight contains NaN or inf")
    if not np.any(w):
        raise ValueError(f"every sample of the {name} set has weight 0: the {name} set is empty")
    return w


def _source(split) -> StreamingSource | None:
    """The :class:`~jaxunlearn.data.StreamingSource` of a streamed set (a source, a streamed split
    ``{"x": SourceArray, ...}``, or ``{"source": source, "weight": w}``), else None."""
    return split_source(split)


def _bucket(k: int) -> int:
    """The smallest power of two >= k: sizes that differ a little share one compiled shape."""
    return 1 << max(0, int(k) - 1).bit_length()


def _round_up(k: int, multiple: int) -> int:
    return -(-int(k) // multiple) * multiple


def epoch_plan(key: jax.Array, uses, weights: Mapping[str, np.ndarray], batch_sizes: Mapping[str, int],
               *, primary: str, sampling=None) -> dict:
    """The batch plan of one epoch (numpy): ``{"<set>_index", "<set>_weight": [S, B_set],
    "<set>_pass": [S]}`` for every set in ``uses``, S the number of batches of the primary set.

    The primary set is shuffled with ``key`` itself, pass c of the j-th cycled set with
    ``fold_in(fold_in(key, j + 1), c)``.
    """
    plan = {}
    w = weights[primary]
    if sampling is None:
        idx, bw = batch_plan(w.size, batch_sizes[primary], key=key, weight=w,
                             name=f"the {primary} set")
    else:
        idx, bw = resample_plan(key, sampling, batch_sizes[primary], loss_weight=w)
    plan[f"{primary}_index"], plan[f"{primary}_weight"] = idx, bw
    plan[f"{primary}_pass"] = np.zeros(idx.shape[0], np.int32)
    steps = idx.shape[0]
    for j, name in enumerate(n for n in uses if n != primary):
        w = weights[name]
        k_set = jax.random.fold_in(key, j + 1)
        rows_i, rows_w, passes, c = [], [], [], 0
        while sum(map(len, rows_i)) < steps:
            i, b = batch_plan(w.size, batch_sizes[name], key=jax.random.fold_in(k_set, c), weight=w,
                              name=f"the {name} set")
            rows_i.append(i)
            rows_w.append(b)
            passes.append(np.full(i.shape[0], c, np.int32))
            c += 1
        plan[f"{name}_index"] = np.concatenate(rows_i)[:steps]
        plan[f"{name}_weight"] = np.concatenate(rows_w)[:steps]
        plan[f"{name}_pass"] = np.concatenate(passes)[:steps]
    return plan


def _pad_plan(plan: dict, uses, steps: int, widths: Mapping[str, int]) -> dict:
    """``plan`` padded to ``steps`` rows and ``widths[set]`` columns with weight 0.

    Padded rows are marked inactive (``plan["active"]``) and skipped by the compiled epoch, so an
    optimizer never sees an empty step; padded columns are weight-0 samples, which the weighted
    losses ignore.
    """
    real = plan[f"{uses[0]}_pass"].shape[0] if uses else 1
    if steps < real:
        raise ValueError(f"cannot pad a plan of {real} steps to {steps}")
    out = {"active": np.r_[np.ones(real, bool), np.zeros(steps - real, bool)]}
    for name in uses:
        idx, w, passes = plan[f"{name}_index"], plan[f"{name}_weight"], plan[f"{name}_pass"]
        extra = widths[name] - idx.shape[1]
        if extra > 0:
            idx = np.concatenate([idx, np.repeat(idx[:, :1], extra, 1)], 1)
            w = np.concatenate([w, np.zeros((real, extra), w.dtype)], 1)
        out[f"{name}_index"] = np.concatenate([idx, np.repeat(idx[:1], steps - real, 0)])
        out[f"{name}_weight"] = np.concatenate([w, np.zeros((steps - real, w.shape[1]), w.dtype)])
        out[f"{name}_pass"] = np.concatenate([passes, np.zeros(steps - real, np.int32)])
    return out


def _constrain(batch: dict, mesh: Mesh | None, axis: str | None) -> dict:
    if mesh is None:
        return batch
    spec = NamedSharding(mesh, P(axis))
    return {k: jax.lax.with_sharding_constraint(v, spec) for k, v in batch.items()}


def _keep(carry, layout):
    """Hold ``(variables, state)`` in ``layout`` (FSDP) across the steps of a compiled epoch."""
    return carry if layout is None else jax.lax.with_sharding_constraint(carry, layout(carry))


def _make_epoch(method: Method, mesh: Mesh | None, axis: str | None, layout=None):
    uses, update = tuple(method.uses), method.update

    def epoch_fn(variables, state, data, plan, epoch, key):
        state = state._replace(epoch=epoch)

        def body(carry, row):
            traced = {}

            def step(c):
                batches = {}
                for name in uses:
                    b = gather_batch(data[name], row[f"{name}_index"], row[f"{name}_weight"])
                    b["pass"] = jnp.broadcast_to(row[f"{name}_pass"], b["weight"].shape)
                    batches[name] = _constrain(b, mesh, axis)
                v, s = c
                v, s, metrics = update(v, s, batches, jax.random.fold_in(key, s.step))
                traced["metrics"] = metrics
                return _keep((v, s), layout), metrics

            def skip(c):  # a padding row: nothing moves (metric shapes from step's trace)
                metrics = traced["metrics"] if "metrics" in traced else jax.eval_shape(step, c)[1]
                return c, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

            return jax.lax.cond(row["active"], step, skip, carry)

        (variables, state), metrics = jax.lax.scan(body, (variables, state), plan)
        return variables, state, metrics

    return epoch_fn


def _make_step(method: Method, mesh: Mesh | None, axis: str | None, layout=None):
    update = method.update

    def step_fn(variables, state, batches, key):
        batches = {name: _constrain(b, mesh, axis) for name, b in batches.items()}
        variables, state, metrics = update(variables, state, batches, jax.random.fold_in(key, state.step))
        variables, state = _keep((variables, state), layout)
        return variables, state, metrics

    return step_fn


def compile(method: Method, *, mesh: Mesh | None = None, axis: str | None = None,  # noqa: A001
            layout: Callable | None = None) -> Program:
    """Jit ``method``'s epoch once (on ``mesh``'s ``axis`` when given); reuse it across runs.

    ``layout`` (with ``mesh``): ``tree -> shardings`` of ``(variables, state)``, e.g.
    ``functools.partial(sharding.fsdp_shardings, mesh=mesh)`` for FSDP-style parameters;
    default replicated."""
    if isinstance(method, Program):
        return method
    if not isinstance(method, Method):
        raise ValueError(f"expected a jaxunlearn.methods.Method, got {type(method).__name__}")
    if layout is not None and mesh is None:
        raise ValueError("layout= needs mesh=")
    axis = sharding.data_axis(mesh, axis)
    return Program(method, jax.jit(_make_epoch(method, mesh, axis, layout), donate_argnums=(0, 1)),
                   jax.jit(_make_step(method, mesh, axis, layout), donate_argnums=(0, 1)), mesh, axis,
                   layout)


def _device_sets(sets: Mapping[str, Mapping], uses, mesh: Mesh | None) -> dict:
    """The data columns of every set, on device (replicated on ``mesh``), each array moved once."""
    placed: dict[int, jax.Array] = {}
    put = (lambda a: jax.device_put(a, NamedSharding(mesh, P()))) if mesh is not None else jnp.asarray
    out = {}
    for name in uses:
        split = sets[name]
        n = split_size(split)
        cols = {}
        for k in DATA_KEYS:
            if split.get(k) is None:
                continue
            a = split[k]
            if np.shape(a)[0] != n:
                raise ValueError(f"the {name} set's {k!r} has {np.shape(a)[0]} rows, its 'y' has {n}")
            if id(a) not in placed:
                placed[id(a)] = put(a)
            cols[k] = placed[id(a)]
        if "x" not in cols or "y" not in cols:
            raise ValueError(f"the {name} set needs 'x' and 'y'")
        if jnp.issubdtype(cols["x"].dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(cols["x"]))):
            raise ValueError(f"the {name} set's features contain NaN or inf")
        out[name] = cols
    return out


def _check_sets(method: Method, sets) -> None:
    if not isinstance(sets, Mapping):
        raise ValueError(f"sets must be a dict of named splits, e.g. {{'retain': split}}, got "
                         f"{type(sets).__name__}")
    for name in method.uses:
        if sets.get(name) is None:
            raise ValueError(f"{method.name} reads the {name!r} set; sets has {sorted(sets)}")


def _check_labels(method: Method, variables, sets) -> None:
    """Integer labels of the in-memory sets must be classes of the model (``method.apply_fn``'s
    output size: 1 logit = 2 classes), checked on the host before anything compiles."""
    if method.apply_fn is None:
        return
    k = None
    for name in method.uses:
        split = sets[name]
        if _source(split) is not None or split.get("y") is None or split.get("x") is None:
            continue
        y = np.asarray(split["y"])
        if not np.issubdtype(y.dtype, np.integer):
            continue
        if k is None:
            k = _num_outputs(method.apply_fn, variables, np.shape(split["x"])[1:], split["x"].dtype)
        check_labels(y, k, name=f"the {name} set's 'y'")


_OUTPUTS: dict = {}  # (apply_fn, input shape, dtype, variables' shapes) -> number of classes


def _num_outputs(apply_fn, variables, shape, dtype) -> int:
    """The number of classes of a model (1 logit = 2), traced once per model and input shape, so
    that a grid of runs does not trace the model again for every run."""
    leaves, treedef = jax.tree.flatten(variables)
    key = (apply_fn, tuple(shape), np.dtype(dtype).name, treedef,
           tuple((np.shape(a), np.dtype(a.dtype).name) for a in leaves))
    try:
        if key in _OUTPUTS:
            return _OUTPUTS[key]
    except TypeError:  # an unhashable apply: trace every time
        key = None
    x = jax.ShapeDtypeStruct((1, *shape), dtype)
    logits, _ = jax.eval_shape(lambda v, xb: as_apply(apply_fn)(v, xb, train=False), variables, x)
    k = 2 if int(logits.shape[-1]) == 1 else int(logits.shape[-1])
    if key is not None:
        if len(_OUTPUTS) > 64:
            _OUTPUTS.clear()
        _OUTPUTS[key] = k
    return k


def _widths(method: Method, batch_sizes: dict, primary: str, n_dev: int) -> dict:
    return {name: _round_up(batch_sizes[name] if name == primary else _bucket(batch_sizes[name]), n_dev)
            for name in method.uses}


def run(method: Method | Program, variables, sets: Mapping[str, Mapping], *, epochs: int = 1,
        batch_size: int | None = None, key: jax.Array, batch_sizes: Mapping[str, int] | None = None,
        sampling=None, state: MethodState | None = None, checkpoints=None,
        checkpoint_every: int | None = None, mesh: Mesh | None = None, progress: bool = True,
        desc: str | None = None):
    """Run a method: ``epochs`` passes over its sets, or its single update if it is one-shot.

    Args:
      method: a :class:`~jaxunlearn.methods.Method` or a :class:`Program` from :func:`compile`.
      variables: the model's variables ``{"params": ..., ...}`` (fresh ones for training).
      sets: ``{name: {"x", "y", ("weight", "group", "index")}}`` with every set the method reads;
        a set too large for memory is a :class:`~jaxunlearn.data.StreamingSource` (or
        ``{"source": source, "weight": w}``) and is read from disk batch by batch.
      epochs: number of epochs (one-shot methods: ignored).
      batch_size: batch size of every set (one-shot methods: ignored).
      key: PRNG key; epoch e's plan is drawn from ``fold_in(key, e)`` and each update gets
        ``fold_in(fold_in(fold_in(key, e), 1), state.step)``.
      batch_sizes: per-set batch sizes overriding ``batch_size``, e.g. a forget batch size of
        ``B |D_f| / |D_r|`` to mix the sets in proportion.
      sampling: optional [n] sampling weights of the primary set (module docstring).
      state: a method state to continue from (default ``method.init(variables)``).
      checkpoints: optional :class:`jaxunlearn.checkpoint.Checkpointer` (module docstring).
      checkpoint_every: with streamed sets, also checkpoint every this many steps inside an epoch
        (an interrupted epoch then resumes at the next batch).
      mesh: optional device mesh for data-parallel runs (a :class:`Program` brings its own).
      progress: show a progress bar over epochs.
      desc: progress-bar label (default: the method's name).

    Returns:
      ``(variables, state, history)``; ``history`` has one dict per epoch with ``"epoch"``,
      ``"seconds"`` and the epoch mean of every metric the update reports.

    Raises:
      ValueError: a set the method reads is missing or malformed; bad sizes or weights.
      FloatingPointError: the loss became NaN or inf.
    """
    program = compile(method, mesh=mesh) if not isinstance(method, Program) else method
    if isinstance(method, Program) and mesh is not None and mesh is not method.mesh:
        raise ValueError("the Program was compiled for another mesh; compile(method, mesh=mesh)")
    method, mesh = program.method, program.mesh
    _check_sets(method, sets)
    _check_labels(method, variables, sets)
    weights = {name: set_weight(sets[name], name) for name in method.uses}
    primary = primary_set(method)
    n_dev = 1 if mesh is None else mesh.shape[program.axis]
    if method.one_shot:
        epochs = 1
        sizes = {name: min(w.size, _bucket(np.count_nonzero(w))) for name, w in weights.items()}
        max_steps = 1
    else:
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        sizes = {name: (batch_sizes or {}).get(name, batch_size) for name in method.uses}
        missing = [name for name, b in sizes.items() if b is None]
        if missing:
            raise ValueError(f"no batch size for the {', '.join(missing)} set: pass batch_size=")
        for name, b in sizes.items():
            if int(b) <= 0:
                raise ValueError(f"the {name} batch size must be positive, got {b}")
        sizes = {name: int(b) for name, b in sizes.items()}
        max_steps = num_batches(weights[primary].size, sizes[primary]) if primary else 1
    if sampling is not None:
        sampling = np.asarray(sampling, np.float64)
        if method.one_shot:
            raise ValueError(f"sampling was given but {method.name} is one-shot")
        if sampling.shape != weights[primary].shape:
            raise ValueError(f"sampling has shape {sampling.shape}, the {primary} set has "
                             f"{weights[primary].size} samples")
    widths = _widths(method, sizes, primary, n_dev)

    streamed = [name for name in method.uses if _source(sets[name]) is not None]
    data = None if streamed else _device_sets(sets, method.uses, mesh)
    state = method.init(variables) if state is None else state
    if not isinstance(state, MethodState):
        raise ValueError(f"{method.name}: init must return a jaxunlearn.methods.MethodState, "
                         f"got {type(state).__name__}")
    history, start, start_step, partial = [], 0, 0, []
    if checkpoints is not None:
        restored = checkpoints.restore_latest({"variables": variables, "state": state})
        if restored is not None:
            step, tree = restored
            variables, state = tree["variables"], tree["state"]
            meta = checkpoints.metadata(step) or {}
            history = list(meta.get("history", []))
            start, start_step = int(meta.get("epoch", len(history))), int(meta.get("step", 0))
            partial = list(meta.get("partial", []))
    if mesh is not None:
        layout = program.layout((variables, state)) if program.layout is not None \
            else NamedSharding(mesh, P())
        variables, state = jax.device_put((variables, state), layout)
    # the epoch donates its inputs: copies keep the caller's arrays (and any aliased shard) valid
    variables, state = jax.tree.map(jnp.copy, (variables, state))

    def save(e, step, partial=()):
        # checkpoint numbers increase through the run: epochs done, or with streamed sets (which
        # also checkpoint inside an epoch) the position (epoch, step) as one number
        number = e * (max_steps + 1) + step if streamed else e
        checkpoints.save(number, {"variables": variables, "state": state},
                         metadata={"history": history, "epoch": e, "step": step,
                                   "partial": list(partial)})

    bar = progress_bar(range(start, epochs), desc=desc or method.name, enabled=progress,
                       initial=start, total=epochs)
    for e in bar:
        t0 = time.perf_counter()
        ekey = jax.random.fold_in(key, e)
        if primary is None:
            plan, steps = {}, 1
        else:
            plan = epoch_plan(jax.random.fold_in(ekey, 0), method.uses, weights, sizes,
                              primary=primary, sampling=sampling)
            steps = plan[f"{primary}_pass"].shape[0]
        plan = _pad_plan(plan, method.uses, max(max_steps, steps), widths)
        active = plan["active"]
        if streamed:
            state = state._replace(epoch=jnp.int32(e))
            first = start_step if e == start else 0
            rows = partial if e == start else []
            batches = _stream(sets, method.uses, plan, first, steps, mesh, program.axis)
            for t in range(first, steps):
                variables, state, m = program.step(variables, state, next(batches),
                                                   jax.random.fold_in(ekey, 1))
                rows.append({k: float(v) for k, v in m.items()})
                if checkpoints is not None and checkpoint_every and (t + 1) % checkpoint_every == 0 \
                        and t + 1 < steps:
                    save(e, t + 1, rows)
            metrics = {k: np.asarray([r[k] for r in rows]) for k in (rows[0] if rows else {})}
            active = np.ones(len(rows), bool)
        else:
            variables, state, metrics = program.epoch(variables, state, data, plan, jnp.int32(e),
                                                      jax.random.fold_in(ekey, 1))
        row = {"epoch": e + 1, **{k: float(np.mean(np.asarray(v)[active])) for k, v in metrics.items()}}
        if "loss" in row and not np.isfinite(row["loss"]):
            raise FloatingPointError(f"{method.name} diverged: loss is {row['loss']} in epoch {e + 1}")
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if hasattr(bar, "set_postfix") and "loss" in row:
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if checkpoints is not None:
            save(e + 1, 0)
    return variables, state, history


def _stream(sets, uses, plan: dict, first: int, steps: int, mesh: Mesh | None, axis: str | None):
    """Yield the batches of plan rows ``first .. steps - 1`` (streamed sets read from disk, in-memory
    ones gathered on the host), each process's slice assembled into global arrays on ``mesh``."""
    readers = {}
    for name in uses:
        idx, w = plan[f"{name}_index"][:steps], plan[f"{name}_weight"][:steps]
        src = _source(sets[name])
        if src is not None:
            readers[name] = src.batches(idx, w, start=first)
        else:
            cols = {k: np.asarray(sets[name][k]) for k in DATA_KEYS if sets[name].get(k) is not None}
            readers[name] = (gather_batch(cols, idx[t], w[t]) for t in range(first, steps))
    sharding = NamedSharding(mesh, P(axis)) if mesh is not None else None
    for t in range(first, steps):
        batches = {}
        for name in uses:
            b = dict(next(readers[name]))
            b["pass"] = np.full(b["weight"].shape, plan[f"{name}_pass"][t], np.int32)
            batches[name] = global_batch(b, sharding) if sharding is not None else \
                {k: jnp.asarray(v) for k, v in b.items()}
        yield batches
