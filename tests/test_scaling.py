"""Every method, evaluation statistic, attack and influence stage on 8 devices equals 1 device.

Oracle: the same computation on one device (``loop.run`` without a mesh, or the jitted stage on
device 0). The 8-device run is ``loop.run(..., mesh=sharding.data_mesh())`` (8 simulated CPU
devices, tests/conftest.py): data-parallel, batches split over the ``data`` axis.

Tolerance (float32): for every leaf of the result, ``max |a - b| <= 1e-4 * max |b|`` (relative to
the leaf's scale); integer statistics (confusion counts, sample counts) must be equal. Measured
differences are ~1e-7 relative (cross-device summation order); the problem and the method zoo
are shared with ``python -m experiments.benchmarks.scaling`` (its ``equivalence`` rows).

The FSDP-style option (``sharding.fsdp_shardings`` on a 2 x 4 ``data x model`` mesh) is checked
the same way against the replicated single-device training step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.benchmarks import scaling as SC
from jaxunlearn import attacks, models, sharding
from jaxunlearn import methods as M

REL = SC.REL_TOL


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py should force 8 CPU devices"
    return sharding.data_mesh()


def _assert_equal_runs(name, one, many):
    abs_d, rel_d = SC.tree_diff(many, one)
    assert rel_d <= REL, f"{name}: 8 devices differ from 1 by {abs_d:.3g} (relative {rel_d:.3g})"


def test_every_method_is_covered():
    exported = {"train", "retrain", "finetune", "cf_k", "eu_k", "gradient_ascent", "neggrad_plus",
                "random_labels", "salun", "l1_sparse", "boundary_shrink", "scrub", "bad_teacher",
                "fisher_forgetting", "ntk_forgetting", "influence_unlearning", "miu"}
    names = set(SC.method_cases())
    assert names == set(CASES) and exported <= names
    assert {"retrain_reweighted", "finetune+fairness_gap_penalty"} <= names
    # every Method factory the package exports is in the list above (a new one must be added)
    factories = {n for n, f in vars(M).items()
                 if callable(f) and not isinstance(f, type) and not n.startswith("_")}
    helpers = {"first_pass", "resolve_trainable", "combine_masks", "freeze_outside", "subset_optimizer",
               "apply_updates", "gradient_step", "saliency_mask", "forget_gradient", "neighbour_labels",
               "fisher_diagonal", "retain_gradient", "newton_step_size", "check_miu_estimators",
               "fairness_gap_penalty", "with_fairness_gap_penalty"}
    assert factories - helpers <= exported


CASES = ["train", "retrain", "retrain_reweighted", "finetune", "cf_k", "eu_k", "gradient_ascent",
         "neggrad_plus", "random_labels", "salun", "l1_sparse", "boundary_shrink", "scrub",
         "bad_teacher", "fisher_forgetting", "ntk_forgetting", "influence_unlearning", "miu",
         "finetune+fairness_gap_penalty"]


_ONE_DEVICE = {}


def _one_device(name):
    if name not in _ONE_DEVICE:
        _ONE_DEVICE[name] = SC.run_case(SC.method_cases()[name])
    return _ONE_DEVICE[name]


@pytest.mark.parametrize("name", CASES)
def test_method_on_8_devices_equals_1_device(name, mesh):
    case = SC.method_cases()[name]
    one, h1 = _one_device(name)
    many, h8 = SC.run_case(case, mesh)
    _assert_equal_runs(name, one, many)
    moved = SC.tree_diff(one["params"], case.variables["params"])[0]
    assert moved > 1e-4, f"{name} did not change the parameters: the comparison would be vacuous"
    for r1, r8 in zip(h1, h8):
        for k in r1:
            if k not in ("seconds", "epoch"):
                np.testing.assert_allclose(r8[k], r1[k], rtol=1e-4, atol=1e-6, err_msg=f"{name}: {k}")


def test_loop_on_a_2d_mesh_splits_batches_over_data():
    """``loop.run`` on a ``data x model`` mesh (parameters replicated, batches over ``data``)."""
    mesh2 = sharding.mesh_2d(data=2, model=4)
    one, _ = _one_device("train")
    many, _ = SC.run_case(SC.method_cases()["train"], mesh2)
    _assert_equal_runs("train on 2 x 4", one, many)


def test_evaluation_fairness_gap_and_attacks_on_8_devices(mesh):
    v0 = SC.problem()["v0"]
    one, many = SC.evaluation_outputs(v0), SC.evaluation_outputs(v0, mesh)
    # integer statistics: exactly equal
    np.testing.assert_array_equal(many["confusion"], one["confusion"])
    assert one["confusion"].sum() == 45
    np.testing.assert_array_equal(many["fairness_gap_stats"]["bn"]["count"],
                                  one["fairness_gap_stats"]["bn"]["count"])
    assert many["accuracy"]["accuracy"] == one["accuracy"]["accuracy"]
    assert many["fgsm"] == one["fgsm"] and many["pgd"] == one["pgd"]
    for name in one:
        _assert_equal_runs(name, one[name], many[name])
    # the attacks did something: adversarial accuracy below clean accuracy
    assert one["fgsm"] < one["accuracy"]["accuracy"] and one["pgd"] < one["accuracy"]["accuracy"]


def test_influence_stages_on_8_devices():
    one = SC.influence_stages()
    many = SC.influence_stages(sharding.data_mesh())
    assert set(one) == {"per_sample_grads", "hvp", "cg_solve", "last_layer_scores"}
    for name in one:
        _assert_equal_runs(name, one[name], many[name])


# ----------------------------------------------------------------------------- attacks API

def test_adversarial_evaluator_equals_whole_split_attack():
    """Oracle: one FGSM / PGD call on the whole split (no batching, no padding)."""
    p = SC.problem()
    v0, split = p["v0"], {k: v[:45] for k, v in p["train"].items()}
    x, y = jnp.asarray(split["x"]), jnp.asarray(split["y"])
    want = attacks.adversarial_accuracy(SC.APPLY, v0, x, y, eps=0.3, input_range=(-5.0, 5.0))
    ev = attacks.adversarial_evaluator(SC.APPLY, eps=0.3, input_range=(-5.0, 5.0), batch_size=16)
    got = ev(v0, split)
    assert got["n"] == 45
    np.testing.assert_allclose(got["accuracy"], float(want), atol=1e-7)
    # PGD without random start is deterministic: equal to the whole-split call too
    want = attacks.adversarial_accuracy(SC.APPLY, v0, x, y, eps=0.3, attack="pgd", steps=3,
                                        input_range=(-5.0, 5.0))
    ev = attacks.adversarial_evaluator(SC.APPLY, eps=0.3, attack="pgd", steps=3,
                                       input_range=(-5.0, 5.0), batch_size=16)
    np.testing.assert_allclose(ev(v0, split)["accuracy"], float(want), atol=1e-7)
    with pytest.raises(ValueError, match="attack must be"):
        attacks.adversarial_evaluator(SC.APPLY, eps=0.1, attack="cw")
    with pytest.raises(ValueError, match="larger than the input range"):
        attacks.adversarial_evaluator(SC.APPLY, eps=3.0, input_range=(0.0, 1.0))
    pgd = attacks.adversarial_evaluator(SC.APPLY, eps=0.1, attack="pgd", random_start=True,
                                        input_range=None)
    with pytest.raises(ValueError, match="needs key="):
        pgd(v0, split)


# ----------------------------------------------------------------------------- FSDP

def test_fsdp_spec_rules():
    assert sharding.fsdp_spec((512, 256), 4, min_size=1000) == P("model")          # largest dim
    assert sharding.fsdp_spec((3, 3, 64, 128), 4, min_size=1000) == P(None, None, None, "model")
    assert sharding.fsdp_spec((10, 7), 4, min_size=10) == P()                       # none divisible
    assert sharding.fsdp_spec((256,), 4, min_size=1000) == P()                      # small
    assert sharding.fsdp_spec((), 4, min_size=0) == P()
    assert sharding.fsdp_spec((64, 64), 1, min_size=0) == P()                       # one shard
    mesh = sharding.mesh_2d(data=2, model=4)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.mesh_2d(data=4, model=4)
    with pytest.raises(ValueError, match="not in the mesh axes"):
        sharding.fsdp_shardings({"w": np.ones(4)}, sharding.data_mesh(), axis="model")


def test_fsdp_training_step_equals_replicated():
    """Train steps with large leaves split over ``model`` on a 2 x 4 mesh (batch over ``data``)
    equal the single-device steps; the parameters stay split across the steps."""
    n, d, k = 32, 16, 4
    model = models.mlp(d, k, hidden=(64, 32))
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(n, d)).astype(np.float32), "y": rng.integers(0, k, n).astype(np.int32),
             "weight": np.ones(n, np.float32)}
    v0 = model.init(jax.random.key(0), batch["x"][:1])
    method = M.train(model.apply, optax.adam(1e-2), l2=1e-3)

    def steps(v, s, batch, shard=None):
        for i in range(3):
            v, s, m = method.update(v, s, {"train": batch}, jax.random.key(i))
            if shard is not None:     # keep the FSDP layout across steps (as a loop would)
                v, s = jax.lax.with_sharding_constraint((v, s), shard)
        return v, s, m

    ref_v, _, ref_m = jax.jit(steps)(v0, method.init(v0), jax.device_put(batch, jax.devices()[0]))

    mesh = sharding.mesh_2d(data=2, model=4)
    state = method.init(v0)
    shard = sharding.fsdp_shardings((v0, state), mesh, min_size=512)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_flatten_with_path(shard[0]["params"])[0]}
    assert specs["['dense_0']['kernel']"] == P(None, "model")      # [16, 64]: 1024 elements
    assert specs["['dense_1']['kernel']"] == P("model")            # [64, 32]: 2048 elements
    assert specs["['dense_0']['bias']"] == P()                     # small: replicated
    v, s = sharding.place((v0, state), shard)
    b = sharding.shard_batch(batch, mesh, axis="data")
    assert b["x"].sharding.spec == P("data")
    out_v, _, out_m = jax.jit(lambda v, s, b: steps(v, s, b, shard))(v, s, b)
    assert out_v["params"]["dense_1"]["kernel"].sharding.spec == P("model")
    assert not out_v["params"]["dense_1"]["kernel"].sharding.is_fully_replicated
    _assert_equal_runs("fsdp train", ref_v, out_v)
    np.testing.assert_allclose(out_m["loss"], ref_m["loss"], rtol=1e-5)
    assert SC.tree_diff(ref_v, v0)[0] > 1e-3      # the steps moved the parameters
    # replicated placement on the same mesh gives the same result (FSDP changes layout only)
    rep = NamedSharding(mesh, P())
    out_r, _, _ = jax.jit(steps)(*jax.device_put((v0, state), rep), b)
    _assert_equal_runs("replicated train", out_r, out_v)


def test_miu_tuning_split_over_the_mesh(mesh):
    """``miu(tune_sharding=...)`` splits the estimator tuning over the data axis: same result as
    one device, and each device's compiled update does less work than the replicated one."""
    case = SC.method_cases()["miu"]
    one, _ = _one_device("miu")
    split = case._replace(method=SC.miu_method(SC.problem()["train"],
                                               tune_sharding=NamedSharding(mesh, P("data"))))
    many, _ = SC.run_case(split, mesh)
    _assert_equal_runs("miu (sharded tuning)", one, many)

    def flops(method):
        program = jax.jit(method.init)(case.variables)
        batches = {name: {k: jnp.asarray(v[:16]) for k, v in case.sets[name].items()}
                   for name in ("forget", "retain")}
        for b in batches.values():
            b["weight"] = -jnp.ones(16) if b is batches["forget"] else jnp.ones(16)
            b["pass"] = jnp.zeros(16, jnp.int32)
        rep = NamedSharding(mesh, P())
        args = jax.device_put((case.variables, program, batches, jax.random.key(0)), rep)
        return jax.jit(method.update).lower(*args).compile().cost_analysis()["flops"]

    assert flops(split.method) < flops(case.method)
