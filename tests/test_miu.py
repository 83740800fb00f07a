"""MIU (methods.miu): one update against a hand computation, the schedule, the quirk flags, errors.

The oracle is written here from the formulas (REFERENCE.md, De Min et al.): a hand-written MLP,
MINE statistic and Donsker-Varadhan bound, differentiated with plain jax.grad, on a tiny problem
(20 samples, 3 features, 2 classes x 2 sensitive values = 4 cells).
"""

import flax.linen as nn
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import models
from jaxunlearn import methods as M
from jaxunlearn import mutual_information as mi
MIU = importlib.import_module("jaxunlearn.methods.miu")  # the module; the package exports the factory as `miu`

N, D, H = 20, 3, 3
LR, LAM, DECAY = 0.1, 2.0, 0.99
KEY = jax.random.key(7)

rng = np.random.default_rng(0)
X = rng.normal(size=(N, D)).astype(np.float32)
Y = rng.integers(0, 2, N).astype(np.int32)
S = rng.integers(0, 2, N).astype(np.int32)
TUNE = {"x": X, "y": Y, "group": S}
MODEL = models.mlp(D, 2, hidden=(H,))
APPLY = MODEL.apply


def _vars(seed):
    return jax.tree.map(lambda a: a * 1.5, MODEL.init(jax.random.key(seed), X[:1]))


V0, V1, V2 = _vars(0), _vars(1), _vars(2)
FI, RI = np.arange(6), np.arange(6, 16)
WF = np.array([-1.0, -0.5, -1.0, -0.2, 0.0, -1.3], np.float32)
WR = np.array([1.0, 0.7, 1.3, 1.0, 0.0, 1.1, 0.9, 1.0, 1.2, 0.0], np.float32)


def _batch(idx, w, x=X):
    return {"x": jnp.asarray(x[idx]), "y": jnp.asarray(Y[idx]), "group": jnp.asarray(S[idx]),
            "weight": jnp.asarray(w), "index": jnp.asarray(idx, jnp.int32)}


FB, RB = _batch(FI, WF), _batch(RI, WR)


def _batches(epoch=0, forget_pass=0, fb=FB, rb=RB):
    """A batch pair as the loop builds it (forget marked with its pass); ``_epoch`` is moved into
    the state's ``epoch`` by :func:`_jit`, as ``loop.run`` does."""
    fb = {**fb, "pass": jnp.full(fb["weight"].shape, forget_pass, jnp.int32)}
    return {"forget": fb, "retain": rb, "_epoch": epoch}


def _method(**kw):
    args = dict(num_classes=2, num_sensitive=2, key=jax.random.key(3), lambda_mi=LAM,
                tune_steps_first=0, tune_steps_epoch=0, optimizer=optax.sgd(LR), mine_hidden=4,
                ema_decay=DECAY)
    args.update(kw)
    return MIU.miu(APPLY, TUNE, **args)


_JIT = {}


def _jit(method):
    """The jitted update of a method (one compilation per method object)."""
    if id(method) not in _JIT:
        _JIT[id(method)] = (method, jax.jit(method.update))
    jitted = _JIT[id(method)][1]

    def update(variables, state, batches, key):
        batches = dict(batches)
        epoch = batches.pop("_epoch", None)
        if epoch is not None:
            state = state._replace(epoch=jnp.int32(epoch))
        return jitted(variables, state, batches, key)

    return update


def _run(method, variables=V1, init_from=V0, batches=None, key=KEY):
    return _jit(method)(variables, method.init(init_from), batches or _batches(), key)


BASE = _method()  # shared by the tests below, so that it compiles once


# ----------------------------------------------------------------------------- the hand oracle

def h_feat(p, x):
    return jax.nn.relu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])


def h_ce(p, x, y):
    logits = h_feat(p, x) @ p["head"]["kernel"] + p["head"]["bias"]
    return -jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y]


def h_T(P, z, c):
    return (jax.nn.relu(jnp.concatenate([z, c], 1) @ P["w1"] + P["b1"]) @ P["w2"] + P["b2"])[:, 0]


def h_onehot(idx):
    return jax.nn.one_hot(S[idx] + 2 * Y[idx], 4)


def h_dv(P, z, c, cm, w):
    """Donsker-Varadhan bound with importance weights w."""
    return jnp.sum(w * h_T(P, z, c)) / jnp.sum(w) - jnp.log(jnp.sum(w * jnp.exp(h_T(P, z, cm))) / jnp.sum(w))


def h_surrogate(P, z, c, cm, w, ema):
    """The EMA-corrected objective: its gradient replaces E_batch[exp T] by the EMA."""
    return jnp.sum(w * h_T(P, z, c)) / jnp.sum(w) - jnp.sum(w * jnp.exp(h_T(P, z, cm))) / jnp.sum(w) / ema


def h_batch_exp(P, z, cm, w):
    return jnp.sum(w * jnp.exp(h_T(P, z, cm))) / jnp.sum(w)


def h_sgd(p, g, lr=LR):
    return jax.tree.map(lambda a, b: a - lr * b, p, g)


def _close(a, b, atol=2e-6, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- tests

@jax.jit
def hand_update(p0, P_u, P_o, key):
    """One MIU update by hand: (params, loss, MI_forget, MI_orig target, EMA_unl, EMA_orig)."""
    c_f, c_r = h_onehot(FI), h_onehot(RI)
    cm_f = mi.sample_marginal(jax.random.fold_in(key, 1), c_f, marginal="uniform")
    cm_r = mi.sample_marginal(jax.random.fold_in(key, 2), c_r, marginal="uniform")
    a = -jnp.asarray(WF)  # forget importance weights
    w = jnp.asarray(WR)
    # Forget step: descend on the EMA-corrected MI_unl(z_f, g_f); the EMA starts at 1.
    mi_forget = h_dv(P_u, h_feat(p0, FB["x"]), c_f, cm_f, a)
    g_f = jax.grad(lambda p: h_surrogate(P_u, h_feat(p, FB["x"]), c_f, cm_f, a, 1.0))(p0)
    p1 = h_sgd(p0, g_f)
    ema1 = DECAY * 1.0 + (1 - DECAY) * h_batch_exp(P_u, h_feat(p0, FB["x"]), cm_f, a)
    # Retain step: CE + LAM (MI_unl - stopgrad MI_orig)^2, gradient through the EMA surrogate.
    z_o = h_feat(V0["params"], RB["x"])
    target = h_dv(P_o, z_o, c_r, cm_r, w)
    ce = lambda p: jnp.sum(w * h_ce(p, RB["x"], RB["y"])) / np.count_nonzero(WR)
    mi_r = h_dv(P_u, h_feat(p1, RB["x"]), c_r, cm_r, w)
    g_ce = jax.grad(ce)(p1)
    g_mi = jax.grad(lambda p: h_surrogate(P_u, h_feat(p, RB["x"]), c_r, cm_r, w, ema1))(p1)
    g_r = jax.tree.map(lambda u, v: u + 2 * LAM * (mi_r - target) * v, g_ce, g_mi)
    p2 = h_sgd(p1, g_r)
    loss = ce(p1) + LAM * (mi_r - target) ** 2
    ema_u = DECAY * ema1 + (1 - DECAY) * h_batch_exp(P_u, h_feat(p1, RB["x"]), cm_r, w)
    ema_o = DECAY * 1.0 + (1 - DECAY) * h_batch_exp(P_o, z_o, cm_r, w)
    return p2, loss, mi_forget, target, (mi_r - target) ** 2, ema_u, ema_o


def test_one_update_matches_hand_computation():
    state0 = BASE.init(V0)
    out, state, m = _run(BASE, batches=_batches(epoch=1))
    P_u = state0.extra["estimator_unlearned"].params
    P_o = state0.extra["estimator_original"].params
    p2, loss, mi_forget, target, calib, ema_u, ema_o = hand_update(V1["params"], P_u, P_o, KEY)
    _close(out["params"], p2)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(m["mi_forget"], mi_forget, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["mi_original"], target, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["calibration"], calib, rtol=1e-4, atol=1e-8)
    assert float(m["forget_step"]) == 1.0
    np.testing.assert_allclose(state.extra["estimator_unlearned"].ema, ema_u, rtol=1e-5)
    np.testing.assert_allclose(state.extra["estimator_original"].ema, ema_o, rtol=1e-5)
    # Estimators are frozen outside the tuning phases (estimator_updates="tuning").
    _close(state.extra["estimator_unlearned"].params, P_u, atol=0, rtol=0)
    _close(state.extra["estimator_original"].params, P_o, atol=0, rtol=0)
    MIU.check_estimators(state)


def test_forget_step_only_in_the_first_forget_epochs():
    method = BASE  # forget_epochs=5
    other = _batch(FI, WF, x=X[::-1].copy())  # different forget inputs
    for epoch, fpass, active in ((4, 0, True), (5, 0, False), (0, 1, False)):
        v_a, _, m = _run(method, batches=_batches(epoch=epoch, forget_pass=fpass))
        v_b, _, _ = _run(method, batches=_batches(epoch=epoch, forget_pass=fpass, fb=other))
        assert float(m["forget_step"]) == float(active)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v_a), jax.tree.leaves(v_b)))
        assert same != active  # the forget data matter exactly when the forget step runs


FIX = _method(tune_steps_first=3, tune_steps_epoch=1)  # T_orig on original features (default)
QUIRK = _method(tune_steps_first=3, tune_steps_epoch=1, original_estimator_features="unlearned")


def test_tuning_schedule_first_epoch_then_per_epoch():
    state = FIX.init(V0)
    counts = []
    for epoch, fpass in ((0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (2, 0)):
        _, state, m = _jit(FIX)(V1, state, _batches(epoch=epoch, forget_pass=fpass), KEY)
        counts.append(int(m["tune_steps"]))
    assert counts == [3, 0, 0, 1, 0, 1]  # tune_steps_first before unlearning, then per epoch
    assert int(state.extra["estimator_unlearned"].step) == 5
    assert int(state.extra["estimator_original"].step) == 5


def test_original_estimator_is_tuned_on_original_features():
    est = lambda out: out[1].extra["estimator_original"].params
    # Tuned on the original model's features: independent of the unlearned model's weights ...
    _close(est(_run(FIX, variables=V1)), est(_run(FIX, variables=V2)), atol=0, rtol=0)
    # ... and equal to the reference's estimator when the unlearned model still is the original.
    _close(est(_run(FIX, variables=V1)), est(_run(QUIRK, variables=V0)), atol=1e-6)
    # The reference's quirk tunes it on the unlearned model's features.
    diff = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(est(_run(QUIRK, variables=V1))),
                                                 jax.tree.leaves(est(_run(QUIRK, variables=V2))))]
    assert max(diff) > 1e-4


def test_every_step_flag_adds_one_ascent_step_on_the_retain_batch():
    # (estimator_updates="tuning" leaves them unchanged: test_one_update_matches_hand_computation)
    mine_tx = optax.sgd(0.05)
    moving = _method(forget_epochs=0, mine_optimizer=mine_tx, estimator_updates="every_step")
    s0 = moving.init(V0)
    _, s_moving, _ = _run(moving)
    step = jax.jit(mi.make_mine_step(mine_tx, ema_decay=DECAY, marginal="uniform"))
    k = jax.random.fold_in(KEY, 3)
    c_r = h_onehot(RI)
    exp_u, _ = step(s0.extra["estimator_unlearned"], h_feat(V1["params"], RB["x"]), c_r,
                    jax.random.fold_in(k, 0), RB["weight"])
    exp_o, _ = step(s0.extra["estimator_original"], h_feat(V0["params"], RB["x"]), c_r,
                    jax.random.fold_in(k, 1), RB["weight"])
    _close(s_moving.extra["estimator_unlearned"].params, exp_u.params, atol=1e-6)
    _close(s_moving.extra["estimator_original"].params, exp_o.params, atol=1e-6)


def test_diverging_estimate_freezes_the_model_and_is_reported():
    state = FIX.init(V0)
    # Exploding features (as from a blown-up model) make the tuning estimates non-finite.
    state = state._replace(extra={**state.extra, "tune_x": state.extra["tune_x"] * 1e30})
    out, state, m = _jit(FIX)(V1, state, _batches(), KEY)
    assert bool(state.extra["diverged"])
    assert np.isnan(float(m["loss"]))  # loop.run stops on it
    _close(out, V1, atol=0, rtol=0)
    with pytest.raises(mi.MIDivergenceError, match="diverged"):
        MIU.check_estimators(state)


def test_batchnorm_model_updates_its_statistics():
    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, mask=None):
            h = nn.Dense(4)(x)
            m = None if mask is None else mask[:, None]
            h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(h, mask=m))
            return nn.Dense(2, name="head")(h), h

    model = models.from_linen(BNNet(), (D,), 2, uses_mask=True)
    v0 = model.init(jax.random.key(0), X[:2])
    method = MIU.miu(model.apply, TUNE, num_classes=2, num_sensitive=2, key=jax.random.key(1),
                     tune_steps_first=0, tune_steps_epoch=0, mine_hidden=8)
    out, state, m = _jit(method)(v0, method.init(v0), _batches(), KEY)
    assert np.isfinite(float(m["loss"]))
    moved = np.abs(out["batch_stats"]["BatchNorm_0"]["mean"] - v0["batch_stats"]["BatchNorm_0"]["mean"])
    assert moved.max() > 0
    _close(state.extra["original"], v0, atol=0, rtol=0)  # the original model is never touched


def test_bad_input():
    with pytest.raises(ValueError, match="original_estimator_features"):
        _method(original_estimator_features="both")
    with pytest.raises(ValueError, match="estimator_updates"):
        _method(estimator_updates="sometimes")
    with pytest.raises(ValueError, match="group"):
        MIU.miu(APPLY, {"x": X, "y": Y}, num_classes=2, num_sensitive=2, key=KEY)
    with pytest.raises(ValueError, match="groups in"):
        MIU.miu(APPLY, {"x": X, "y": Y, "group": S + 1}, num_classes=2, num_sensitive=2, key=KEY)
    with pytest.raises(ValueError, match="forget_epochs"):
        _method(forget_epochs=-1)
    no_group = {k: v for k, v in RB.items() if k != "group"}
    with pytest.raises(ValueError, match="retain batch has no 'group'"):
        _run(BASE, batches=_batches(rb=no_group))
    # A positive forget weight has no meaning for MI minimisation: the step is skipped, reported.
    v, state, m = _run(BASE, batches=_batches(fb=_batch(FI, -WF)))
    assert float(m["forget_step"]) == 0.0
    with pytest.raises(ValueError, match="positive weight"):
        MIU.check_estimators(state)
