"""Metrics against hand computations, plain numpy and brute force."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import metrics as M
from jaxunlearn import models

def random_variables(model, input_shape, seed):
    """Variables of the right structure drawn with numpy: avoids compiling model.init."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + input_shape))
    rng = np.random.default_rng(seed)
    v = jax.tree_util.tree_map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    v = dict(v)
    if "batch_stats" in v:  # running variances must be positive
        v["batch_stats"] = {k: {**st, "var": np.abs(st["var"]) + 0.5} for k, st in v["batch_stats"].items()}
    return v


# Hand-made example: two sensitive groups of four samples.
#   s = 0: y = 1 1 0 0, pred = 1 0 1 0 -> P(yhat=1) 1/2, TPR 1/2, acc(y=0) 1/2, acc(y=1) 1/2
#   s = 1: y = 1 1 0 0, pred = 1 0 0 0 -> P(yhat=1) 1/4, TPR 1/2, acc(y=0) 1,   acc(y=1) 1/2
Y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
PRED = np.array([1, 0, 1, 0, 1, 0, 0, 0])
S = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_hand_example():
    assert M.accuracy(PRED, Y) == pytest.approx(5 / 8)
    assert M.group_accuracy(PRED, Y, S) == pytest.approx({0: 0.5, 1: 0.75})
    assert M.worst_group_accuracy(PRED, Y, S) == pytest.approx(0.5)
    assert M.demographic_parity(PRED, S) == pytest.approx(0.25 - 0.5)
    assert M.demographic_parity(PRED, S, absolute=True) == pytest.approx(0.25)
    assert M.equal_opportunity(PRED, Y, S) == pytest.approx(0.0)
    assert M.equalized_odds(PRED, Y, S) == pytest.approx((0.0 + 0.5) / 2)


def test_padding_ids_and_logits():
    # weight-0 rows that would change every metric are ignored
    pad_y, pad_p, pad_s = np.array([1, 1, 0]), np.array([0, 0, 1]), np.array([1, 1, 1])
    y, p, s = np.r_[Y, pad_y], np.r_[PRED, pad_p], np.r_[S, pad_s]
    w = np.r_[np.ones(8), np.zeros(3)]
    assert M.demographic_parity(p, s, weight=w) == pytest.approx(-0.25)
    assert M.equalized_odds(p, y, s, weight=w) == pytest.approx(0.25)
    assert M.group_accuracy(p, y, s, weight=w) == pytest.approx({0: 0.5, 1: 0.75})
    # arbitrary group ids: ascending order, signed gap = larger id minus smaller id
    ids = np.where(S == 0, 7, -3)
    assert M.demographic_parity(PRED, ids) == pytest.approx(0.5 - 0.25)
    assert M.group_accuracy(PRED, Y, ids) == pytest.approx({7: 0.5, -3: 0.75})
    # logits: one binary logit, or two
    z = np.where(PRED == 1, 2.0, -2.0)[:, None]
    assert M.demographic_parity(z, S) == pytest.approx(-0.25)
    assert M.equal_opportunity(np.c_[np.zeros(8), z[:, 0]], Y, S) == pytest.approx(0.0)


def test_multigroup_and_multiclass():
    rng = np.random.default_rng(0)
    n = 300
    y, p, g = rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(0, 4, n)
    rates = [p[g == k].mean() for k in range(4)]
    assert M.demographic_parity(p, g) == pytest.approx(max(rates) - min(rates))
    tpr = [p[(g == k) & (y == 1)].mean() for k in range(4)]
    assert M.equal_opportunity(p, y, g) == pytest.approx(max(tpr) - min(tpr))
    acc = {(k, t): (p == y)[(g == k) & (y == t)].mean() for k in range(4) for t in range(2)}
    eo = np.mean([abs(acc[a, t] - acc[b, t]) for t in range(2) for a, b in itertools.combinations(range(4), 2)])
    assert M.equalized_odds(p, y, g) == pytest.approx(eo)
    # three classes, reference-style binarised target {2} vs {0, 1}
    y3, p3, s2 = rng.integers(0, 3, n), rng.integers(0, 3, n), rng.integers(0, 2, n)
    cell = lambda s, ts: (p3 == y3)[(s2 == s) & np.isin(y3, ts)].mean()  # noqa: E731
    want = (abs(cell(0, [0, 1]) - cell(1, [0, 1])) + abs(cell(0, [2]) - cell(1, [2]))) / 2
    assert M.equalized_odds(p3, y3, s2, target_partition=[[0, 1], [2]]) == pytest.approx(want)
    worst = min((p3 == y3)[s2 == k].mean() for k in range(2))
    assert M.worst_group_accuracy(p3, y3, s2) == pytest.approx(worst)


def test_fairness_weights_are_sample_weights_like_fairlearn():
    fl = pytest.importorskip("fairlearn.metrics")
    rng = np.random.default_rng(0)
    n = 400
    y, pred, s = rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
    w = rng.uniform(0.1, 3.0, n)
    w[:20] = 0.0  # padding rows still drop out
    dp = M.demographic_parity(pred, s, weight=w, absolute=True)
    assert dp == pytest.approx(fl.demographic_parity_difference(y, pred, sensitive_features=s,
                                                                sample_weight=w), rel=1e-12)
    frame = fl.MetricFrame(metrics=fl.true_positive_rate, y_true=y, y_pred=pred, sensitive_features=s,
                           sample_params={"sample_weight": w})
    assert M.equal_opportunity(pred, y, s, weight=w, absolute=True) == pytest.approx(frame.difference(), rel=1e-12)
    # signed: s = 1 minus s = 0 of the weighted rates; integer weights = repeated rows
    reps = rng.integers(0, 4, n)
    assert M.demographic_parity(pred, s, weight=reps) == pytest.approx(
        M.demographic_parity(np.repeat(pred, reps), np.repeat(s, reps)), rel=1e-12)
    assert M.equalized_odds(pred, y, s, weight=reps) == pytest.approx(
        M.equalized_odds(np.repeat(pred, reps), np.repeat(y, reps), np.repeat(s, reps)), rel=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        M.demographic_parity(pred, s, weight=-w)


def test_fairness_errors():
    with pytest.raises(ValueError, match="group labels"):
        M.demographic_parity(PRED, None)
    with pytest.raises(ValueError, match="group labels"):
        M.group_accuracy(PRED, Y, None)
    no_pos = Y.copy()
    no_pos[S == 1] = 0
    with pytest.raises(ValueError, match="group 1 has no positive labels"):
        M.equal_opportunity(PRED, no_pos, S)
    with pytest.raises(ValueError, match="at least 2 groups"):
        M.demographic_parity(PRED, np.zeros(8, int))
    with pytest.raises(ValueError, match="binary"):
        M.demographic_parity(np.array([0, 2, 1, 0]), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="binary model"):
        M.demographic_parity(np.zeros((4, 3)), np.array([0, 0, 1, 1]))
    counts = np.asarray(M.confusion_counts(PRED, no_pos, group=S, num_classes=2, num_groups=2))
    with pytest.raises(ValueError, match=r"cell \(group 1, target \[1\]\) has no samples"):
        M.equalized_odds_from_counts(counts)
    with pytest.raises(ValueError, match=r"group\(s\) \[2\] have no samples"):
        M.group_accuracy_from_counts(np.asarray(M.confusion_counts(PRED, Y, group=S, num_classes=2,
                                                                   num_groups=3)))


def test_counts_stream_and_shard():
    """Counts summed over batches, or computed on 8 sharded devices, equal the host computation."""
    rng = np.random.default_rng(1)
    n = 64
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    y, g = rng.integers(0, 3, n), rng.integers(0, 2, n)
    w = (rng.random(n) > 0.2).astype(np.float32)
    f = jax.jit(lambda lo, y, g, w: M.confusion_counts(lo, y, group=g, weight=w, num_classes=3, num_groups=2))
    streamed = sum(np.asarray(f(logits[i:i + 16], y[i:i + 16], g[i:i + 16], w[i:i + 16])) for i in range(0, n, 16))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, shard) for a in (logits, y, g, w)]
    sharded = np.asarray(f(*args))
    pred = logits.argmax(1)
    want = np.zeros((2, 3, 3))
    for i in range(n):
        if w[i]:
            want[g[i], y[i], pred[i]] += 1
    np.testing.assert_array_equal(streamed, want)
    np.testing.assert_array_equal(sharded, want)
    keep = w != 0
    assert M.accuracy_from_counts(want) == pytest.approx(M.accuracy(logits[keep], y[keep]))
    assert M.equalized_odds_from_counts(want) == pytest.approx(M.equalized_odds(logits, y, g, weight=w))


def test_count_predictions_loop():
    model = models.logistic_regression(3, 1)
    variables = random_variables(model, (3,), 0)
    rng = np.random.default_rng(2)
    split = {"x": rng.normal(size=(37, 3)).astype(np.float32), "y": rng.integers(0, 2, 37),
             "group": rng.integers(0, 2, 37)}
    counts = M.count_predictions(model.apply, variables, split, num_classes=2, num_groups=2, batch_size=8)
    logits = np.asarray(model.apply(variables, split["x"])[0])
    assert counts.sum() == 37
    assert M.demographic_parity_from_counts(counts) == pytest.approx(M.demographic_parity(logits, split["group"]))
    # MIA on the model's own scores (train.predict path) equals mia() on hand-computed scores
    half = {k: v[:20] for k, v in split.items()}
    rest = {k: v[20:] for k, v in split.items()}
    got = M.mia_from_model(model.apply, variables, half, rest, rest, batch_size=8)
    sc = lambda d: M.membership_scores(np.asarray(model.apply(variables, d["x"])[0]), d["y"])  # noqa: E731
    want = M.mia(sc(half), sc(rest), sc(rest))
    assert got == pytest.approx(want, rel=1e-5)
    assert got["auc"] == pytest.approx(0.5)  # forget = held-out set: indistinguishable
    with pytest.raises(ValueError, match="group labels missing"):
        M.count_predictions(model.apply, variables, {"x": split["x"], "y": split["y"]}, num_classes=2,
                            num_groups=2)
    with pytest.raises(ValueError, match="outside"):
        M.count_predictions(model.apply, variables, split, num_classes=2, num_groups=1)


# ----------------------------------------------------------------------------- fairness-gap

def numpy_gap(acts, y, classes, per_channel=False):
    """sigma_c = mean over features of the per-feature variance over class-c samples (float64)."""
    sig = []
    for c in classes:
        a = np.asarray(acts, np.float64)[y == c]
        a = a.reshape(-1, a.shape[-1]) if per_channel else a.reshape(a.shape[0], -1)
        sig.append(a.var(axis=0).mean())
    return max(sig) - min(sig), np.array(sig)


@pytest.mark.parametrize("per_channel", (False, True))
def test_fairness_gap_streaming_matches_numpy(per_channel):
    rng = np.random.default_rng(3)
    n, k = 70, 3
    y = rng.integers(0, k, n)
    # large offsets (|mean| >> std) would break a sum-of-squares accumulator in float32
    acts = {"dense": 100.0 + rng.normal(size=(n, 6)) * (1 + y[:, None]),
            "conv": -50.0 + rng.normal(size=(n, 3, 3, 2)) * (1 + 0.5 * y[:, None, None, None])}
    acts = {k_: v.astype(np.float32) for k_, v in acts.items()}
    init = M.fairness_gap_init(acts, num_classes=k, per_channel=per_channel)
    update = jax.jit(lambda s, a, y, w: M.fairness_gap_update(s, a, y, w, per_channel=per_channel))
    b = 16
    parts = []  # batches 0-1 and 2-4 accumulated separately, then merged
    for start, stop in ((0, 32), (32, n)):
        stats = init
        for i in range(start, stop, b):  # pad the last batch with garbage rows of weight 0
            idx = np.arange(i, i + b)
            w = (idx < n).astype(np.float32)
            idx = np.where(idx < n, idx, 0)
            batch = {k_: np.where(w.reshape((-1,) + (1,) * (v.ndim - 1)) > 0, v[idx], 1e4)
                     for k_, v in acts.items()}
            stats = update(stats, batch, y[idx], w)
        parts.append(stats)
    stats = M.fairness_gap_merge(*parts)
    gaps = M.fairness_gap_finalize(stats)
    variances = M.class_variances(stats)
    for name, a in acts.items():
        want, sig = numpy_gap(a, y, range(k), per_channel)
        np.testing.assert_allclose(variances[name], sig, rtol=1e-4)
        assert gaps[name] == pytest.approx(want, rel=1e-4)


def test_fairness_gap_sharded_equals_single_device():
    rng = np.random.default_rng(4)
    acts = {"ln": rng.normal(size=(32, 5)).astype(np.float32)}
    y = rng.integers(0, 2, 32)
    w = np.ones(32, np.float32)
    update = jax.jit(lambda s, a, y, w: M.fairness_gap_update(s, a, y, w))
    init = M.fairness_gap_init(acts, num_classes=2)
    single = update(init, acts, y, w)
    shard = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), P("data"))
    sharded = update(init, jax.device_put(acts, shard), jax.device_put(y, shard), jax.device_put(w, shard))
    for key in ("count", "mean", "m2"):
        np.testing.assert_allclose(np.asarray(single["ln"][key]), np.asarray(sharded["ln"][key]), rtol=1e-5, atol=1e-5)


class NormNet(nn.Module):
    """Tiny conv net with a BatchNorm on 4-D features and a LayerNorm on 2-D features."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.BatchNorm(use_running_average=not train, name="bn")(h, mask=None if mask is None else mask[:, None, None, None])
        h = nn.relu(h).reshape((x.shape[0], -1))
        h = nn.LayerNorm(name="ln")(nn.Dense(6, name="dense")(h))
        return nn.Dense(3, name="head")(h), h


def test_fairness_gap_model_loop():
    model = models.from_linen(NormNet(), (5, 5, 2), 3, uses_mask=True)
    variables = random_variables(model, (5, 5, 2), 1)  # random running statistics: not centred
    rng = np.random.default_rng(5)
    split = {"x": rng.normal(size=(45, 5, 5, 2)).astype(np.float32), "y": rng.integers(0, 3, 45)}
    gaps = M.fairness_gap(model.apply, variables, split, num_classes=3, batch_size=16)
    _, aux = jax.jit(lambda v, x: model.apply(v, x, capture_norm=True))(variables, split["x"])
    assert set(gaps) == set(aux["norm"]) == {"bn", "ln"}
    for name, a in aux["norm"].items():
        assert gaps[name] == pytest.approx(numpy_gap(a, split["y"], range(3))[0], rel=1e-4, abs=1e-7)
    # a retain set without class 2 (class-wise forgetting)
    keep = split["y"] != 2
    retain = {k: v[keep] for k, v in split.items()}
    stats = M.fairness_gap_stats(model.apply, variables, retain, num_classes=3, batch_size=16)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no samples"):
        M.fairness_gap_finalize(stats)
    part = M.fairness_gap_finalize(stats, classes=[0, 1])
    for name, a in aux["norm"].items():
        want = numpy_gap(np.asarray(a)[keep], split["y"][keep], (0, 1))[0]
        assert part[name] == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_fairness_gap_no_norm_layers():
    model = models.mlp(4, 2, hidden=(3,))
    variables = random_variables(model, (4,), 2)
    split = {"x": np.zeros((6, 4), np.float32), "y": np.array([0, 1] * 3)}
    with pytest.raises(ValueError, match="no normalisation outputs"):
        M.fairness_gap(model.apply, variables, split, num_classes=2)


# ----------------------------------------------------------------------------- MIA

def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(6)
    pos = rng.integers(0, 6, 40).astype(float)  # many ties
    neg = rng.integers(0, 5, 55).astype(float)
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert M.roc_auc(pos, neg) == pytest.approx(brute)
    assert M.roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert M.roc_auc([0.0], [1.0]) == 0.0


def test_threshold_attack_is_the_best_threshold():
    rng = np.random.default_rng(7)
    mem = rng.normal(1.0, 1.0, 50)
    non = rng.normal(0.0, 1.0, 30)
    for balanced in (True, False):
        attack = M.fit_threshold_attack(mem, non, balanced=balanced)
        best = 0.0
        for t in np.concatenate([mem, non, [-np.inf]]):  # predict member iff score > t
            tpr, tnr = (mem > t).mean(), (non <= t).mean()
            acc = (tpr + tnr) / 2 if balanced else ((mem > t).sum() + (non <= t).sum()) / 80
            best = max(best, acc)
        assert attack.accuracy == pytest.approx(best)
        got_tpr, got_tnr = (mem > attack.threshold).mean(), (non <= attack.threshold).mean()
        assert ((got_tpr + got_tnr) / 2 if balanced else (got_tpr * 50 + got_tnr * 30) / 80) == pytest.approx(best)


def test_mia_protocol():
    retain = np.array([-0.1, -0.2, -0.05, -0.3])          # members: low loss
    test = np.array([-2.0, -1.5, -3.0, -2.5])             # non-members: high loss
    forgotten = np.array([-2.2, -1.8, -0.15])             # two look unseen, one still member-like
    out = M.mia(retain, test, forgotten)
    assert out["attack_accuracy"] == 1.0 and out["attack_auc"] == 1.0
    assert out["forget_nonmember_rate"] == pytest.approx(2 / 3)
    brute = np.mean([(f > t) + 0.5 * (f == t) for f in forgotten for t in test])
    assert out["auc"] == pytest.approx(brute)
    # loss scores are the negative cross-entropy
    logits = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    y = np.array([0, 0])
    l64 = logits.astype(np.float64)
    ce = -np.log(np.exp(l64[np.arange(2), y]) / np.exp(l64).sum(1))
    np.testing.assert_allclose(M.membership_scores(logits, y), -ce, rtol=1e-5)
    np.testing.assert_allclose(M.membership_scores(logits, y, kind="confidence"), np.exp(-ce), rtol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        M.mia(retain, test, np.array([np.nan]))


# ----------------------------------------------------------------------------- summaries

def test_avg_gap_and_tow():
    unl = {"retain_accuracy": 0.95, "forget_accuracy": 0.80, "test_accuracy": 0.90, "mia": 0.40,
           "eo": 0.10, "group_accuracy": 0.70}
    ret = {"retain_accuracy": 0.97, "forget_accuracy": 0.75, "test_accuracy": 0.91, "mia": 0.50,
           "eo": 0.05, "group_accuracy": 0.85}
    assert M.avg_gap(unl, ret) == pytest.approx((0.02 + 0.05 + 0.01 + 0.10 + 0.05 + 0.15) / 6)
    assert M.tow(unl, ret) == pytest.approx(0.98 * 0.95 * 0.99)
    pct = {k: 100 * v for k, v in unl.items()}, {k: 100 * v for k, v in ret.items()}
    assert M.tow(*pct, scale=100) == pytest.approx(0.98 * 0.95 * 0.99)
    assert M.avg_gap(*pct) == pytest.approx(100 * M.avg_gap(unl, ret))
    assert M.tow(ret, ret) == 1.0 and M.avg_gap(ret, ret) == 0.0
    with pytest.raises(ValueError, match="lack 'eo'"):
        M.avg_gap({k: v for k, v in unl.items() if k != "eo"}, ret)
    with pytest.raises(ValueError, match="scale=100"):
        M.tow(*pct)
