"""Weighted pure training (the train method through loop.run), batching, evaluation, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import checkpoint, evaluation, loop, losses, methods, models
from jaxunlearn.data import batch_plan


def _toy(n=203, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] - 0.7 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    return {"x": x, "y": y, "index": np.arange(n, dtype=np.int32)}


def _fit(split, epochs=3, weight=None, model=None, ckpt=None, tx=None):
    """``(variables, state, history)`` of the train method on ``split`` (weights in the set)."""
    model = model or models.mlp(split["x"].shape[1], 1, hidden=(8,))
    tx = tx or optax.sgd(0.1, momentum=0.9)
    variables = model.init(jax.random.key(0), split["x"][:1])
    split = split if weight is None else {**split, "weight": weight}
    return loop.run(methods.train(model.apply, tx, l2=1e-3), variables, {"train": split},
                    batch_size=32, epochs=epochs, key=jax.random.key(1), checkpoints=ckpt,
                    progress=False)


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
    s_weighted, _, _ = _fit(split, weight=w)
    keep = np.setdiff1d(np.arange(len(split["y"])), removed)
    s_removed, _, _ = _fit({k: v[keep] for k, v in split.items()})
    for a, b in zip(jax.tree_util.tree_leaves(s_weighted), jax.tree_util.tree_leaves(s_removed)):
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
    a, _, _ = _fit(split, weight=w, model=model)
    keep = np.setdiff1d(np.arange(100), [7, 8])
    b, _, _ = _fit({k: v[keep] for k, v in split.items()}, model=model)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_resume_equals_uninterrupted(tmp_path):
    split = _toy()
    full, full_state, hist_full = _fit(split, epochs=4)
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    _fit(split, epochs=2, ckpt=ck)  # "interrupted" after 2 epochs
    assert ck.latest_step() == 2
    resumed, state, hist = _fit(split, epochs=4, ckpt=checkpoint.Checkpointer(tmp_path / "ck"))
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]    # finished epochs' history kept
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist_full]
    for a, b in zip(jax.tree_util.tree_leaves((full, full_state)), jax.tree_util.tree_leaves((resumed, state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(state.opt_state[0]).__name__ == type(full_state.opt_state[0]).__name__


def test_checkpoint_mismatch_is_refused(tmp_path):
    split = _toy()
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    _fit(split, epochs=1, ckpt=ck)
    other = models.mlp(6, 1, hidden=(16,))
    variables = other.init(jax.random.key(0), split["x"][:1])
    state = methods.train(other.apply, optax.sgd(0.1, momentum=0.9)).init(variables)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        checkpoint.Checkpointer(tmp_path / "ck").restore_latest({"variables": variables, "state": state})


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
        evaluation.check_labels(np.array([0, 1, 2]), 2)


def test_fit_learns_and_evaluate_streams():
    split = _toy(n=400)
    variables, _, hist = _fit(split, epochs=5)
    model = models.mlp(6, 1, hidden=(8,))
    ev = evaluation.evaluate(model.apply, variables, split, batch_size=64)
    assert ev["n"] == 400 and ev["accuracy"] > 0.85
    logits, feats = evaluation.predict(model.apply, variables, split["x"], batch_size=64)
    assert logits.shape == (400, 1) and feats.shape == (400, 8)
    acc = np.mean((logits[:, 0] > 0) == split["y"])
    assert acc == pytest.approx(ev["accuracy"])
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_run_leaves_the_callers_variables_usable():
    split = _toy()
    model = models.mlp(6, 1, hidden=(8,))
    variables = model.init(jax.random.key(0), split["x"][:1])
    program = loop.compile(methods.train(model.apply, optax.sgd(0.1)))
    kw = dict(batch_size=32, epochs=1, key=jax.random.key(1), progress=False)
    a, _, _ = loop.run(program, variables, {"train": split}, **kw)
    b, _, _ = loop.run(program, variables, {"train": split}, **kw)   # the epoch donates its copy only
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_evaluator_metrics_stream_and_merge():
    split = _toy(n=150)
    split["group"] = (split["x"][:, 2] > 0).astype(np.int32)
    model = models.mlp(6, 1, hidden=(8,))
    variables = model.init(jax.random.key(0), split["x"][:1])
    ev = evaluation.evaluator(model.apply, {"acc": evaluation.accuracy(),
                                            "conf": evaluation.confusion(num_classes=2, num_groups=2)},
                              batch_size=64)
    out = ev(variables, split)
    logits, _ = evaluation.predict(model.apply, variables, split["x"])
    pred = (logits[:, 0] > 0).astype(int)
    assert out["acc"]["n"] == 150
    assert out["acc"]["accuracy"] == pytest.approx(np.mean(pred == split["y"]))
    manual = np.zeros((2, 2, 2))
    np.add.at(manual, (split["group"], split["y"], pred), 1)
    np.testing.assert_array_equal(out["conf"], manual)
    # statistics of two halves merge into those of the whole
    halves = [ev.stats(variables, {k: v[s] for k, v in split.items()})
              for s in (slice(0, 70), slice(70, 150))]
    merged = ev.metrics["conf"].merge(halves[0]["conf"], halves[1]["conf"])
    np.testing.assert_array_equal(np.asarray(merged), manual)
    with pytest.raises(ValueError, match="outside the model's classes"):
        ev(variables, {**split, "y": split["y"] + 5})
