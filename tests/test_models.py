"""Models: shapes, norm-layer capture, BatchNorm masking, partition helpers, NNX adapter.

Kept fast on a loaded 2-core CPU: shape checks go through ``jax.eval_shape`` (nothing compiles),
numeric checks use variables filled by numpy from the abstract ``init`` (XLA:CPU compiles
threefry-based initialisers slowly) and one jitted apply per model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxunlearn import methods, models, subsets
from jaxunlearn.models import partition as P

B, K, W = 4, 10, 4  # batch, classes, ResNet width
VIT = dict(patch_size=2, depth=2, width=16, heads=2, mlp_dim=32)


def _abstract(model, x):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))


def _fake_variables(model, x, seed=0):
    """Variables with init's structure, filled by numpy (weights ~ N(0, 0.3^2), BN var = 1)."""
    rng = np.random.RandomState(seed)

    def fill(path, s):
        name = str(path[-1].key)
        if name == "var":
            return jnp.ones(s.shape, s.dtype)
        if name == "mean":
            return jnp.zeros(s.shape, s.dtype)
        if name == "scale":  # keep norm scales away from 0
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, _abstract(model, x))


def _images(n, hw=8, c=1, seed=0):
    return jnp.asarray(np.random.RandomState(seed).standard_normal((n, hw, hw, c)), jnp.float32)


def _count(tree, mask=None):
    leaves = jax.tree.leaves(tree)
    keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
    return sum(int(np.prod(np.shape(x))) for x, m in zip(leaves, keep) if m)


def _expected_resnet_norms(stage_sizes, bottleneck, cifar_stem_w=W):
    """Norm-layer names in call order, derived from the architecture (not from the code)."""
    names = ["stem/bn"]
    in_ch = cifar_stem_w
    for s, n in enumerate(stage_sizes):
        out = cifar_stem_w * 2 ** s * (4 if bottleneck else 1)
        for b in range(n):
            blk = f"stage{s + 1}_block{b + 1}"
            names += [f"{blk}/bn{i}" for i in range(1, 4 if bottleneck else 3)]
            if in_ch != out or (s > 0 and b == 0):
                names.append(f"{blk}/proj_bn")
            in_ch = out
    return names


# ---------------------------------------------------------------------------------------------
# Shapes (no compilation)

@pytest.mark.parametrize("name, make, x_shape, feat_dim", [
    ("lr", lambda: models.logistic_regression(64, K), (B, 64), 64),
    ("mlp", lambda: models.mlp(64, K, hidden=(16, 8)), (B, 64), 8),
    ("resnet18", lambda: models.resnet18((8, 8, 1), K, width=W), (B, 8, 8, 1), 8 * W),
    ("resnet18_imagenet", lambda: models.resnet18((64, 64, 3), K, width=W), (B, 64, 64, 3), 8 * W),
    ("vit_cls", lambda: models.small_vit((8, 8, 1), K, **VIT), (B, 8, 8, 1), 16),
    ("vit_mean", lambda: models.small_vit((8, 8, 1), K, pool="mean", **VIT), (B, 8, 8, 1), 16),
])
def test_output_shapes(name, make, x_shape, feat_dim):
    model = make()
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    v = _abstract(model, x)
    for train_mode in (False, True):
        logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=train_mode), v, x)
        assert logits.shape == (B, K) and logits.dtype == jnp.float32
        assert aux["features"].shape == (B, feat_dim)
    head, body = P.split_head(v["params"])
    assert head["kernel"].shape == (feat_dim, K)
    assert "head" not in body


def test_resnet50_shapes_and_norm_layers():
    model = models.resnet50((8, 8, 3), K, width=W)
    x = jax.ShapeDtypeStruct((B, 8, 8, 3), jnp.float32)
    v = _abstract(model, x)
    logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    assert logits.shape == (B, K) and aux["features"].shape == (B, 32 * W)
    assert P.split_head(v["params"])[0]["kernel"].shape == (32 * W, K)
    names = P.norm_layer_names(model, v, x)
    expected = _expected_resnet_norms((3, 4, 6, 3), True)
    assert len(expected) == 1 + 3 * 16 + 4 == 53
    assert names == expected
    logits, aux = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mask=jnp.ones(B, bool), capture_norm=True), v, x)
    assert logits.shape == (B, K) and aux["features"].shape == (B, 32 * W)
    norm = aux["norm"]
    assert norm["stem/bn"].shape == (B, 8, 8, W)
    assert norm["stage1_block1/proj_bn"].shape == (B, 8, 8, 4 * W)
    assert norm["stage4_block3/bn2"].shape == (B, 1, 1, 8 * W)
    assert norm["stage4_block3/bn3"].shape == (B, 1, 1, 32 * W)
    # batch_stats: one (mean, var) pair per BatchNorm
    assert len(jax.tree.leaves(v["batch_stats"])) == 2 * 53


def test_vit_norm_names_stay_in_call_order_past_block9():
    model = models.small_vit((4, 4, 1), 3, patch_size=2, depth=11, width=8, heads=2, mlp_dim=8)
    x = jax.ShapeDtypeStruct((2, 4, 4, 1), jnp.float32)
    names = P.norm_layer_names(model, _abstract(model, x), x)
    assert names == [f"block{i}/ln{j}" for i in range(1, 12) for j in (1, 2)] + ["head_norm"]
    assert P.block_names(_abstract(model, x)["params"]) == (
        ["embed"] + [f"block{i}" for i in range(1, 12)] + ["head"])


# ---------------------------------------------------------------------------------------------
# Numerics: ResNet-18 (one compiled train-mode apply) and SmallViT

@pytest.fixture(scope="module")
def resnet18_run():
    model = models.resnet18((8, 8, 1), K, width=W)
    x_real = _images(B, seed=1)
    v = _fake_variables(model, x_real)
    fn = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask=m, capture_norm=True))
    mask = jnp.array([True] * B + [False] * B)
    pads = [_images(B, seed=s) * 10.0 + 3.0 for s in (2, 3)]
    runs = [fn(v, jnp.concatenate([x_real, p]), mask) for p in pads]
    unmasked = fn(v, jnp.concatenate([x_real, pads[0]]), jnp.ones(2 * B, bool))
    return model, v, x_real, runs, unmasked


def test_resnet18_norm_capture(resnet18_run):
    model, v, x_real, runs, _ = resnet18_run
    expected = _expected_resnet_norms((2, 2, 2, 2), False)
    assert len(expected) == 1 + 2 * 8 + 3 == 20
    names = P.norm_layer_names(model, v, x_real)
    assert names == expected
    norm = runs[0][1]["norm"]
    assert sorted(norm) == sorted(expected)
    for n in expected:
        s = int(n[5]) - 1 if n.startswith("stage") else 0  # stage s+1 halves HW s times
        assert norm[n].shape == (2 * B, 8 // 2 ** s, 8 // 2 ** s, W * 2 ** s), n
    # The capture is the BatchNorm output: with scale s and bias b, the masked batch mean per
    # channel is b and the variance s^2 (up to epsilon).
    p = v["params"]["stage2_block1"]["bn1"]
    out = np.asarray(norm["stage2_block1/bn1"][:B])
    np.testing.assert_allclose(out.mean((0, 1, 2)), p["bias"], atol=1e-4)
    np.testing.assert_allclose(out.var((0, 1, 2)), np.asarray(p["scale"]) ** 2, rtol=2e-2, atol=1e-3)


def test_resnet18_features_feed_the_head(resnet18_run):
    _, v, _, runs, _ = resnet18_run
    logits, aux = runs[0]
    head = v["params"]["head"]
    np.testing.assert_allclose(logits, aux["features"] @ head["kernel"] + head["bias"],
                               rtol=1e-5, atol=1e-5)


def test_batchnorm_ignores_masked_padding(resnet18_run):
    model, v, x_real, runs, unmasked = resnet18_run
    (l0, a0), (l1, a1) = runs
    # Different padding contents, same real outputs and batch statistics.
    np.testing.assert_allclose(l0[:B], l1[:B], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 a0["model_state"], a1["model_state"])
    # Independent oracle for the stem: new running mean/var = 0.9 * old + 0.1 * batch statistic
    # of the stem conv output over the real samples only.
    k = np.asarray(v["params"]["stem"]["conv"]["kernel"])  # [3, 3, 1, W]
    xp = np.pad(np.asarray(x_real), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(np.einsum("bhwc,cf->bhwf", xp[:, i:i + 8, j:j + 8], k[i, j])
               for i in range(3) for j in range(3))
    mu, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
    stats = a0["model_state"]["batch_stats"]["stem"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
    # Without the mask the padding does leak into the statistics and the real outputs.
    ul, ua = unmasked
    assert not np.allclose(ua["model_state"]["batch_stats"]["stem"]["bn"]["mean"], stats["mean"])
    assert not np.allclose(ul[:B], l0[:B], atol=1e-3)


def test_vit_layernorm_capture_and_head():
    model = models.small_vit((8, 8, 1), K, **VIT)
    x = _images(B, seed=4)
    v = _fake_variables(model, x)
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=True, capture_norm=True))(v, x)
    norm = aux["norm"]
    assert sorted(norm) == ["block1/ln1", "block1/ln2", "block2/ln1", "block2/ln2", "head_norm"]
    n_tokens = (8 // 2) ** 2 + 1
    for name, out in norm.items():
        assert out.shape == (B, n_tokens, 16), name
        layer = v["params"][name.split("/")[0]]
        p = layer[name.split("/")[1]] if "/" in name else layer
        # The capture is the LayerNorm output: undoing the affine map leaves mean 0, variance 1.
        z = (np.asarray(out) - np.asarray(p["bias"])) / np.asarray(p["scale"])
        np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-4)
        np.testing.assert_allclose(z.var(-1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(aux["features"], norm["head_norm"][:, 0], rtol=1e-6)
    head = v["params"]["head"]
    np.testing.assert_allclose(logits, aux["features"] @ head["kernel"] + head["bias"],
                               rtol=1e-5, atol=1e-5)
    assert aux["model_state"] == {}


# ---------------------------------------------------------------------------------------------
# Input validation

def test_misshaped_inputs_and_bad_configs_raise():
    model = models.resnet18((8, 8, 1), K, width=W)
    v = _abstract(model, jnp.zeros((B, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 1\]"):
        model.apply(v, jnp.zeros((B, 16, 16, 1)))
    with pytest.raises(ValueError, match="expects inputs"):
        model.init(jax.random.key(0), jnp.zeros((B, 8, 8, 3)))
    vit = models.small_vit((8, 8, 1), K, **VIT)
    with pytest.raises(ValueError, match="expects inputs"):
        vit.apply(_abstract(vit, jnp.zeros((B, 8, 8, 1))), jnp.zeros((B, 64)))
    with pytest.raises(ValueError, match="imagenet stem.*at least 32x32"):
        models.resnet18((16, 16, 3), K, stem="imagenet")
    with pytest.raises(ValueError, match="at least 8x8"):
        models.resnet50((4, 4, 3), K)
    with pytest.raises(ValueError, match="stem must be"):
        models.resnet18((8, 8, 3), K, stem="tiny")
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        models.resnet18((64,), K)
    with pytest.raises(ValueError, match="patch_size 3 does not divide"):
        models.small_vit((8, 8, 1), K, patch_size=3, depth=1, width=8, heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="not divisible by heads"):
        models.small_vit((8, 8, 1), K, patch_size=2, depth=1, width=10, heads=4, mlp_dim=8)
    with pytest.raises(ValueError, match="pool"):
        models.small_vit((8, 8, 1), K, patch_size=2, depth=1, width=8, heads=2, mlp_dim=8,
                         pool="max")
    with pytest.raises(ValueError, match="positive"):
        models.resnet18((8, 8, 1), K, width=0)


def test_stem_auto():
    assert models.resnet18((32, 32, 3), K).module.stem == "cifar"
    assert models.resnet18((64, 64, 3), K).module.stem == "imagenet"
    assert models.resnet18((64, 64, 3), K, stem="cifar").module.stem == "cifar"


# ---------------------------------------------------------------------------------------------
# Partition helpers

def test_block_names_and_last_k_mask_counts():
    model = models.resnet18((8, 8, 1), K, width=W)
    v = _abstract(model, jnp.zeros((B, 8, 8, 1)))
    params = v["params"]
    blocks = P.block_names(params)
    assert blocks == (["stem"] + [f"stage{s}_block{b}" for s in range(1, 5) for b in (1, 2)]
                      + ["head"])
    c = 8 * W  # stage-4 channels
    head = c * K + K
    basic = 2 * (3 * 3 * c * c) + 2 * (2 * c)  # two 3x3 convs, two BNs (scale, bias)
    assert _count(params, P.last_k_mask(params, 1)) == head
    assert _count(params, P.last_k_mask(params, 2)) == head + basic
    assert _count(params, P.last_k_mask(params, len(blocks))) == _count(params)
    for bad in (0, -1, len(blocks) + 1, 1.5, True):
        with pytest.raises(ValueError, match="k must be"):
            P.last_k_mask(params, bad)
    # batch_stats have no head: count blocks from the params' list.
    stats_mask = P.last_k_mask(v["batch_stats"], 2, blocks=blocks)
    assert _count(v["batch_stats"], stats_mask) == 2 * 2 * c
    with pytest.raises(ValueError, match="not in the block list"):
        P.last_k_mask(params, 1, blocks=["stem", "head"])

    vit = models.small_vit((8, 8, 1), K, **VIT)
    vp = _abstract(vit, jnp.zeros((B, 8, 8, 1)))["params"]
    assert P.block_names(vp) == ["embed", "block1", "block2", "head"]
    m1 = P.last_k_mask(vp, 1)
    assert _count(vp, m1) == (16 * K + K) + 2 * 16  # head + final LayerNorm
    assert all(jax.tree.leaves(m1["head_norm"])) and not any(jax.tree.leaves(m1["block2"]))

    mp = _abstract(models.mlp(5, 1, hidden=(4, 3)), jnp.zeros((B, 5)))["params"]
    assert P.block_names(mp) == ["dense_0", "dense_1", "head"]
    assert _count(mp, P.last_k_mask(mp, 2)) == (4 * 3 + 3) + (3 + 1)
    assert P.block_names({"block10": 0, "block2": 0, "head": 0, "embed": 0}) == [
        "embed", "block2", "block10", "head"]


def test_split_merge_head_roundtrip():
    params = {"dense_0": {"kernel": jnp.ones((2, 3))}, "head": {"kernel": jnp.zeros((3, 1))}}
    head, body = P.split_head(params)
    assert set(body) == {"dense_0"} and head is params["head"]
    assert jax.tree.structure(P.merge_head(head, body)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="no 'head'"):
        P.split_head(body)
    with pytest.raises(ValueError, match="already"):
        P.merge_head(head, params)


def _mlp_setup():
    model = models.mlp(6, 3, hidden=(5, 4))
    x = jnp.asarray(np.random.RandomState(0).standard_normal((8, 6)), jnp.float32)
    y = jnp.arange(8) % 3
    params = _fake_variables(model, x)["params"]
    return model, x, y, params


def test_partition_params_gradient_matches_full_gradient():
    model, x, y, params = _mlp_setup()
    mask = P.last_k_mask(params, 2)

    def loss(p):
        logits, _ = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    subset, rebuild = subsets.partition_params(params, mask)
    assert all(a is b for a, b in zip(jax.tree.leaves(rebuild(subset)), jax.tree.leaves(params)))
    g_sub, g_full = jax.jit(lambda s, p: (jax.grad(lambda s: loss(subsets.combine(s, p, mask)))(s),
                                          jax.grad(loss)(p)))(subset, params)
    expected = subsets.select(g_full, mask)
    assert jax.tree.structure(g_sub) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_sub, expected)
    assert g_sub["dense_0"] == {"bias": None, "kernel": None}
    flat, _ = ravel_pytree(g_sub)
    assert flat.size == _count(params, mask) == 4 * 5 + 4 + 3 * 4 + 3
    with pytest.raises(ValueError, match="structure"):
        subsets.select(params, {"head": True})
    with pytest.raises(ValueError, match="Python bools"):
        subsets.select(params, jax.tree.map(lambda _: jnp.array(True), mask))


def test_reinit_masked_takes_fresh_leaves_only_where_masked():
    params = jax.tree.map(np.asarray, _mlp_setup()[3])
    fresh = jax.tree.map(lambda p: p + 100.0, params)
    mask = P.last_k_mask(params, 1)
    out = P.reinit_masked(params, fresh, mask)
    for m, o, p, f in zip(*map(jax.tree.leaves, (mask, out, params, fresh))):
        np.testing.assert_array_equal(o, f if m else p)
    with pytest.raises(ValueError, match="shape"):
        P.reinit_masked(params, jax.tree.map(lambda p: p[..., :1], params), mask)


def test_training_a_subset_leaves_frozen_params_bit_identical():
    model, x, y, params = _mlp_setup()
    mask = P.last_k_mask(params, 1)
    trainer = methods.train(model.apply, optax.adam(0.1), l2=0.1, trainable=mask)
    step = jax.jit(trainer.update)
    variables = {"params": params}
    state = trainer.init(variables)
    batch = {"x": x, "y": y, "weight": jnp.ones(8)}
    for _ in range(3):
        variables, state, _ = step(variables, state, {"train": batch}, None)
    for m, new, old in zip(*map(jax.tree.leaves, (mask, variables["params"], params))):
        new, old = np.asarray(new), np.asarray(old)
        if m:
            assert not np.array_equal(new, old)
        else:
            assert new.tobytes() == old.tobytes()
    # Adam moments (and a step count) are kept for the trainable leaves only.
    assert _count(state.opt_state) == 2 * _count(params, mask) + 1


def test_mask_of_selects_by_prefix_predicate_or_mask():
    params = _mlp_setup()[3]
    by_name = subsets.mask_of(params, "head")
    assert by_name == P.last_k_mask(params, 1)
    assert subsets.mask_of(params, ["dense_1", "head"]) == P.last_k_mask(params, 2)
    assert subsets.mask_of(params, lambda path, leaf: path.endswith("bias"))["head"] == \
        {"bias": True, "kernel": False}
    assert subsets.mask_of(params, by_name) is by_name
    assert all(jax.tree.leaves(subsets.mask_of(params, None)))
    with pytest.raises(ValueError, match="selects no parameter"):
        subsets.mask_of(params, "decoder")
    with pytest.raises(ValueError, match="structure"):
        subsets.mask_of(params, {"head": True})


# ---------------------------------------------------------------------------------------------
# NNX adapter

class _NnxNet(nnx.Module):
    def __init__(self, *, rngs):
        self.fc = nnx.Linear(5, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x, mask=None):
        h = nnx.relu(self.bn(self.fc(x), mask=None if mask is None else mask[:, None]))
        h = self.ln(h)
        return self.head(h), h


def test_from_nnx_contract():
    model = models.from_nnx(lambda rngs: _NnxNet(rngs=rngs), (5,), 3, uses_mask=True)
    x = jnp.asarray(np.random.RandomState(0).standard_normal((6, 5)), jnp.float32)
    v = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    assert set(v) == {"params", "batch_stats"}
    assert P.block_names(v["params"]) == ["bn", "fc", "ln", "head"]  # no stem: natural order
    mask = jnp.array([True] * 4 + [False] * 2)
    fn = jax.jit(lambda v, x: (model.apply(v, x, train=True, mask=mask, capture_norm=True),
                               model.apply(v, x)))
    (logits, aux), (_, a_eval) = fn(v, x)
    assert logits.shape == (6, 3) and aux["features"].shape == (6, 4)
    assert sorted(aux["norm"]) == ["bn", "ln"]
    head = v["params"]["head"]
    np.testing.assert_allclose(logits, aux["features"] @ head["kernel"] + head["bias"],
                               rtol=1e-5, atol=1e-5)
    # Masked batch statistics: the running mean moves towards the real samples' mean only.
    h = np.asarray(x @ v["params"]["fc"]["kernel"] + v["params"]["fc"]["bias"])
    np.testing.assert_allclose(aux["model_state"]["batch_stats"]["bn"]["mean"],
                               0.1 * h[:4].mean(0), rtol=1e-4, atol=1e-6)
    # Eval mode uses the running statistics (0, 1) and returns no state.
    assert a_eval["model_state"] == {}
    r = np.maximum(h / np.sqrt(1 + 1e-5), 0)  # BN (scale 1, bias 0 at init), ReLU
    ln = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(a_eval["features"], ln, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="constructor"):
        models.from_nnx(nnx.eval_shape(lambda: _NnxNet(rngs=nnx.Rngs(0))), (5,), 3)
    with pytest.raises(ValueError, match="expects inputs"):
        model.apply(v, jnp.zeros((2, 4)))
