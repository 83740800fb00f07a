"""Streaming input (jaxunlearn.data.streaming) over tiny TFDS array_record datasets.

Oracles: the in-memory path (``load_cifar10``/``load_celeb_a`` + ``batch_plan`` + ``gather_batch``)
for the streamed batches, an uninterrupted run for the resumed one, the global batch for the
per-process slices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("grain")

from jaxunlearn import checkpoint  # noqa: E402
from jaxunlearn.data import (DataError, MissingDataError, StreamingLoader, batch_plan,  # noqa: E402
                             gather_batch, global_batch, load_celeb_a, load_cifar10,
                             load_cifar100,
                             resample_plan, take, tfds_streaming_source)

KEYS = ("x", "y", "weight", "group", "index")


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for s, (a, b) in enumerate(zip(got, want)):
        assert set(a) == set(KEYS), set(a)
        for k in KEYS:
            assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, (s, k)
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"batch {s} {k}")


def _in_memory(split, index, weight):
    data = {k: jnp.asarray(split[k]) for k in ("x", "y", "group", "index")}
    return [jax.tree.map(np.asarray, gather_batch(data, jnp.asarray(i), jnp.asarray(w)))
            for i, w in zip(index, weight)]


def _weights(n, seed=0):
    w = np.random.default_rng(seed).uniform(0.5, 2.0, n).astype(np.float32)
    w[::7] = 0.0
    return w


def test_fixtures_read_by_tfds_and_the_in_memory_loaders(tiny_tfds_dir):
    import tensorflow_datasets as tfds

    src = tfds.data_source("cifar10", split="train", data_dir=tiny_tfds_dir)
    assert len(src) == 96 and src[0]["image"].shape == (32, 32, 3) and src[0]["image"].dtype == np.uint8
    ds = load_cifar10(data_dir=tiny_tfds_dir, progress=False)
    assert ds.train["x"].shape == (96, 32, 32, 3) and ds.val["x"].shape == (24, 32, 32, 3)
    assert ds.class_names[0] == "airplane" and set(np.unique(ds.train["y"])) <= set(range(10))
    # the fixture's class signal: per-class mean colours differ
    means = [ds.train["x"][ds.train["y"] == c].mean((0, 1, 2)) for c in np.unique(ds.train["y"])]
    assert np.ptp(np.stack(means), axis=0).max() > 0.2

    c100 = load_cifar100(data_dir=tiny_tfds_dir, label="coarse", progress=False)
    assert c100.num_classes == 20 and c100.train["x"].shape == (96, 32, 32, 3)

    celeb = tfds.data_source("celeb_a", split="validation", data_dir=tiny_tfds_dir)
    assert celeb[0]["image"].shape == (218, 178, 3) and len(celeb[0]["attributes"]) == 40
    c = load_celeb_a(size=32, data_dir=tiny_tfds_dir, progress=False)
    assert c.train["x"].shape == (64, 32, 32, 3) and c.val["x"].shape == (32, 32, 32, 3)
    assert {0, 1} == set(np.unique(c.train["y"])) == set(np.unique(c.train["group"]))


def test_streamed_batches_equal_in_memory_batches(tiny_tfds_dir):
    mem = load_cifar10(data_dir=tiny_tfds_dir, progress=False).train
    src = tfds_streaming_source("cifar10", "train", data_dir=tiny_tfds_dir)
    w = _weights(len(src))
    key = jax.random.key(3)
    loader = StreamingLoader(src, 16, key=key, weight=w, num_threads=2)
    for e in range(2):
        index, bw = batch_plan(len(src), 16, key=jax.random.fold_in(jax.random.fold_in(key, e), 0),
                               weight=w)
        streamed = list(loader.epoch(e))
        _assert_batches_equal(streamed, _in_memory(mem, index, bw))
        rows = np.concatenate([b["index"][b["weight"] > 0] for b in streamed])
        np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(w))  # each nonzero once
        assert streamed[-1]["weight"][-1] == 0  # 83 samples in batches of 16: padded
    assert loader.state == {"epoch": 2, "step": 0}


def test_celeb_a_subset_and_resampled_plan_equal_in_memory(tiny_tfds_dir):
    mem = load_celeb_a(size=24, data_dir=tiny_tfds_dir, progress=False).train
    src = tfds_streaming_source("celeb_a", "train", data_dir=tiny_tfds_dir, size=24)
    pos = np.flatnonzero(mem["group"] == 1)  # a forget set on disk: one group
    sub, mem_sub = src.subset(pos), take(mem, pos)
    labels = sub.labels()  # read without decoding images
    for k in ("y", "group", "index"):
        np.testing.assert_array_equal(labels[k], mem_sub[k])
    index, bw = resample_plan(jax.random.key(1), np.where(mem_sub["y"] == 1, 3.0, 1.0), 8)
    _assert_batches_equal(list(sub.batches(index, bw, num_threads=0)), _in_memory(mem_sub, index, bw))
    with pytest.raises(DataError, match="unknown target attribute"):
        tfds_streaming_source("celeb_a", "train", data_dir=tiny_tfds_dir, size=24, target="Blond")


@pytest.mark.parametrize("count", [2, 4])
def test_processes_partition_each_global_batch(tiny_tfds_dir, monkeypatch, count):
    src = tfds_streaming_source("cifar10", "train", data_dir=tiny_tfds_dir)
    index, bw = batch_plan(len(src), 16, key=jax.random.key(0), weight=_weights(len(src)))
    whole = list(src.batches(index, bw, num_threads=0))
    monkeypatch.setattr(jax, "process_count", lambda: count)
    parts = []
    for p in range(count):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        parts.append(list(src.batches(index, bw, num_threads=0)))
        assert all(b["x"].shape[0] == 16 // count for b in parts[-1])
    joined = [{k: np.concatenate([parts[p][s][k] for p in range(count)]) for k in KEYS}
              for s in range(len(whole))]
    _assert_batches_equal(joined, whole)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        src.batches(index, bw)


def _sgd(params, batch):
    def loss(p):
        logits = batch["x"].reshape(batch["x"].shape[0], -1) @ p["w"] + p["b"]
        ll = jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["y"]]
        return -jnp.sum(batch["weight"] * ll) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)

    g = jax.grad(loss)(params)
    return jax.tree.map(lambda p, d: p - 0.1 * d, params, g)


def test_resumed_run_from_checkpoint_equals_uninterrupted(tiny_tfds_dir, tmp_path):
    src = tfds_streaming_source("cifar10", "train", data_dir=tiny_tfds_dir)
    w = _weights(len(src), seed=1)
    make = lambda: StreamingLoader(src, 16, key=jax.random.key(7), weight=w, num_threads=2,
                                   prefetch=3)
    params0 = {"w": jnp.zeros((32 * 32 * 3, 10)), "b": jnp.zeros(10)}
    step = jax.jit(_sgd)
    epochs = 2

    full, params = [], params0
    loader = make()
    for e in range(epochs):
        for batch in loader.epoch(e):
            full.append(batch)
            params = step(params, batch)

    # interrupted after k batches of epoch 1 (the prefetching iterator is abandoned mid-epoch)
    k = 8
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    loader, p, seen, t = make(), params0, [], 0
    for e in range(epochs):
        for batch in loader.epoch(e):
            seen.append(batch)
            p = step(p, batch)
            t += 1
            ck.save(t, p, metadata=loader.state)
            if t == k:
                break
        if t == k:
            break
    ck.close()
    assert loader.state == {"epoch": 1, "step": k - 6}  # 6 batches per epoch

    ck = checkpoint.Checkpointer(tmp_path / "ck")
    t, p = ck.restore_latest(params0)
    loader = make()
    loader.restore(ck.metadata(t))
    for e in range(loader.state["epoch"], epochs):
        for batch in loader.epoch(e):
            seen.append(batch)
            p = step(p, batch)
    _assert_batches_equal(seen, full)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_metadata_optional_and_json_only(tmp_path):
    tree = {"a": np.arange(3.0, dtype=np.float32)}
    with checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=3) as ck:
        ck.save(1, tree)
        ck.save(2, tree, metadata={"epoch": 3, "step": 4})
        assert ck.metadata(1) is None
        assert ck.metadata(2) == {"epoch": 3, "step": 4}
        np.testing.assert_array_equal(ck.restore(1, tree)["a"], tree["a"])
        with pytest.raises(ValueError, match="JSON-able"):
            ck.save(3, tree, metadata={"epoch": np.zeros(2)})
        with pytest.raises(FileNotFoundError):
            ck.metadata(9)
    # a checkpoint written before metadata existed (single unnamed Orbax item) still restores
    import orbax.checkpoint as ocp

    old = ocp.CheckpointManager(tmp_path / "old", options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    old.save(5, args=ocp.args.StandardSave(tree))
    old.wait_until_finished()
    old.close()
    with checkpoint.Checkpointer(tmp_path / "old") as ck:
        step, got = ck.restore_latest(tree)
        assert step == 5 and ck.metadata(5) is None
        np.testing.assert_array_equal(got["a"], tree["a"])
    loader = StreamingLoader.__new__(StreamingLoader)
    with pytest.raises(DataError, match="data iterator state"):
        StreamingLoader.restore(loader, {"epoch": 1})


def test_global_batch_on_eight_devices(tiny_tfds_dir):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    src = tfds_streaming_source("cifar10", "train", data_dir=tiny_tfds_dir)
    index, bw = batch_plan(len(src), 16, key=jax.random.key(0))
    local = next(src.batches(index, bw, num_threads=0))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = global_batch(local, NamedSharding(mesh, PartitionSpec("data")))
    for k in KEYS:
        assert batch[k].shape == local[k].shape and len(batch[k].sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(batch[k]), local[k])


def test_bad_inputs_are_named(tiny_tfds_dir, tmp_path):
    src = tfds_streaming_source("cifar10", "test", data_dir=tiny_tfds_dir)
    index, bw = batch_plan(len(src) + 5, 8)
    with pytest.raises(DataError, match="plan index out of range"):
        src.dataset(index, bw)
    with pytest.raises(DataError, match="weight has shape"):
        StreamingLoader(src, 8, weight=np.ones(3))
    with pytest.raises(DataError, match="positions out of range"):
        src.subset([len(src)])
    with pytest.raises(MissingDataError, match="array_record"):
        tfds_streaming_source("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="pass size="):
        tfds_streaming_source("celeb_a", "train", data_dir=tiny_tfds_dir)


def test_streamed_splits_behave_like_in_memory_splits(tiny_tfds_dir):
    """``load_*(stream=True)``: labels equal the in-memory loader's, ``x`` reads on indexing,
    sub-splits stay streamed, and the evaluator / predict / loop read them batch by batch."""
    import optax

    from experiments import common
    from jaxunlearn import evaluation, loop, methods
    from jaxunlearn.data import forget_retain_splits
    from jaxunlearn.data.streaming import SourceArray, materialize

    mem = load_cifar10(data_dir=tiny_tfds_dir, progress=False)
    ds = load_cifar10(data_dir=tiny_tfds_dir, progress=False, stream=True)
    assert ds.input_shape == mem.input_shape == (32, 32, 3)
    for s in ("train", "val", "test"):
        for k in ("y", "group", "index"):
            np.testing.assert_array_equal(ds[s][k], mem[s][k])
        assert isinstance(ds[s]["x"], SourceArray)
    x = ds.train["x"]
    np.testing.assert_array_equal(x[:3], mem.train["x"][:3])
    np.testing.assert_array_equal(x[5], mem.train["x"][5])
    np.testing.assert_array_equal(x[np.array([7, 2])], mem.train["x"][[7, 2]])
    with pytest.raises(DataError, match="streamed from disk.*materialize"):
        np.asarray(x)
    forget, retain = forget_retain_splits(ds.train, np.arange(0, 96, 3))
    mf, mr = forget_retain_splits(mem.train, np.arange(0, 96, 3))
    assert isinstance(retain["x"], SourceArray) and retain["x"].shape == mr["x"].shape
    np.testing.assert_array_equal(materialize(forget["x"]), mf["x"])

    def apply(variables, x):  # a linear model on the flattened image
        z = x.reshape(x.shape[0], -1)
        return z @ variables["params"]["w"], z

    w0 = jax.random.normal(jax.random.key(0), (32 * 32 * 3, 10)) * 0.01
    v = {"params": {"w": w0}}
    got = evaluation.predict(apply, v, ds.test["x"], batch_size=10)
    want = evaluation.predict(apply, v, mem.test["x"], batch_size=10)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert evaluation.evaluate(apply, v, ds.val, batch_size=10) == \
        evaluation.evaluate(apply, v, mem.val, batch_size=10)
    run = lambda split: loop.run(methods.train(apply, optax.sgd(0.1)), v, {"train": split},
                                 epochs=1, batch_size=16, key=jax.random.key(1), progress=False)[0]
    a, b = run(retain), run(mr)
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="input must be one of"):
        common.check_input("disk", "cifar10")
    with pytest.raises(ValueError, match="'adult' is loaded into memory"):
        common.check_input("stream", "adult")
