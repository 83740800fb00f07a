"""The one loop: plans, weights, compile-once, resume and data-parallel equivalence.

Oracles: hand-written loops over the same plans calling the jitted ``update`` directly, a run on
explicitly subset data, and the single-device run for the 8-device mesh (float32, atol 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import checkpoint, data, evaluation, loop, models, sharding, weights
from jaxunlearn import methods as M

N, D, K = 20, 3, 3


def _data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, K, n).astype(np.int32)


X, Y = _data()
MODEL = models.logistic_regression(D, K)
APPLY = MODEL.apply
V0 = MODEL.init(jax.random.key(0), X[:1])
V1 = jax.tree.map(lambda a: a + 0.3, V0)


def _batch(idx, w, x=X, y=Y):
    return {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx]), "weight": jnp.asarray(w, jnp.float32),
            "index": jnp.asarray(idx, jnp.int32)}


def _close(a, b, atol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol)


def test_epoch_plan_cycles_forget_and_pads():
    w = {"forget": -np.ones(5, np.float32), "retain": np.ones(14, np.float32)}
    plan = loop.epoch_plan(jax.random.key(0), ("forget", "retain"), w, {"retain": 4, "forget": 2},
                           primary="retain")
    assert plan["retain_index"].shape == (4, 4)
    np.testing.assert_array_equal(plan["retain_weight"][-1], [1, 1, 0, 0])   # 14 = 3*4 + 2
    np.testing.assert_array_equal(plan["forget_pass"], [0, 0, 0, 1])         # 5 = 2 + 2 + 1(+pad)
    np.testing.assert_array_equal(plan["forget_weight"][2], [-1, 0])
    first = plan["forget_index"][:3][plan["forget_weight"][:3] != 0]
    np.testing.assert_array_equal(np.sort(first), np.arange(5))
    only_f = loop.epoch_plan(jax.random.key(0), ("forget",), w, {"forget": 2}, primary="forget")
    assert only_f["forget_index"].shape == (3, 2)


def test_run_compiles_once_and_equals_manual_loop():
    traces = []
    ft = M.finetune(APPLY, optimizer=optax.sgd(0.1))

    def counted(variables, state, batches, key):
        traces.append(1)
        out = ft.update(variables, state, batches, key)
        return out[0], out[1], {**out[2], "active": jnp.sum(batches["retain"]["weight"] != 0) * 1.0}

    program = loop.compile(ft._replace(update=counted))
    key = jax.random.key(5)
    out, state, hist = loop.run(program, V1, {"retain": {"x": X[:13], "y": Y[:13]}}, epochs=3,
                                batch_size=5, key=key, progress=False)
    assert len(traces) == 1                       # traced (and compiled) once for 3 epochs
    assert len(hist) == 3 and int(state.step) == 9 and int(state.epoch) == 2
    loop.run(program, V0, {"retain": {"x": X[5:18], "y": Y[5:18]}}, epochs=1, batch_size=5, key=key,
             progress=False)
    assert len(traces) == 1                       # a second run on a set of equal size reuses it
    np.testing.assert_allclose(hist[0]["active"], 13 / 3)   # batches of 5, 5, 3 (+2 padding)
    v, s = V1, ft.init(V1)
    update = jax.jit(ft.update)
    for e in range(3):
        plan = loop.epoch_plan(jax.random.fold_in(jax.random.fold_in(key, e), 0), ("retain",),
                               {"retain": np.ones(13, np.float32)}, {"retain": 5}, primary="retain")
        for i in range(plan["retain_index"].shape[0]):
            v, s, _ = update(v, s, {"retain": _batch(plan["retain_index"][i], plan["retain_weight"][i])},
                             jax.random.key(0))
    _close(out, v)


def test_differently_weighted_runs_share_one_compile_and_skip_padding():
    """Hard and soft weights give sets of other sizes; one compiled epoch serves both, and its
    padding (skipped steps, weight-0 forget columns) leaves Adam's result that of the real steps."""
    traces = []
    ga = M.neggrad_plus(APPLY, alpha=0.9, optimizer=optax.adam(0.05))

    def counted(v, s, b, k):
        traces.append(1)
        return ga.update(v, s, b, k)

    program = loop.compile(ga._replace(update=counted))
    split, key = {"x": X, "y": Y}, jax.random.key(2)
    update = jax.jit(ga.update)
    for eps, fbs in ((np.r_[-np.ones(4), np.zeros(16)], 3), (np.linspace(-0.5, 0.4, 20), 4)):
        sets = weights.unlearning_sets(split, eps)
        out, _, _ = loop.run(program, V1, sets, epochs=2, batch_size=4,
                             batch_sizes={"forget": fbs}, key=key, progress=False)
        v, s = V1, ga.init(V1)
        w = {name: sets[name]["weight"] for name in sets}
        for e in range(2):
            ekey = jax.random.fold_in(key, e)
            plan = loop.epoch_plan(jax.random.fold_in(ekey, 0), ("forget", "retain"), w,
                                   {"retain": 4, "forget": fbs}, primary="retain")
            s = s._replace(epoch=jnp.int32(e))
            for i in range(plan["retain_pass"].shape[0]):
                fb = _batch(plan["forget_index"][i], plan["forget_weight"][i])
                fb["pass"] = jnp.full(fb["weight"].shape, plan["forget_pass"][i])
                b = {"forget": fb, "retain": _batch(plan["retain_index"][i], plan["retain_weight"][i])}
                v, s, _ = update(v, s, b, jax.random.fold_in(jax.random.fold_in(ekey, 1), s.step))
        _close(out, v)
    assert len(traces) == 1   # 4 vs 5 retain steps, forget batches of 3 (padded to 4) and 4


def test_unlearning_sets_hard_weights_equal_plain_sets():
    # The SW code path with hard eps gives exactly the run on D_f / D_r as separate sets.
    eps = weights.removal_eps(N, [1, 4, 7, 11])
    sets = weights.unlearning_sets({"x": X, "y": Y}, eps)
    np.testing.assert_array_equal(sets["forget"]["weight"], eps)
    np.testing.assert_array_equal(sets["retain"]["weight"], 1 + eps)
    assert sets["forget"]["x"] is sets["retain"]["x"]          # shared, not copied
    keep = eps == 0
    kw = dict(epochs=2, batch_size=4, key=jax.random.key(1), progress=False)
    method = M.neggrad_plus(APPLY, alpha=0.8, optimizer=optax.sgd(0.1))
    va, _, _ = loop.run(method, V1, sets, **kw)
    vb, _, _ = loop.run(method, V1, {"forget": {"x": X[~keep], "y": Y[~keep], "weight": -np.ones(4)},
                                     "retain": {"x": X[keep], "y": Y[keep]}}, **kw)
    _close(va, vb, atol=1e-6)
    with pytest.raises(ValueError, match="eps has shape"):
        weights.unlearning_sets({"x": X, "y": Y}, eps[:-1])
    with pytest.raises(ValueError, match="forget set is empty"):
        weights.unlearning_sets({"x": X, "y": Y}, np.zeros(N))
    with pytest.raises(ValueError, match="nothing is left to retain"):
        weights.unlearning_sets({"x": X, "y": Y}, -np.ones(N))
    soft = np.linspace(-0.5, 0.5, N)
    neg = weights.unlearning_sets({"x": X, "y": Y}, soft, negative_only=True)
    np.testing.assert_allclose(neg["forget"]["weight"], np.minimum(soft, 0), atol=1e-7)
    np.testing.assert_allclose(neg["retain"]["weight"], 1 + soft, atol=1e-7)


def test_training_is_a_method_and_equals_hand_sgd():
    tx = optax.sgd(0.2)
    trainer = M.train(APPLY, tx, l2=0.01)
    key = jax.random.key(4)
    out, state, hist = loop.run(trainer, V0, {"train": {"x": X, "y": Y}}, epochs=2, batch_size=8,
                                key=key, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2] and {"loss", "accuracy", "seconds"} <= set(hist[0])
    W, b = (np.asarray(V0["params"]["head"][k], np.float64) for k in ("kernel", "bias"))
    for e in range(2):
        index, bw = data.batch_plan(N, 8, key=jax.random.fold_in(jax.random.fold_in(key, e), 0))
        for i in range(index.shape[0]):
            keep = bw[i] != 0
            x, y = X[index[i]][keep].astype(np.float64), Y[index[i]][keep]
            z = x @ W + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            dz = (p - np.eye(K)[y]) / len(y)
            W, b = W - 0.2 * (x.T @ dz + 0.01 * W), b - 0.2 * (dz.sum(0) + 0.01 * b)
    np.testing.assert_allclose(out["params"]["head"]["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(out["params"]["head"]["bias"], b, atol=1e-5)


def test_retrain_with_sampler_matches_manual_loop():
    sw = weights.group_weights(Y, (X[:, 0] > 0).astype(np.int64), np.arange(N) >= 4)
    tx = optax.sgd(0.1)
    key = jax.random.key(3)
    out, _, hist = loop.run(M.retrain(APPLY, tx), V0, {"retain": {"x": X, "y": Y}}, epochs=2,
                            batch_size=6, key=key, sampling=sw, progress=False)
    trainer = M.retrain(APPLY, tx)
    v, s = V0, trainer.init(V0)
    step = jax.jit(trainer.update)
    for e in range(2):
        index, bw = data.resample_plan(jax.random.fold_in(jax.random.fold_in(key, e), 0), sw, 6)
        assert np.all(sw[index[bw != 0]] > 0) and np.count_nonzero(bw) == 16
        for i in range(index.shape[0]):
            v, s, _ = step(v, s, {"retain": _batch(index[i], bw[i])}, None)
    _close(out, v)
    assert len(hist) == 2
    with pytest.raises(ValueError, match="sampling has shape"):
        loop.run(M.retrain(APPLY, tx), V0, {"retain": {"x": X, "y": Y}}, epochs=1, batch_size=6,
                 key=key, sampling=sw[:5], progress=False)


def test_run_resumes_from_checkpoint_bit_identically(tmp_path):
    sw = weights.group_weights(Y, (X[:, 0] > 0).astype(np.int64), np.arange(N) >= 4)
    program = loop.compile(M.retrain(APPLY, optax.adam(0.05)))
    kw = dict(batch_size=6, key=jax.random.key(3), sampling=sw, progress=False)
    sets = {"retain": {"x": X, "y": Y}}
    full, _, full_hist = loop.run(program, V0, sets, epochs=4, **kw)
    loop.run(program, V0, sets, epochs=2, checkpoints=checkpoint.Checkpointer(tmp_path / "ck"), **kw)
    resumed, _, hist = loop.run(program, V0, sets, epochs=4,
                                checkpoints=checkpoint.Checkpointer(tmp_path / "ck"), **kw)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]       # the history of finished epochs kept
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in full_hist], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_shot_methods_take_one_update_on_every_nonzero_sample():
    seen = []
    ft = M.finetune(APPLY, optimizer=optax.sgd(0.1))

    def record(v, s, b, k):
        seen.append(b["retain"]["weight"].shape)
        return ft.update(v, s, b, k)

    one = ft._replace(update=record, one_shot=True)
    w = np.r_[np.zeros(7), np.ones(13)].astype(np.float32)
    out, state, hist = loop.run(one, V1, {"retain": {"x": X, "y": Y, "weight": w}}, epochs=5,
                                batch_size=2, key=jax.random.key(0), progress=False)
    assert seen == [(16,)] and len(hist) == 1 and int(state.step) == 1   # 13 rows padded to 16
    ref, _, _ = jax.jit(ft.update)(V1, ft.init(V1), {"retain": _batch(np.arange(7, 20), np.ones(13))}, None)
    _close(out, ref)


def test_bad_sets_are_rejected_with_clear_errors():
    ft = M.finetune(APPLY)
    kw = dict(epochs=1, batch_size=4, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="sets must be a dict"):
        loop.run(ft, V0, {"x": X, "y": Y}.items(), **kw)
    with pytest.raises(ValueError, match="retain set's weight contains NaN"):
        loop.run(ft, V0, {"retain": {"x": X, "y": Y, "weight": np.full(N, np.nan)}}, **kw)
    with pytest.raises(ValueError, match="every sample of the retain set has weight 0"):
        loop.run(ft, V0, {"retain": {"x": X, "y": Y, "weight": np.zeros(N)}}, **kw)
    with pytest.raises(ValueError, match="features contain NaN"):
        loop.run(ft, V0, {"retain": {"x": np.full_like(X, np.nan), "y": Y}}, **kw)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        loop.run(ft, V0, {"retain": {"x": X, "y": Y}}, **{**kw, "epochs": 0})
    with pytest.raises(ValueError, match="no batch size"):
        loop.run(ft, V0, {"retain": {"x": X, "y": Y}}, epochs=1, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="expected a jaxunlearn.methods.Method"):
        loop.run(lambda v: v, V0, {"retain": {"x": X, "y": Y}}, **kw)


def test_mesh_run_equals_single_device():
    mesh = sharding.data_mesh()
    assert mesh.shape["data"] == 8
    eps = weights.removal_eps(N, [0, 3, 5, 9])
    sets = weights.unlearning_sets({"x": X, "y": Y}, eps)
    kw = dict(epochs=2, batch_size=8, batch_sizes={"forget": 4}, key=jax.random.key(1), progress=False)
    for method in (M.neggrad_plus(APPLY, optimizer=optax.adam(0.05)),
                   M.scrub(APPLY, optimizer=optax.sgd(0.1), max_epochs=1),
                   M.random_labels(APPLY, optimizer=optax.sgd(0.1))):
        one, _, h1 = loop.run(method, V1, sets, **kw)
        many, _, h8 = loop.run(method, V1, sets, mesh=mesh, **kw)
        _close(one, many, atol=1e-5)
        np.testing.assert_allclose(h1[-1]["loss"], h8[-1]["loss"], rtol=1e-5)
    ev1 = evaluation.evaluator(APPLY, {"acc": evaluation.accuracy()}, batch_size=8)
    ev8 = evaluation.evaluator(APPLY, {"acc": evaluation.accuracy()}, batch_size=8, mesh=mesh)
    r1, r8 = ev1(V1, {"x": X, "y": Y})["acc"], ev8(V1, {"x": X, "y": Y})["acc"]
    assert r1["n"] == r8["n"] == N and r1["accuracy"] == r8["accuracy"]
    np.testing.assert_allclose(r1["loss"], r8["loss"], rtol=1e-6)


def _source(x, y):
    """A streamed set over in-memory records (the loop reads it batch by batch, as from disk)."""
    records = [{"x": x[i], "y": int(y[i])} for i in range(len(y))]
    return data.StreamingSource(records, lambda r: (r["x"], r["y"], 0), name="toy")


def test_streamed_sets_equal_in_memory_and_resume_inside_an_epoch(tmp_path):
    eps = weights.removal_eps(N, [0, 3, 5, 9, 12])
    mem = weights.unlearning_sets({"x": X, "y": Y}, eps)
    src = _source(X, Y)
    streamed = {"forget": {"source": src, "weight": mem["forget"]["weight"]},
                "retain": {"source": src, "weight": mem["retain"]["weight"]}}
    method = M.neggrad_plus(APPLY, optimizer=optax.adam(0.05))
    kw = dict(epochs=3, batch_size=4, batch_sizes={"forget": 2}, key=jax.random.key(1), progress=False)
    a, _, ha = loop.run(method, V1, mem, **kw)
    program = loop.compile(method)
    b, _, hb = loop.run(program, V1, streamed, **kw)
    _close(a, b, atol=1e-6)
    np.testing.assert_allclose([h["loss"] for h in ha], [h["loss"] for h in hb], rtol=1e-5)

    class Interrupt(Exception):
        pass

    class Dying(checkpoint.Checkpointer):
        saves = 0

        def save(self, *args, **kwargs):
            super().save(*args, **kwargs)
            Dying.saves += 1
            if Dying.saves == 3:          # killed after the 3rd checkpoint, inside epoch 2
                raise Interrupt

    with pytest.raises(Interrupt):
        loop.run(program, V1, streamed, checkpoints=Dying(tmp_path / "ck"), checkpoint_every=2, **kw)
    meta = checkpoint.Checkpointer(tmp_path / "ck").metadata(
        checkpoint.Checkpointer(tmp_path / "ck").latest_step())
    assert meta["step"] > 0                                          # stopped inside an epoch
    c, _, hc = loop.run(program, V1, streamed, checkpoints=checkpoint.Checkpointer(tmp_path / "ck"),
                        checkpoint_every=2, **kw)
    for u, v in zip(jax.tree.leaves(b), jax.tree.leaves(c)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_allclose([h["loss"] for h in hc], [h["loss"] for h in hb], rtol=1e-6)


def test_streamed_run_on_a_mesh_equals_single_device():
    mesh = sharding.data_mesh()
    src = _source(X, Y)
    trainer = M.train(APPLY, optax.sgd(0.1), l2=0.01)
    kw = dict(epochs=2, batch_size=8, key=jax.random.key(2), progress=False)
    one, _, _ = loop.run(trainer, V0, {"train": {"x": X, "y": Y}}, **kw)
    many, _, _ = loop.run(trainer, V0, {"train": src}, mesh=mesh, **kw)
    _close(one, many, atol=1e-6)


def test_fsdp_layout_through_the_loop_equals_single_device():
    import functools

    mesh = sharding.mesh_2d(data=2, model=4)
    model = models.mlp(D, K, hidden=(16,))
    v0 = model.init(jax.random.key(0), X[:1])
    trainer = M.train(model.apply, optax.adam(0.05))
    kw = dict(epochs=2, batch_size=8, key=jax.random.key(3), progress=False)
    one, _, _ = loop.run(trainer, v0, {"train": {"x": X, "y": Y}}, **kw)
    layout = functools.partial(sharding.fsdp_shardings, mesh=mesh, min_size=16)
    program = loop.compile(trainer, mesh=mesh, layout=layout)
    many, state, _ = loop.run(program, v0, {"train": {"x": X, "y": Y}}, **kw)
    _close(one, many, atol=1e-5)
    kernel = many["params"]["dense_0"]["kernel"]                  # [3, 16]: split over "model"
    assert not kernel.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="layout= needs mesh="):
        loop.compile(trainer, layout=layout)


def test_preparatory_passes_on_a_mesh_equal_single_device():
    mesh = sharding.data_mesh()
    split = {"x": X, "y": Y}
    f1 = M.fisher_diagonal(APPLY, V1, split, batch_size=8)
    f8 = M.fisher_diagonal(APPLY, V1, split, batch_size=8, mesh=mesh)
    _close(f1, f8, atol=1e-6)
    g1 = M.retain_gradient(APPLY, V1, split, l2=0.1)
    g8 = M.retain_gradient(APPLY, V1, split, l2=0.1, mesh=mesh)
    _close(g1, g8, atol=1e-6)
    forget = {"x": X[:8], "y": Y[:8], "weight": -np.ones(8, np.float32)}
    _close(M.forget_gradient(APPLY, V1, forget), M.forget_gradient(APPLY, V1, forget, mesh=mesh),
           atol=1e-5)
