"""Data-parallel runs on 8 simulated CPU devices equal single-device runs.

Tolerance: float32, rtol 1e-5 with atol 1e-6 (per-example values are computed identically; means
and HVPs differ only in the order of the cross-device summation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jaxunlearn import losses, models, sharding
from jaxunlearn.influence import grads, hvp as hvp_lib, solvers

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def problem():
    n, d, k = 64, 6, 3
    model = models.mlp(d, k, hidden=(8,))
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(n, d)).astype(np.float32),
             "y": rng.integers(0, k, n).astype(np.int32),
             "weight": np.where(rng.random(n) < 0.2, 0.0, 1.0).astype(np.float32)}
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, d)))["params"]

    def loss_fn(p, b):
        logits, _ = model.apply({"params": p}, b["x"])
        return losses.cross_entropy(logits, b["y"])

    return loss_fn, params, batch


def test_mesh_and_batch_placement():
    assert len(jax.devices()) == 8, "tests/conftest.py should force 8 CPU devices"
    mesh = sharding.data_mesh()
    assert dict(mesh.shape) == {"data": 8} and mesh.axis_types == (AxisType.Auto,)
    batch = {"x": np.arange(24, dtype=np.float32).reshape(12, 2), "y": np.arange(12),
             "weight": np.ones(12, np.float32), "temperature": np.float32(2.0)}
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharding.shard_batch(batch, mesh)
    with pytest.raises(ValueError, match="needs batch\\['weight'\\]"):
        sharding.shard_batch({"x": batch["x"]}, mesh, pad=True)
    with pytest.raises(ValueError, match="leading size"):
        sharding.shard_batch({**batch, "y": np.arange(16)}, mesh)
    out = sharding.shard_batch(batch, mesh, pad=True)
    assert out["x"].shape == (16, 2) and out["x"].sharding.spec == P("data")
    assert out["temperature"].sharding.is_fully_replicated
    np.testing.assert_array_equal(out["weight"], np.r_[np.ones(12), np.zeros(4)])
    np.testing.assert_array_equal(out["x"][12:], np.repeat(batch["x"][:1], 4, axis=0))
    assert [s.data.shape for s in out["y"].addressable_shards] == [(2,)] * 8
    rep = sharding.replicate({"w": np.ones(3)}, mesh)
    assert rep["w"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="not in the mesh axes"):
        sharding.shard_batch(batch, mesh, axis="model")


def test_sharded_gradients_hvps_and_solve_equal_single_device(problem):
    loss_fn, params, batch = problem
    obj = grads.make_mean_objective(loss_fn, l2=1e-2)
    p = grads.flatten_params(params)[0].size
    V = jnp.asarray(np.random.default_rng(1).normal(size=(p, 2)), jnp.float32)

    @jax.jit
    def run(params, batch, V):
        g = grads.mean_grad(loss_fn, params, batch, l2=1e-2)
        matvec = hvp_lib.make_flat_hvp(obj, params, batch)
        return {"per_sample": grads.per_sample_grads_flat(loss_fn, params, batch),
                "per_sample_chunked": grads.per_sample_grads_flat(loss_fn, params, batch, chunk_size=16),
                "mean_grad": grads.flatten_params(g)[0],
                "hvp": matvec(V),
                "hvp_tree": hvp_lib.hvp(obj, params, g, batch, mode="rev_rev"),
                "cg": solvers.solve_cg(matvec, V, damping=0.5, tol=1e-6)}

    dev0 = jax.devices()[0]
    single = run(jax.device_put(params, dev0), jax.device_put(batch, dev0), V)
    mesh = sharding.data_mesh()
    sharded_batch = sharding.shard_batch(batch, mesh)
    sharded = run(sharding.replicate(params, mesh), sharded_batch, sharding.replicate(V, mesh))
    assert sharded_batch["x"].sharding.spec == P("data")
    # per-example results stay split over the devices (no gather of the [n, p] matrix)
    assert sharded["per_sample"].sharding.spec[0] == "data"
    for key in ("per_sample", "per_sample_chunked", "mean_grad", "hvp"):
        np.testing.assert_allclose(sharded[key], single[key], rtol=RTOL, atol=ATOL, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
                 sharded["hvp_tree"], single["hvp_tree"])
    assert bool(sharded["cg"].converged) and bool(single["cg"].converged)
    np.testing.assert_allclose(sharded["cg"].x, single["cg"].x, rtol=1e-4, atol=1e-5)
    # single-device oracle for the reduction itself: the mean over non-padding rows
    per = np.asarray(single["per_sample"])
    w = batch["weight"]
    theta = np.asarray(grads.flatten_params(params)[0])
    mean = (w[:, None] * per).sum(0) / np.count_nonzero(w) + 1e-2 * theta
    np.testing.assert_allclose(sharded["mean_grad"], mean, rtol=1e-4, atol=ATOL)


def test_padding_to_the_mesh_changes_no_mean(problem):
    loss_fn, params, batch = problem
    odd = {k: v[:61] for k, v in batch.items()}  # 61 = 7 * 8 + 5
    mesh = sharding.data_mesh()
    padded = sharding.shard_batch(odd, mesh, pad=True)
    assert padded["x"].shape[0] == 64
    obj = grads.make_mean_objective(loss_fn)
    f = jax.jit(lambda params, b: (grads.flatten_params(grads.mean_grad(loss_fn, params, b))[0],
                                   grads.flatten_params(hvp_lib.hvp(obj, params, params, b))[0]))
    got = f(sharding.replicate(params, mesh), padded)
    ref = f(params, jax.device_put(odd, jax.devices()[0]))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
