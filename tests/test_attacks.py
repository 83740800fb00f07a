"""Attacks: FGSM/PGD against hand computations, the Megyeri linear perturbation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import attacks, losses, models


def _linear_binary(d=6, seed=0):
    model = models.logistic_regression(d, 1)
    rng = np.random.default_rng(seed)
    params = {"head": {"kernel": jnp.asarray(rng.normal(size=(d, 1)), jnp.float32),
                       "bias": jnp.asarray([0.3], jnp.float32)}}
    return model, {"params": params}, rng


def test_fgsm_matches_hand_computation_on_linear_model():
    model, variables, rng = _linear_binary()
    x = jnp.asarray(rng.uniform(0, 1, size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 32))
    eps = 0.1
    x_adv = jax.jit(lambda v, x, y: attacks.fgsm(model.apply, v, x, y, eps=eps))(variables, x, y)
    w = np.asarray(variables["params"]["head"]["kernel"])[:, 0]
    b = float(variables["params"]["head"]["bias"][0])
    xn, yn = np.asarray(x, np.float64), np.asarray(y)
    p = 1 / (1 + np.exp(-(xn @ w + b)))
    # d CE / d x = (p - y) w  for the single-logit model
    expect = np.clip(xn + eps * np.sign(w[None, :] * (p - yn)[:, None]), 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(x_adv), expect, atol=1e-6)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6


def test_pgd_one_step_equals_fgsm_and_stays_in_ball():
    model = models.mlp(5, 3, hidden=(8,))
    key = jax.random.key(1)
    variables = model.init(key, jnp.zeros((1, 5)))
    x = jax.random.uniform(jax.random.key(2), (16, 5))
    y = jax.random.randint(jax.random.key(3), (16,), 0, 3)
    eps = 0.05

    @jax.jit
    def run(v, x, y, k):
        f = attacks.fgsm(model.apply, v, x, y, eps=eps)
        p1 = attacks.pgd(model.apply, v, x, y, eps=eps, step_size=eps, steps=1)
        pk = attacks.pgd(model.apply, v, x, y, eps=eps, step_size=0.02, steps=7, key=k, random_start=True)
        loss = [jnp.mean(losses.cross_entropy(model.apply(v, xx)[0], y)) for xx in (x, pk)]
        return f, p1, pk, loss

    f, p1, pk, (clean_loss, adv_loss) = run(variables, x, y, key)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(f), atol=1e-7)
    assert float(jnp.max(jnp.abs(pk - x))) <= eps + 1e-6
    assert float(pk.min()) >= 0.0 and float(pk.max()) <= 1.0
    assert float(adv_loss) > float(clean_loss)


def test_generic_loss_form():
    w = jnp.asarray([1.0, -2.0, 0.0])
    x = jnp.asarray([[0.5, 0.5, 0.5]])
    out = attacks.fgsm_from_loss(lambda z: jnp.sum(z @ w), x, eps=0.2, input_range=None)
    np.testing.assert_allclose(np.asarray(out), [[0.7, 0.3, 0.5]], atol=1e-7)
    out = attacks.pgd_from_loss(lambda z: jnp.sum(z @ w), x, eps=0.2, step_size=0.15, steps=3,
                                input_range=(0.0, 0.6))
    np.testing.assert_allclose(np.asarray(out), [[0.6, 0.3, 0.5]], atol=1e-7)


def test_megyeri_binary_formula_and_flips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    w, b = rng.normal(size=4), 0.4
    x_adv = np.asarray(attacks.linear_perturbation(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)))
    expect = x - 1.3 * ((x @ w + b) / (w @ w))[:, None] * w[None]
    np.testing.assert_allclose(x_adv, expect, rtol=1e-5, atol=1e-5)
    assert np.all(np.sign(x_adv @ w + b) == -np.sign(x @ w + b))
    weak = np.asarray(attacks.linear_perturbation(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), gamma=0.9))
    assert np.all(np.sign(weak @ w + b) == np.sign(x @ w + b))


@pytest.mark.parametrize("k", [2, 4])
def test_megyeri_multiclass_flips_every_prediction(k):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(300, 5)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(5, k)), jnp.float32)
    b = jnp.asarray(rng.normal(size=k), jnp.float32)
    x_adv = attacks.linear_perturbation(x, W, b, gamma=1.3)
    before = np.argmax(np.asarray(x @ W + b), -1)
    after = np.argmax(np.asarray(x_adv @ W + b), -1)
    assert np.all(before != after)
    if k == 2:  # two logits = the binary rule on z_1 - z_0
        binary = attacks.linear_perturbation(x, W[:, 1] - W[:, 0], b[1] - b[0])
        np.testing.assert_allclose(np.asarray(x_adv), np.asarray(binary), atol=1e-4)


def test_adversarial_accuracy_matches_manual():
    model, variables, rng = _linear_binary(seed=3)
    x = jnp.asarray(rng.uniform(0, 1, size=(64, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 64))
    w = jnp.asarray((np.arange(64) < 32).astype(np.float32))

    @jax.jit
    def run(v, x, y, w):
        acc = attacks.adversarial_accuracy(model.apply, v, x, y, eps=0.3)
        acc_half = attacks.adversarial_accuracy(model.apply, v, x, y, eps=0.3, weight=w)
        xa = attacks.fgsm(model.apply, v, x, y, eps=0.3)
        return acc, acc_half, model.apply(v, xa)[0], model.apply(v, x)[0]

    acc, acc_half, adv_logits, clean_logits = run(variables, x, y, w)
    correct = np.argmax(np.asarray(losses.class_logits(adv_logits)), -1) == np.asarray(y)
    assert abs(float(acc) - correct.mean()) < 1e-6
    assert abs(float(acc_half) - correct[:32].mean()) < 1e-6
    clean = np.mean(np.argmax(np.asarray(losses.class_logits(clean_logits)), -1) == np.asarray(y))
    assert float(acc) <= clean


def test_bad_input_raises():
    model, variables, rng = _linear_binary()
    x = jnp.zeros((2, 6))
    y = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.fgsm(model.apply, variables, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="larger than the input range"):
        attacks.fgsm(model.apply, variables, x, y, eps=1.5)
    with pytest.raises(ValueError, match="larger than the input range"):
        attacks.pgd(model.apply, variables, x, y, eps=0.3, step_size=0.1, steps=2, input_range=(0.0, 0.2))
    with pytest.raises(ValueError, match="PRNG key"):
        attacks.pgd(model.apply, variables, x, y, eps=0.1, step_size=0.1, steps=2, random_start=True)
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd(model.apply, variables, x, y, eps=0.1, step_size=0.1, steps=0)
    with pytest.raises(ValueError, match="attack"):
        attacks.adversarial_accuracy(model.apply, variables, x, y, eps=0.1, attack="cw")
    with pytest.raises(ValueError, match="kernel"):
        attacks.linear_perturbation(jnp.zeros((3, 4)), jnp.zeros((5, 1)))
