"""The fairness-gap study of Tran & Woo: the fairness-gap penalty and the driver's pieces.

Oracles: per-class variances recomputed with numpy from the captured normalisation outputs,
central finite differences in float64 for the penalty's gradient, a manual composition of the
wrapped method's step, np.corrcoef for Pearson's r, hand counts for the cost helpers; and an
end-to-end run of ``experiments.fairness_gap`` on its smoke config, resumed after an interruption
and compared with the uninterrupted run.
"""

import dataclasses
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common
from experiments import fairness_gap as fg
from jaxunlearn import data, models
from jaxunlearn import methods as M
from jaxunlearn.methods import base
from jaxunlearn.methods.fairness_gap_penalty import (
    batch_class_variances, fairness_gap_penalty, penalty_loss, with_fairness_gap_penalty)

K, D_IN = 4, 5


class _Tiny(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense -> LayerNorm -> head (two normalisation layers)."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        h = nn.Dense(6, name="dense")(x)
        m = None if mask is None or not train else mask[:, None]
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h, mask=m))
        h = nn.LayerNorm(name="ln")(nn.Dense(5, name="mid")(h))
        return nn.Dense(K, name="head")(h), h


MODEL = models.from_linen(_Tiny(), (D_IN,), K, uses_mask=True)


@jax.jit
def _norm(variables, x):
    return MODEL.apply(variables, x, capture_norm=True)[1]["norm"]


@functools.partial(jax.jit, static_argnames=("target",))
def _penalty(params, model_state, reference, batch, target="variances"):
    """``((R, diagnostics), dR/dparams)``: one compiled program per target for every test."""
    f = lambda p: penalty_loss(MODEL.apply, p, model_state, reference, batch, num_classes=K,
                               target=target)
    return jax.value_and_grad(f, has_aux=True)(params)


@functools.lru_cache(maxsize=None)
def _setup(seed=0, n=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype(np.float32)
    # class 0: 5 samples, 1: 5, 2: 5 (one of them padding -> 4), 3: a single sample (excluded)
    y = np.array([0] * 5 + [1] * 5 + [2] * 5 + [3], np.int32)[:n]
    w = np.ones(n, np.float32)
    w[14] = 0.0
    v0 = jax.jit(MODEL.init)(jax.random.key(seed), jnp.asarray(x))
    # a BatchNorm with non-trivial running statistics, and a perturbed model theta
    v0 = {**v0, "batch_stats": jax.tree.map(lambda a: a + 0.3 * jnp.arange(a.size).reshape(a.shape)
                                            / a.size, v0["batch_stats"])}
    leaves, tdef = jax.tree.flatten(v0["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    p1 = tdef.unflatten([l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "weight": jnp.asarray(w)}
    return v0, {**v0, "params": p1}, batch


def _np_sigma(h, y, w, k=K, min_count=2):
    """sigma_c = mean over features of the (ddof 0) variance over class-c samples; valid mask."""
    h = np.asarray(h, np.float64).reshape(h.shape[0], -1)
    sig, valid = np.zeros(k), np.zeros(k, bool)
    for c in range(k):
        idx = (np.asarray(y) == c) & (np.asarray(w) != 0)
        if idx.sum() >= min_count:
            sig[c] = h[idx].var(axis=0).mean()
            valid[c] = True
    return sig, valid


def _np_penalty(norm, norm0, y, w, target):
    terms = []
    for name in sorted(norm):
        s, valid = _np_sigma(norm[name], y, w)
        s0, _ = _np_sigma(norm0[name], y, w)
        if target == "variances":
            terms.append(np.mean((s[valid] - s0[valid]) ** 2))
        else:
            gap = lambda v: v[valid].max() - v[valid].min()
            terms.append((gap(s) - gap(s0)) ** 2)
    return float(np.mean(terms))


# ----------------------------------------------------------------------------- the penalty

@pytest.mark.parametrize("target", ["variances", "gap"])
def test_penalty_matches_numpy_on_captured_activations(target):
    v0, v1, b = _setup()
    norm, norm0 = _norm(v1, b["x"]), _norm(v0, b["x"])
    assert set(norm) == {"bn", "ln"}
    (r, diag), _ = _penalty(v1["params"], {"batch_stats": v1["batch_stats"]}, v0, b, target=target)
    want = _np_penalty(norm, norm0, b["y"], b["weight"], target)
    assert want > 1e-4  # theta differs from theta_0, so the check is not vacuous
    np.testing.assert_allclose(float(r), want, rtol=2e-4)
    assert float(diag["classes_used"]) == 3  # class 3 has one sample; the padding row is ignored
    sig, n = jax.jit(functools.partial(batch_class_variances, num_classes=K))(
        norm, b["y"], b["weight"])
    np.testing.assert_array_equal(np.asarray(n), [5, 5, 4, 1])
    np.testing.assert_allclose(np.asarray(sig["ln"])[:3],
                               _np_sigma(norm["ln"], b["y"], b["weight"])[0][:3], rtol=2e-5)


def test_penalty_classes_and_layers_restrict_the_sum():
    v0, v1, b = _setup()
    norm, norm0 = _norm(v1, b["x"]), _norm(v0, b["x"])
    pen = functools.partial(fairness_gap_penalty, num_classes=K, classes=(0, 1), layers=("ln",))
    r, _ = jax.jit(pen)(norm, norm0, b["y"], b["weight"])
    s, _ = _np_sigma(norm["ln"], b["y"], b["weight"])
    s0, _ = _np_sigma(norm0["ln"], b["y"], b["weight"])
    np.testing.assert_allclose(float(r), np.mean((s[:2] - s0[:2]) ** 2), rtol=2e-4)


@pytest.mark.parametrize("target", ["variances", "gap"])
def test_penalty_is_zero_with_zero_gradient_at_theta0(target):
    v0, _, b = _setup()
    state = {"batch_stats": v0["batch_stats"]}
    (val, _), g = _penalty(v0["params"], state, v0, b, target=target)
    # exactly 0 in exact arithmetic; XLA may fuse the two identical forward passes differently.
    # (Away from theta_0 the gradient entries are O(0.1): see the finite-difference test.)
    assert abs(float(val)) < 1e-12
    assert max(float(jnp.max(jnp.abs(l))) for l in jax.tree.leaves(g)) < 2e-5


@pytest.mark.parametrize("target", ["variances", "gap"])
def test_penalty_gradient_matches_finite_differences(target):
    # float32 throughout (the metric's statistics are float32): central differences with a step
    # large enough for round-off, small enough for the O(h^2) truncation error.
    v0, v1, b = _setup(seed=3)
    state = {"batch_stats": v1["batch_stats"]}
    f = lambda p: _penalty(p, state, v0, b, target=target)[0][0]
    g = _penalty(v1["params"], state, v0, b, target=target)[1]
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                             v1["params"])
    shift = lambda t: jax.tree.map(lambda p, d: p + t * d, v1["params"], direction)
    h = 2e-3
    fd = (float(f(shift(h))) - float(f(shift(-h)))) / (2 * h)
    analytic = sum(float(jnp.vdot(a, d)) for a, d in
                   zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, fd, rtol=1e-2)


def _retain_batches(b):
    fb = {**b, "weight": -jnp.ones_like(b["weight"])}
    return {"forget": fb, "retain": b}


def test_wrapper_is_the_method_step_then_a_penalty_step_and_respects_the_mask():
    v0, _, b = _setup()
    mask = models.last_k_mask(v0["params"], 2)  # blocks bn, dense, ln, mid, head: train mid, head
    lr, lam = 0.05, 3.0
    inner = M.finetune(MODEL.apply, optimizer=optax.sgd(0.1), trainable=mask)
    wrapped = with_fairness_gap_penalty(inner, MODEL.apply, strength=lam, num_classes=K,
                                        optimizer=optax.sgd(lr), trainable=mask)
    assert wrapped.uses == ("retain",)  # CF reads D_r only; the penalty needs D_r too
    batches = _retain_batches(b)
    step = jax.jit(inner.update)
    # move away from theta_0 first, so that the penalty step is not zero
    v = step(v0, inner.init(v0), batches, jax.random.key(0))[0]
    v = step(v, inner.init(v), batches, jax.random.key(0))[0]
    st = wrapped.init(v0)
    got, st2, metrics = jax.jit(wrapped.update)(v, st, batches, jax.random.key(1))
    # oracle: the inner update from the same state, then SGD on lam * R on the trainable leaves
    v_in, _, _ = step(v, st.extra["inner"], batches, jax.random.key(1))
    state = {k: x for k, x in v_in.items() if k != "params"}
    g = _penalty(v_in["params"], state, v0, b)[1]
    want = jax.tree.map(lambda p, gi, m: p - lr * lam * gi if m else p, v_in["params"], g, mask)
    for a, w_ in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w_), rtol=1e-5, atol=1e-7)
    for path in (("dense", "kernel"), ("dense", "bias"), ("bn", "scale"), ("ln", "scale")):
        a, ref = got["params"], v0["params"]
        for p in path:
            a, ref = a[p], ref[p]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(ref))  # frozen: bit-identical
    assert float(metrics["fg_penalty"]) > 0
    assert int(st2.step) == 1 and int(st2.extra["inner"].step) == 1


def test_penalty_bad_input_is_rejected():
    v0, v1, b = _setup()
    inner = M.finetune(MODEL.apply)
    with pytest.raises(ValueError, match="strength"):
        with_fairness_gap_penalty(inner, MODEL.apply, strength=-1.0, num_classes=K)
    with pytest.raises(ValueError, match="target"):
        with_fairness_gap_penalty(inner, MODEL.apply, strength=1.0, num_classes=K, target="max")
    with pytest.raises(ValueError, match="one-shot"):
        one_shot = base.Method(inner.init, inner.update, one_shot=True, name="IF")
        with_fairness_gap_penalty(one_shot, MODEL.apply, strength=1.0, num_classes=K)
    with pytest.raises(ValueError, match="classes"):
        with_fairness_gap_penalty(inner, MODEL.apply, strength=1.0, num_classes=K, classes=[7, 1])
    norm = _norm(v1, b["x"])
    with pytest.raises(ValueError, match="not normalisation outputs"):
        fairness_gap_penalty(norm, norm, b["y"], b["weight"], num_classes=K, layers=["conv9"])
    mlp = models.mlp(D_IN, K, hidden=(4,))
    vm = jax.eval_shape(mlp.init, jax.random.key(0), b["x"])
    with pytest.raises(ValueError, match="no normalisation outputs"):
        jax.eval_shape(lambda v: penalty_loss(mlp.apply, v["params"], {}, v, b, num_classes=K), vm)


# ----------------------------------------------------------------------------- driver helpers

def test_pearson_matches_numpy_and_handles_degenerate_input():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9)
    got = fg.pearson(x, y)
    np.testing.assert_allclose(got["r"], np.corrcoef(x, y)[0, 1], rtol=1e-12)
    assert got["n"] == 9 and 0 < got["p"] < 1
    assert np.isnan(fg.pearson([1.0, 2.0], [3.0, 1.0])["r"])        # n < 3
    assert np.isnan(fg.pearson([1.0, 1.0, 1.0], [3.0, 1.0, 2.0])["r"])  # constant
    assert fg.pearson([1.0, 2.0, np.nan, 4.0], [2.0, 4.0, 1.0, 8.0])["n"] == 3
    with pytest.raises(ValueError):
        fg.pearson([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, float("nan")])
def test_attack_eps_outside_the_input_range_is_rejected(eps):
    with pytest.raises(ValueError, match="outside the input range"):
        fg.check_attack_eps(eps)


def test_attack_eps_inside_the_range_passes():
    assert fg.check_attack_eps(8 / 255) == pytest.approx(8 / 255)
    assert fg.check_attack_eps(1.0) == 1.0


def test_forget_class_absent_or_out_of_range_is_rejected():
    y = np.array([0, 1, 2, 0, 1, 2, 4], np.int32)
    np.testing.assert_array_equal(fg.check_forget_class(y, 1, 5), [1, 4])
    with pytest.raises(ValueError, match="does not occur"):
        fg.check_forget_class(y, 3, 5)
    with pytest.raises(ValueError, match="outside"):
        fg.check_forget_class(y, 5, 5)


def test_model_without_normalisation_layers_is_rejected():
    mlp = models.mlp(D_IN, K)
    x = jnp.zeros((2, D_IN))
    with pytest.raises(ValueError, match="no normalisation outputs"):
        fg.check_norm_layers(mlp, jax.eval_shape(mlp.init, jax.random.key(0), x), x)
    assert fg.check_norm_layers(MODEL, jax.eval_shape(MODEL.init, jax.random.key(0), x), x) == \
        ["bn", "ln"]


def test_k_larger_than_the_number_of_blocks_is_rejected():
    p = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((2, D_IN)))["params"]
    assert fg.check_last_k(p, 5) == ["bn", "dense", "ln", "mid", "head"]
    with pytest.raises(ValueError, match="k must be"):
        fg.check_last_k(p, 6)


def test_cost_helpers_count_by_hand():
    params = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((5,)), "d": jnp.zeros((2, 2))}}
    assert fg.count_trainable(params) == 12 + 5 + 4
    mask = {"a": np.eye(3, 4, dtype=bool), "b": {"c": True, "d": False}}
    assert fg.count_trainable(params, mask) == 3 + 5
    assert fg.tree_bytes({"x": jnp.zeros((3, 2), jnp.float32), "y": jnp.zeros(4, jnp.int8)}) == 28
    zero = jnp.zeros((), jnp.int32)
    st = base.MethodState(zero, zero, (jnp.zeros(10),),
                          {"inner": base.MethodState(zero, zero, (jnp.zeros(6),), {}),
                           "reference": {"w": jnp.zeros(1000)}})
    assert fg.optimizer_state_bytes(st) == 40 + 24  # the reference copy is not optimizer state
    assert fg.forget_batch_size("proportional", 64, 100, 900) == 7
    assert fg.forget_batch_size("proportional", 8, 1, 900) == 2
    assert fg.forget_batch_size(32, 64, 100, 900) == 32


def test_gap_summary_savings_and_correlations_on_synthetic_rows():
    gaps = {"b": 0.5, "a": 0.1, "c": 0.3}
    assert fg.gap_summary(gaps, ["a", "b", "c"]) == {"gap_mean": pytest.approx(0.3),
                                                      "gap_max": 0.5, "gap_last": 0.3}
    rows = [{"method": "Original", "scope": "full", "gap_mean": 9.0, "gap_last": 9.0,
             "fgsm_acc": 9.0, "pgd_acc": 9.0}]
    for i, (m, scope) in enumerate([("CF", "full"), ("CF", "last2"), ("RL", "full"),
                                    ("RL", "last2")]):
        rows.append({"method": m, "scope": scope, "gap_mean": 0.1 * i, "gap_last": 0.2 * i,
                     "fgsm_acc": 1.0 - 0.1 * i, "pgd_acc": 1.0 - 0.1 * i ** 2,
                     "forget_acc": 0.0, "test_acc": 0.9, "time_s": 10.0 / (1 + (scope != "full")),
                     "trainable_params": 100 if scope == "full" else 20})
    c = fg.correlations(rows)
    assert c["all:gap_mean~fgsm_acc"]["r"] == pytest.approx(-1.0)
    assert c["all:gap_mean~fgsm_acc"]["n"] == 4  # the original model is excluded
    assert c["full:gap_mean~fgsm_acc"]["n"] == 2 and np.isnan(c["full:gap_mean~fgsm_acc"]["r"])
    sv = fg.savings(rows)
    assert [s["method"] for s in sv] == ["CF", "RL"]
    assert sv[0]["trainable_params_ratio"] == 5.0 and sv[0]["time_s_ratio"] == 2.0
    assert sv[1]["d_gap_mean"] == pytest.approx(0.1)


def _config(name, **change):
    cfg = common.load_config(common.config_path("fairness_gap", name), fg.Config)
    return dataclasses.replace(cfg, **change)


def test_variants_cover_every_method_full_last_k_and_penalty():
    cfg = _config("quick")
    v = fg.variants(cfg)
    assert [m for m, s in v if s == "full" and "+" not in m] == list(fg.METHODS)
    assert [m for m, s in v if s == "k"] == list(fg.METHODS)
    assert [m for m, _ in v if m.endswith("+FGP")] == ["RL+FGP", "SalUn+FGP"]
    assert fg.variants(_config("quick", methods=("RL",))) == [("RL", "full"), ("RL", "k"),
                                                               ("RL+FGP", "full")]
    assert set(cfg.hparams) == set(fg.METHODS) - {"Retrain"}
    assert common.presets("fairness_gap") == ("cifar10_resnet50", "cifar10_vit", "quick",
                                              "quick_cifar10", "smoke")
    with pytest.raises(ValueError, match="data-dir"):
        fg.load_dataset(_config("cifar10-vit"), None, 0, False)
    with pytest.raises(ValueError, match="quick-cifar10"):  # --data-dir with a digits config
        fg.load_dataset(cfg, "/some/dir", 0, False)
    with pytest.raises(SystemExit):
        fg.main(["--preset", "huge"])


@pytest.mark.parametrize("preset", ["cifar10-resnet50", "cifar10-vit"])
def test_paper_presets_build_models_with_valid_k_and_norm_layers(preset):
    # shapes only (jax.eval_shape): the accelerator presets are checked without data or a GPU
    cfg = _config(preset)
    x = jnp.zeros((2, 32, 32, 3))
    for name, recipe in cfg.recipes.items():
        model = fg.build_model(recipe, x.shape[1:], 10)
        abstract = jax.eval_shape(model.init, jax.random.key(0), x)
        blocks = fg.check_last_k(abstract["params"], recipe["last_k"])
        assert blocks[-1] == "head" and len(blocks) > recipe["last_k"]
        assert len(fg.check_norm_layers(model, abstract, x)) == {"resnet50": 53, "vit": 13}[name]
    assert fg.check_attack_eps(cfg.eps) == pytest.approx(8 / 255)


def test_class_splits_separate_the_forgotten_class():
    ds = data.load_digits()
    s = fg.class_splits(ds, 3)
    assert set(np.unique(s["forget"]["y"])) == {3} and 3 not in s["retain"]["y"]
    assert 3 not in s["test_retain"]["y"] and set(np.unique(s["test_forget"]["y"])) == {3}
    assert len(s["forget"]["y"]) + len(s["retain"]["y"]) == len(ds.train["y"])


def _smoke_vit(**change):
    return {"vit": {**_config("smoke").recipes["vit"], **change}}


@pytest.mark.parametrize("change, match", [
    ({"recipes": _smoke_vit(arch="no-norm")}, "no normalisation outputs"),
    ({"forget_class": 11}, "forget class"),
    ({"eps": 1.5}, "outside the input range"),
    ({"recipes": _smoke_vit(last_k=4)}, "k must be"),
])
def test_driver_surfaces_bad_setups_before_training(tmp_path, monkeypatch, change, match):
    cfg = _config("smoke", **change)
    build = fg.build_model

    def build_or_mlp(recipe, shape, k):  # an image MLP: a model without normalisation layers
        if recipe["arch"] == "no-norm":
            return models.from_linen(models.MLP((8,), k), tuple(shape), k)
        return build(recipe, shape, k)

    monkeypatch.setattr(fg, "build_model", build_or_mlp)
    ds = fg.load_dataset(cfg, None, 0, False)
    with pytest.raises(ValueError, match=match):
        fg.run_model("vit", cfg, ds, out=str(tmp_path), seed=0, progress=False)
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing was trained


def test_every_variant_runs_one_step(tmp_path, monkeypatch, rbg_keys):
    # Every (method, scope) the driver runs, +FGP included, through run_variant on the smoke model
    # (untrained: the path, not the result, is under test) with 64 training digits, so each takes
    # one step. Evaluation (_finish) depends on the variables only: the smoke run below covers it.
    # (SalUn crashed in its saliency mask for a session while only GA ran end to end.)
    cfg = _config("smoke", max_train=64)
    ds = fg.load_dataset(cfg, None, 0, False)
    recipe, k = cfg.recipes["vit"], cfg.recipes["vit"]["last_k"]
    model = fg.build_model(recipe, ds.train["x"].shape[1:], ds.num_classes)
    key = jax.random.key(0)
    original = fg.init_variables(model, key, ds.train["x"][:1])
    splits = fg.class_splits(ds, cfg.forget_class)
    assert max(data.split_size(splits[s]) for s in ("forget", "retain")) <= cfg.unlearn_batch_size
    ctx = fg.Context(cfg=cfg, model=model, model_name="vit", recipe=recipe, original=original,
                     splits=splits, num_classes=ds.num_classes,
                     retained=[c for c in range(ds.num_classes) if c != cfg.forget_class],
                     norm_order=[], key=key, out=str(tmp_path), progress=False, memory_analysis=())
    monkeypatch.setattr(fg, "_finish", lambda row, variables, ctx: {**row, "variables": variables})
    last = models.last_k_mask(original["params"], k)
    rows = {}
    for method, scope in fg.variants(cfg):
        row = fg.run_variant(method, None if scope == "full" else k, ctx)
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), row["variables"]["params"],
                             original["params"])
        assert all(np.isfinite(l).all() for l in jax.tree.leaves(row["variables"])), method
        assert any(jax.tree.leaves(moved)), (method, scope)
        if scope == "k":  # only the last k blocks moved
            assert not any(jax.tree.leaves(jax.tree.map(lambda m, t: m and not t, moved, last)))
        rows[method, scope] = row
    assert {m for m, _ in rows} == {*fg.METHODS, "RL+FGP", "SalUn+FGP"}
    assert all(rows[m, "k"]["trainable_params"] < rows[m, "full"]["trainable_params"]
               for m in fg.METHODS)
    # SalUn trains only the salient half of the weights, its +FGP the same
    assert rows["SalUn", "full"]["trainable_params"] < rows["CF", "full"]["trainable_params"]
    assert rows["SalUn+FGP", "full"]["trainable_params"] == rows["SalUn", "full"]["trainable_params"]
    assert rows["RL+FGP", "full"]["fg_penalty_last_epoch"] >= 0


@pytest.mark.slow
def test_driver_smoke_run_writes_every_output_and_resumes_identically(tmp_path, monkeypatch,
                                                                       killed_driver, rbg_keys):
    # One method (GA, the cheapest to compile) on the full model and its last block: the other
    # methods share this path (run_variant -> build_method -> loop.run -> evaluate_model) and each
    # runs a step in test_every_variant_runs_one_step. rbg keys: the checks do not depend on the PRNG.
    out = str(tmp_path / "run")
    argv = ["--preset", "smoke", "--no-progress", "--no-compile-cache", "--set", "methods=GA,"]
    res = fg.main(argv + ["--out", out])
    for f in ("results.json", "report.md", "summary.csv", "fairness_gap_layers.csv",
              "fairness_gap_layers_vit.png", "conjecture2_vit.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    rows = res["rows"]
    labels = [(r["method"], r["scope"]) for r in rows]
    assert labels == [("Original", "full"), ("GA", "full"), ("GA", "last1")]
    report = open(os.path.join(out, "report.md")).read()
    for m in labels:
        assert f"| {m[0]} | {m[1]} |" in report
    layers = open(os.path.join(out, "fairness_gap_layers.csv")).read().splitlines()
    assert len(layers) == 1 + len(rows) * 3  # SmallViT depth 1: ln1, ln2, head_norm
    for r in rows:
        assert 0 <= r["pgd_acc"] <= 1 and 0 <= r["fgsm_acc"] <= 1 and np.isfinite(r["gap_mean"])
        assert r["gap_max"] >= r["gap_mean"] >= 0
    full, last = rows[1], rows[2]
    assert last["trainable_params"] < full["trainable_params"]
    assert last["opt_state_bytes"] < full["opt_state_bytes"]
    assert os.path.isdir(os.path.join(out, "checkpoints", "seed0", "vit", "original"))
    assert set(res["models"][0]["correlations"]["all:gap_mean~fgsm_acc"]) == {"r", "p", "n"}
    # the paper comparison (GA only: Conjecture 2, one seed) opens the report
    claims = res["paper_comparison"]
    assert [c["claim"].split(" (")[0] for c in claims] == [
        "Conjecture 2: higher fairness-gap, lower adversarial accuracy"]
    assert claims[0]["holds"] in (True, False, "inconclusive")
    assert report.split("\n## ")[1].startswith("Paper vs ours\n\n| claim | paper | ours | holds |")

    # The same run killed (a real kill -9 of a subprocess) right after its second row was
    # written, then rerun on the same --out: only the missing row runs.
    part = str(tmp_path / "part")
    killed_driver("fairness_gap", argv + ["--out", part], after=2)
    with open(os.path.join(part, "results.json")) as f:
        assert [(r["method"], r["scope"]) for r in json.load(f)["rows"]] == labels[:2]
    ran = []
    run_variant = fg.run_variant
    monkeypatch.setattr(fg, "run_variant", lambda *a, **k: ran.append(a[:2]) or run_variant(*a, **k))
    again = fg.main(argv + ["--out", part])
    assert ran == [("GA", 1)]  # only the missing row ran
    timing = ("time_s", "setup_s", "epoch_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing}
                        for r in json.loads(json.dumps(common._jsonable(rs)))]
    assert strip(again["rows"]) == strip(res["rows"])


# ----------------------------------------------------------------------------- seeds and claims

def test_between_run_difference_by_hand():
    runs = [{"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, {"a": 4.0, "b": 0.0}]
    # pairs: (0,1) mean(1, 0) = 0.5; (0,2) mean(3, 2) = 2.5; (1,2) mean(2, 2) = 2
    assert fg.between_run_difference(runs, ["a", "b"]) == pytest.approx(5 / 3)
    assert fg.between_run_difference(runs, ["a"]) == pytest.approx((1 + 3 + 2) / 3)
    assert np.isnan(fg.between_run_difference(runs[:1], ["a", "b"]))


def _synthetic_seed(seed, fgsm, gaps):
    """One model's result for one seed: ``fgsm`` and ``gaps`` ({method: per-layer gaps})."""
    rows = []
    for m, g in gaps.items():
        r = {"model": "net", "method": m, "scope": "full", "seed": seed, "forget_acc": 0.0,
             "retain_acc": 1.0, "test_acc": 0.9, "mia": 0.5, "mia_auc": 0.5,
             "fgsm_acc": fgsm[m], "pgd_acc": fgsm[m] / 2, "epoch_s": 1.0, "gaps": g,
             **fg.gap_summary(g, ["l1", "l2"])}
        fg.add_relative_robustness(r)
        rows.append(r)
    for r in rows:
        r["gap_shift"] = fg.gap_shift(r["gaps"], rows[0]["gaps"], ["l1", "l2"])
    return {"model": "net", "norm_layers": ["l1", "l2"], "last_k": 1, "rows": rows,
            "correlations": fg.correlations(rows)}


def test_a_variant_that_diverged_in_one_seed_leaves_the_seed_tables_and_is_named():
    fgsm = {"Original": 0.8, "Retrain": 0.8, "RL": 0.5, "SCRUB": 0.7}
    gaps = {m: {"l1": 1.0 + i, "l2": 2.0} for i, m in enumerate(fgsm)}
    by_seed = {s: [_synthetic_seed(s, fgsm, gaps)] for s in range(3)}
    res = by_seed[1][0]  # what run_model returns when RL's loss went NaN in seed 1
    res["rows"] = [r for r in res["rows"] if r["method"] != "RL"]
    res["diverged"] = ["RL: RL diverged: loss is nan in epoch 1"]
    a = fg.analyse(by_seed)
    assert a["diverged"] == ["seed 1, net, RL: RL diverged: loss is nan in epoch 1"]
    assert {r["method"] for r in a["models"]["net"]["table"]} == {"Original", "Retrain", "SCRUB"}
    assert not any(c["claim"].startswith("RL ") for c in a["paper_comparison"])


def test_analyse_checks_the_papers_claims_against_hand_computed_statistics():
    from experiments import stats

    fgsm = [{"Original": 0.8, "Retrain": 0.80, "CF": 0.79, "RL": 0.50, "BS": 0.6, "SCRUB": 0.70},
            {"Original": 0.8, "Retrain": 0.82, "CF": 0.81, "RL": 0.40, "BS": 0.5, "SCRUB": 0.72},
            {"Original": 0.8, "Retrain": 0.78, "CF": 0.78, "RL": 0.45, "BS": 0.7, "SCRUB": 0.80}]
    orig = [{"l1": 1.0, "l2": 2.0}, {"l1": 1.2, "l2": 2.0}, {"l1": 1.0, "l2": 2.4}]
    by_seed = {}
    for s in range(3):
        o = orig[s]
        gaps = {"Original": o, "Retrain": {"l1": o["l1"] + 0.01, "l2": o["l2"]},
                "CF": o, "RL": {"l1": o["l1"] + 1.0 + 0.1 * s, "l2": o["l2"] + 2.0},
                "BS": o, "SCRUB": {"l1": o["l1"] + 0.5, "l2": o["l2"]}}
        by_seed[s] = [_synthetic_seed(s, fgsm[s], gaps)]
    a = fg.analyse(by_seed)
    m = a["models"]["net"]
    # between-run difference of the originals: pairs (0,1) 0.1, (0,2) 0.2, (1,2) 0.3
    assert m["between_run_original"] == pytest.approx(0.2)
    rows = {r["method"]: r for r in m["table"]}
    d = np.array([0.50 - 0.80, 0.40 - 0.82, 0.45 - 0.78])
    assert rows["RL"]["fgsm_vs_retrain"]["diff"]["mean"] == pytest.approx(d.mean())
    assert rows["RL"]["fgsm_vs_retrain"]["wins"] == 0
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert rows["RL"]["fgsm_vs_retrain"]["diff"]["half"] == pytest.approx(half)
    drop = 100 * (1 - np.array([0.50 / 0.80, 0.40 / 0.82, 0.45 / 0.78]))
    assert rows["RL"]["fgsm_rel_drop"]["mean"] == pytest.approx(drop.mean())
    claims = {c["claim"].split(" (")[0]: c for c in a["paper_comparison"]}
    assert claims["RL loses FGSM accuracy against Retrain"]["holds"] is True
    assert claims["RL has a higher fairness-gap than Retrain"]["holds"] is True
    assert claims["SCRUB loses FGSM accuracy against Retrain"]["holds"] == "inconclusive"
    # CF: gap shift 0 < 0.2 and FGSM within the 5-point margin; BS: loses up to 32 points
    assert claims["CF preserves the fairness-gap and robustness"]["holds"] is True
    assert claims["BS preserves the fairness-gap and robustness"]["holds"] == "inconclusive"
    c1 = claims["Conjecture 1: exact unlearning keeps the original's fairness-gap"]
    assert c1["holds"] is True and "RL" in c1["ours"] and "SCRUB" in c1["ours"]
    per_seed = [r["correlations"]["all:gap_mean~fgsm_acc"] for res in by_seed.values() for r in res]
    want = stats.pooled_correlation([c["r"] for c in per_seed], [c["n"] for c in per_seed])
    assert m["conjecture2"]["all:gap_mean~fgsm_acc"]["r"] == pytest.approx(want["r"])
    assert all(set(c) == {"claim", "paper", "ours", "holds"} for c in a["paper_comparison"])
    text = fg.seed_report(a)
    assert "| RL | full |" in "\n".join(text)
