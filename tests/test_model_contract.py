"""The model contract (models/api.py) met by a plain function, Linen, NNX and Equinox models.

The oracle is cross-framework agreement: one network (Dense -> LayerNorm -> tanh -> Dense) written
four ways and started from the same parameters must give the same logits, features and
normalisation outputs, the same training trajectory through ``loop.run(methods.train(...))``, the
same unlearning trajectory through ``loop.run`` of a method and the same influence scores (scores are invariant to
the Equinox weight layout, a transpose).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from typing import NamedTuple

from jaxunlearn import evaluation, influence, loop, methods, models, weights

eqx = pytest.importorskip("equinox")

D, H, K, N = 5, 8, 3, 40
EPS = 1e-5


def _data(n=N, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return {"x": x, "y": y}


# --- one network, four ways ------------------------------------------------------------------

class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.LayerNorm(epsilon=EPS, name="ln")(nn.Dense(H, name="hidden")(x)))
        return nn.Dense(K, name="head")(h), h


def plain_fn(params, x):
    z = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    z = (z - mu) / jnp.sqrt(var + EPS) * params["ln"]["scale"] + params["ln"]["bias"]
    h = jnp.tanh(z)
    return h @ params["head"]["kernel"] + params["head"]["bias"], h


class NnxNet(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(D, H, rngs=rngs)
        self.ln = nnx.LayerNorm(H, epsilon=EPS, rngs=rngs)
        self.head = nnx.Linear(H, K, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.ln(self.hidden(x)))
        return self.head(h), h


class EqxNet(eqx.Module):
    hidden: eqx.nn.Linear
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(D, H, key=k1)
        self.ln = eqx.nn.LayerNorm(H, eps=EPS)
        self.head = eqx.nn.Linear(H, K, key=k2)

    def __call__(self, x):  # one example
        h = jnp.tanh(self.ln(self.hidden(x)))
        return self.head(h), h


def to_eqx(p):
    """Linen/NNX parameter dict -> the Equinox adapter's (weight = kernel^T, LayerNorm weight)."""
    return {"hidden": {"weight": p["hidden"]["kernel"].T, "bias": p["hidden"]["bias"]},
            "ln": {"weight": p["ln"]["scale"], "bias": p["ln"]["bias"]},
            "head": {"weight": p["head"]["kernel"].T, "bias": p["head"]["bias"]}}


def from_eqx(p):
    return {"hidden": {"kernel": p["hidden"]["weight"].T, "bias": p["hidden"]["bias"]},
            "ln": {"scale": p["ln"]["weight"], "bias": p["ln"]["bias"]},
            "head": {"kernel": p["head"]["weight"].T, "bias": p["head"]["bias"]}}


@pytest.fixture(scope="module")
def four():
    """``{kind: (model, params_in_its_layout, back_to_linen_layout)}`` with equal parameters."""
    linen = models.from_linen(LinenNet(), (D,), K)
    p = linen.init(jax.random.key(0), jnp.zeros((1, D)))["params"]
    # non-trivial LayerNorm parameters, so that a dropped scale/bias would show
    p = {**p, "ln": {"scale": 1 + 0.1 * jnp.arange(H, dtype=jnp.float32),
                     "bias": 0.05 * jnp.arange(H, dtype=jnp.float32)}}
    ident = lambda q: q  # noqa: E731
    return {
        "function": (models.from_function(plain_fn, p, input_shape=(D,)), p, ident),
        "linen": (linen, p, ident),
        "nnx": (models.from_nnx(lambda rngs: NnxNet(rngs=rngs), (D,), K), p, ident),
        "equinox": (models.from_equinox(lambda key: EqxNet(key), input_shape=(D,),
                                        num_outputs=K), to_eqx(p), from_eqx),
    }


KINDS = ["function", "linen", "nnx", "equinox"]


def _allclose(a, b, tol=2e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b)


# --- the contract itself ---------------------------------------------------------------------

def test_adapters_init_structure(four):
    x = jnp.zeros((2, D))
    for kind in KINDS:
        model, p, _ = four[kind]
        v = model.init(jax.random.key(1), x)
        assert set(v) == {"params"}, kind
        assert jax.tree.structure(v["params"]) == jax.tree.structure(p), kind
    assert four["function"][0].num_outputs == K  # inferred with eval_shape
    assert models.block_names(four["equinox"][1]) == ["hidden", "ln", "head"]


@pytest.mark.parametrize("kind", KINDS)
def test_full_contract_same_outputs(four, kind):
    x = jnp.asarray(_data(6)["x"])
    ref_logits, ref_feat = plain_fn(four["linen"][1], x)
    model, p, _ = four[kind]
    mask = jnp.array([True] * 4 + [False] * 2)
    f = jax.jit(lambda v, x: (model.apply(v, x, train=True, mask=mask, capture_norm=True),
                              model.apply(v, x)))
    (logits, aux), (logits_eval, aux_eval) = f({"params": p}, x)
    _allclose(logits, ref_logits)
    _allclose(logits_eval, ref_logits)
    _allclose(aux["features"], ref_feat)
    assert aux["model_state"] == {} and aux_eval["model_state"] == {}
    assert "norm" not in aux_eval
    if kind == "function":
        assert aux["norm"] == {}  # a plain function declares no normalisation layers
    else:
        assert list(aux["norm"]) == ["ln"]
        z = x @ p_linen(four)["hidden"]["kernel"] + p_linen(four)["hidden"]["bias"]
        ln = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + EPS)
        _allclose(aux["norm"]["ln"], ln * p_linen(four)["ln"]["scale"] + p_linen(four)["ln"]["bias"])
    with pytest.raises(ValueError, match="expects inputs"):
        model.apply({"params": p}, jnp.zeros((2, D + 1)))


def p_linen(four):
    return four["linen"][1]


# --- through the library: fit, an unlearning method, influence -------------------------------

class _Trained(NamedTuple):
    variables: dict

    @property
    def params(self):
        return self.variables["params"]

    @property
    def model_state(self):
        return {k: v for k, v in self.variables.items() if k != "params"}


def _fit(model, p, split, *, weight=None, epochs=3, batch_size=16, key=3, tx=None):
    tx = tx or optax.adam(1e-2)
    model_state = {k: v for k, v in model.init(jax.random.key(0), jnp.asarray(split["x"][:1])).items()
                   if k != "params"}
    split = split if weight is None else {**split, "weight": weight}
    variables, _, hist = loop.run(methods.train(model.apply, tx, l2=1e-3), {"params": p, **model_state},
                                  {"train": split}, batch_size=batch_size, epochs=epochs,
                                  key=jax.random.key(key), progress=False)
    return _Trained(variables), hist


@pytest.fixture(scope="module")
def trained(four):
    split = _data()
    return {kind: _fit(four[kind][0], four[kind][1], split) for kind in KINDS}


def test_fit_same_trajectory(four, trained):
    ref_state, ref_hist = trained["linen"]
    assert ref_hist[-1]["loss"] < ref_hist[0]["loss"]
    for kind in KINDS:
        state, hist = trained[kind]
        np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist],
                                   rtol=1e-5, err_msg=kind)
        _allclose(four[kind][2](state.params), ref_state.params, tol=1e-4)
        # evaluation and prediction through the same contract
        ev = evaluation.evaluate(four[kind][0].apply, state.variables, _data(12, seed=1))
        ev_ref = evaluation.evaluate(four["linen"][0].apply, ref_state.variables, _data(12, seed=1))
        np.testing.assert_allclose(ev["loss"], ev_ref["loss"], rtol=1e-4, err_msg=kind)


def test_unlearning_method_same_trajectory(four, trained):
    data = _data()
    sets = weights.unlearning_sets(data, weights.removal_eps(len(data["y"]), np.arange(8)))
    out = {}
    for kind in KINDS:
        model, _, back = four[kind]
        variables, _, hist = loop.run(
            methods.neggrad_plus(model.apply), trained[kind][0].variables, sets,
            epochs=2, batch_size=8, key=jax.random.key(4), progress=False)
        out[kind] = (back(variables["params"]), [h["loss"] for h in hist])
    for kind in KINDS:
        _allclose(out[kind][0], out["linen"][0], tol=1e-4)
        np.testing.assert_allclose(out[kind][1], out["linen"][1], rtol=1e-4, err_msg=kind)
    # the method moved the parameters
    assert not np.allclose(out["linen"][0]["head"]["kernel"],
                           trained["linen"][0].params["head"]["kernel"])


@pytest.mark.slow  # four compilations of the influence solve (~20 s each on 2 shared cores)
def test_influence_scores_agree(four, trained):
    data = _data()
    batch = {"x": jnp.asarray(data["x"]), "y": jnp.asarray(data["y"])}
    val = {k: jnp.asarray(v) for k, v in _data(16, seed=2).items()}
    scores = {}
    for kind in KINDS:
        model = four[kind][0]
        params = trained["linen"][0].params
        params = to_eqx(params) if kind == "equinox" else params  # one theta for all four
        problem = influence.make_problem(influence.model_loss(model.apply), params, batch, l2=1e-3)
        res = influence.influence_scores(problem, {"val": (influence.utility(model.apply), val)},
                                         solver=influence.Direct(damping=1.0), stationarity_tol=None)
        scores[kind] = np.asarray(res.scores["val"])
    assert np.abs(scores["linen"]).max() > 0
    for kind in KINDS:  # a reparametrisation by transposes leaves the scores unchanged
        np.testing.assert_allclose(scores[kind], scores["linen"], rtol=1e-3,
                                   atol=1e-4 * np.abs(scores["linen"]).max(), err_msg=kind)


# --- stateful models: BatchNorm ---------------------------------------------------------------

class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        h = nn.Dense(H, name="hidden")(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(
            h, mask=None if mask is None else mask[:, None])
        h = jnp.tanh(h)
        return nn.Dense(K, name="head")(h), h


class NnxBN(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(D, H, rngs=rngs)
        self.bn = nnx.BatchNorm(H, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(H, K, rngs=rngs)

    def __call__(self, x, mask=None):
        h = jnp.tanh(self.bn(self.hidden(x), mask=None if mask is None else mask[:, None]))
        return self.head(h), h


def test_batchnorm_linen_and_nnx_agree_through_padded_fit():
    """``fit`` pads the last batch (40 = 16 + 16 + 8): the mask must reach BatchNorm in both."""
    linen = models.from_linen(LinenBN(), (D,), K)  # mask and train read from the signature
    nnx_model = models.from_nnx(lambda rngs: NnxBN(rngs=rngs), (D,), K)
    v = linen.init(jax.random.key(0), jnp.zeros((1, D)))
    split = _data()
    (s1, h1), (s2, h2) = (_fit(m, v["params"], split) for m in (linen, nnx_model))
    np.testing.assert_allclose([h["loss"] for h in h2], [h["loss"] for h in h1], rtol=1e-5)
    _allclose(s2.params, s1.params, tol=1e-4)
    _allclose(s2.model_state["batch_stats"], s1.model_state["batch_stats"], tol=1e-4)
    assert not np.allclose(s1.model_state["batch_stats"]["bn"]["mean"], 0)


class EqxBN(eqx.Module):
    hidden: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(D, H, key=k1)
        self.bn = eqx.nn.BatchNorm(H, axis_name="batch", momentum=0.9, mode="ema")
        self.head = eqx.nn.Linear(H, K, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.hidden(x), state)
        h = jnp.tanh(h)
        return (self.head(h), h), state


def test_equinox_batchnorm_state():
    model = models.from_equinox(lambda key: eqx.nn.make_with_state(EqxBN)(key), input_shape=(D,))
    x = jnp.asarray(_data(8)["x"])
    v = model.init(jax.random.key(0), x)
    assert set(v) == {"params", "eqx_state"}
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=True, capture_norm=True))(v, x)
    z = np.asarray(x @ v["params"]["hidden"]["weight"].T + v["params"]["hidden"]["bias"])
    zn = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # batch statistics in train mode
    np.testing.assert_allclose(aux["norm"]["bn"], zn, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aux["features"], np.tanh(zn), rtol=1e-4, atol=1e-4)
    # mode="ema" starts the running statistics at the first batch's (biased) mean and variance
    stats = [np.asarray(a) for a in jax.tree.leaves(aux["model_state"]["eqx_state"]) if a.ndim]
    _allclose(stats, [z.mean(0), z.var(0)], tol=1e-4)
    # eval mode: running statistics (here those of x itself), no state returned
    v2 = {**v, **aux["model_state"]}
    logits_e, aux_e = model.apply(v2, x)
    _allclose(aux_e["features"], aux["features"], tol=1e-4)
    _allclose(logits_e, logits, tol=1e-4)
    assert aux_e["model_state"] == {}
    # and through fit (a batch size dividing n: Equinox BatchNorm does not take the mask)
    start = model.init(jax.random.key(0), x[:1])
    state2, hist = _fit(model, start["params"], _data(), epochs=2, batch_size=8, key=1)
    assert hist[-1]["loss"] < hist[0]["loss"] + 1e-3
    assert not all(np.allclose(a, b) for a, b in zip(
        jax.tree.leaves({k: v for k, v in start.items() if k != "params"}),
        jax.tree.leaves(state2.model_state)))


# --- as_apply: a user's own apply --------------------------------------------------------------

def test_as_apply_normalises_a_users_apply():
    p = four_params = LinenNet().init(jax.random.key(0), jnp.zeros((1, D)))["params"]
    x = jnp.asarray(_data(6)["x"])
    ref = plain_fn(four_params, x)

    def logits_only(variables, x):
        return plain_fn(variables["params"], x)[0]

    def with_train(variables, x, train):
        assert isinstance(train, bool)
        return plain_fn(variables["params"], x)

    def with_aux(variables, x, *, train=False, mask=None):
        logits, h = plain_fn(variables["params"], x)
        return logits, {"features": h}

    for fn in (logits_only, with_train, with_aux):
        apply = models.as_apply(fn)
        logits, aux = apply({"params": p}, x, train=True, mask=jnp.ones(6, bool))
        _allclose(logits, ref[0])
        assert aux["model_state"] == {}
        assert models.as_apply(fn) == apply and hash(models.as_apply(fn)) == hash(apply)
        assert models.as_apply(apply) is apply
        with pytest.raises(ValueError, match="capture_norm"):
            apply({"params": p}, x, capture_norm=True)
    _allclose(models.as_apply(with_aux)({"params": p}, x)[1]["features"], ref[1])
    linen = models.from_linen(LinenNet(), (D,), K)
    assert models.as_apply(linen.apply) is linen.apply  # adapters already meet the contract

    # a raw apply straight through the library's training method (it normalises the apply)
    tx = optax.sgd(0.1)
    batch = {"train": {"x": x, "y": jnp.zeros(6, jnp.int32), "weight": jnp.ones(6)}}
    raw = methods.train(logits_only, tx)
    v2, _, _ = jax.jit(raw.update)({"params": p}, raw.init({"params": p}), batch, None)
    ref_m = methods.train(linen.apply, tx)
    v3, _, _ = jax.jit(ref_m.update)({"params": p}, ref_m.init({"params": p}), batch, None)
    _allclose(v2["params"], v3["params"])

    with pytest.raises(ValueError, match=r"expected \[B, K\]"):
        models.as_apply(lambda v, x: x[:, 0])({}, x)
    with pytest.raises(ValueError, match="3 elements"):
        models.as_apply(lambda v, x: (x, x, x))({}, x)
    with pytest.raises(TypeError, match="callable"):
        models.as_apply(3)
    with pytest.raises(ValueError, match="exactly one"):
        models.from_function(plain_fn)
