"""Weighted pure training, batching and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import checkpoint, losses, models, train
from jaxunlearn.data import batch_plan


def _toy(n=203, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] - 0.7 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    return {"x": x, "y": y, "index": np.arange(n, dtype=np.int32)}


def _fit(split, epochs=3, weight=None, model=None, ckpt=None, tx=None):
    model = model or models.mlp(split["x"].shape[1], 1, hidden=(8,))
    tx = tx or optax.sgd(0.1, momentum=0.9)
    state = train.create_train_state(model, tx, jax.random.key(0), split["x"][:1])
    step = train.make_train_step(model.apply, tx, l2=1e-3)
    return train.fit(state, step, split, batch_size=32, epochs=epochs, key=jax.random.key(1),
                     weight=weight, checkpoints=ckpt, progress=False)


def test_weighted_mean_semantics():
    v = jnp.array([1.0, 2.0, 3.0, 4.0])
    assert float(losses.weighted_mean(v, jnp.array([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(1.5)
    # ascent weights: (1/m) sum w v with m = #nonzero
    assert float(losses.weighted_mean(v, jnp.array([1.0, -1.0, 0.0, 0.0]))) == pytest.approx(-0.5)
    assert float(losses.weighted_mean(v, jnp.zeros(4))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        losses.weighted_mean(v, jnp.ones(3))


def test_single_logit_is_two_class_softmax():
    z = jnp.array([[0.3], [-2.0]])
    y = jnp.array([1, 0])
    two = jnp.concatenate([jnp.zeros_like(z), z], axis=1)
    np.testing.assert_allclose(losses.cross_entropy(z, y), losses.cross_entropy(two, y), rtol=1e-6)
    np.testing.assert_allclose(losses.positive_probability(z), jax.nn.sigmoid(z[:, 0]), rtol=1e-6)


def test_batch_plan_pads_with_weight_zero_and_drops_zero_weight():
    w = np.ones(10, np.float32)
    w[[2, 5]] = 0
    idx, bw = batch_plan(10, 4, weight=w)
    assert idx.shape == bw.shape == (2, 4)
    assert sorted(idx[bw != 0].tolist()) == [0, 1, 3, 4, 6, 7, 8, 9]
    assert (bw == 0).sum() == 0  # 8 active samples fill 2 batches exactly
    idx, bw = batch_plan(10, 4)
    assert idx.shape == (3, 4) and (bw == 0).sum() == 2
    with pytest.raises(ValueError, match="weight 0"):
        batch_plan(3, 2, weight=np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        batch_plan(3, 2, weight=np.array([1.0, np.nan, 1.0]))


def test_weight_zero_equals_removal():
    split = _toy()
    removed = [3, 50, 51, 200]
    w = np.ones(len(split["y"]), np.float32)
    w[removed] = 0
    s_weighted, _ = _fit(split, weight=w)
    keep = np.setdiff1d(np.arange(len(split["y"])), removed)
    s_removed, _ = _fit({k: v[keep] for k, v in split.items()})
    for a, b in zip(jax.tree_util.tree_leaves(s_weighted.params), jax.tree_util.tree_leaves(s_removed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weight_zero_equals_removal_with_batchnorm():
    """The padded last batch must not leak into BatchNorm statistics (mask)."""
    import flax.linen as nn

    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, mask=None):
            h = nn.Dense(8)(x)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h, mask=None if mask is None else mask[:, None])
            h = nn.relu(h)
            return nn.Dense(1, name="head")(h), h

    model = models.from_linen(BNNet(), (6,), 1, uses_mask=True)
    split = _toy(n=100)
    w = np.ones(100, np.float32)
    w[[7, 8]] = 0
    a, _ = _fit(split, weight=w, model=model)
    keep = np.setdiff1d(np.arange(100), [7, 8])
    b, _ = _fit({k: v[keep] for k, v in split.items()}, model=model)
    for x, y in zip(jax.tree_util.tree_leaves(a.variables), jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_resume_equals_uninterrupted(tmp_path):
    split = _toy()
    full, hist_full = _fit(split, epochs=4)
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    _fit(split, epochs=2, ckpt=ck)  # "interrupted" after 2 epochs
    assert ck.latest_step() == 2
    resumed, hist = _fit(split, epochs=4, ckpt=checkpoint.Checkpointer(tmp_path / "ck"))
    assert [h["epoch"] for h in hist] == [3, 4]
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(resumed.opt_state[0]).__name__ == type(full.opt_state[0]).__name__


def test_checkpoint_mismatch_is_refused(tmp_path):
    split = _toy()
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    _fit(split, epochs=1, ckpt=ck)
    other = models.mlp(6, 1, hidden=(16,))
    tx = optax.sgd(0.1, momentum=0.9)
    state = train.create_train_state(other, tx, jax.random.key(0), split["x"][:1])
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        checkpoint.Checkpointer(tmp_path / "ck").restore_latest(state)


def test_bad_inputs():
    split = _toy()
    model = models.logistic_regression(6, 1)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        model.init(jax.random.key(0), jnp.ones((2, 5)))
    bad = dict(split, x=split["x"].copy())
    bad["x"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        _fit(bad, epochs=1)
    with pytest.raises(ValueError, match="outside"):
        train.check_labels(np.array([0, 1, 2]), 2)


def test_fit_learns_and_evaluate_streams():
    split = _toy(n=400)
    state, hist = _fit(split, epochs=5)
    model = models.mlp(6, 1, hidden=(8,))
    ev = train.evaluate(model.apply, state.variables, split, batch_size=64)
    assert ev["n"] == 400 and ev["accuracy"] > 0.85
    logits, feats = train.predict(model.apply, state.variables, split["x"], batch_size=64)
    assert logits.shape == (400, 1) and feats.shape == (400, 8)
    acc = np.mean((logits[:, 0] > 0) == split["y"])
    assert acc == pytest.approx(ev["accuracy"])
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_fit_leaves_the_callers_state_usable():
    split = _toy()
    model = models.mlp(6, 1, hidden=(8,))
    tx = optax.sgd(0.1)
    state = train.create_train_state(model, tx, jax.random.key(0), split["x"][:1])
    step = train.make_train_step(model.apply, tx)
    a, _ = train.fit(state, step, split, batch_size=32, epochs=1, key=jax.random.key(1), progress=False)
    b, _ = train.fit(state, step, split, batch_size=32, epochs=1, key=jax.random.key(1), progress=False)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
