"""MINE against distributions with known mutual information."""

import jax
import numpy as np
import pytest
from scipy.stats import norm

from jaxunlearn import mutual_information as mi


def _gaussians(rho, n=4000, d=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(n, d))
    return x, y, -d / 2 * np.log(1 - rho**2)


def test_independent_variables_have_zero_mi():
    x, y, true = _gaussians(0.0)
    est = mi.estimate_mi(x, y, key=jax.random.key(0), steps=1000, batch_size=512)
    assert true == 0.0
    assert abs(est) < 0.05


def test_correlated_gaussians():
    x, y, true = _gaussians(0.8)  # I = -log(1 - 0.64) = 1.0217 nats
    est = mi.estimate_mi(x, y, key=jax.random.key(0), steps=1000, batch_size=512)
    assert est == pytest.approx(true, rel=0.1)
    assert est <= true + 0.05  # a lower bound, up to sampling error


def test_groups_with_gaussian_features():
    """I(Z; G) for G ~ Bernoulli(1/2), Z | G ~ N(2G - 1, 1), by numerical integration."""
    rng = np.random.default_rng(1)
    g = rng.integers(0, 2, 4000)
    z = (2 * g - 1)[:, None] + rng.normal(size=(4000, 1))
    zz = np.linspace(-9, 9, 40001)
    pz = 0.5 * (norm.pdf(zz, 1) + norm.pdf(zz, -1))
    post = 0.5 * norm.pdf(zz, 1) / pz
    h = -(post * np.log(post) + (1 - post) * np.log1p(-post))
    true = np.log(2) - np.trapezoid(h * pz, zz)
    est = mi.estimate_mi(z, np.eye(2)[g], key=jax.random.key(1), steps=1000, batch_size=512)
    assert est == pytest.approx(true, abs=0.04)


def test_uniform_marginal_adds_group_imbalance():
    """With uniform c~ the bound targets I(Z;G) + KL(P_G || U): here I = 0, KL(0.9/0.1 || U)."""
    rng = np.random.default_rng(2)
    g = (rng.random(4000) < 0.9).astype(int)
    z = rng.normal(size=(4000, 1))
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    est = mi.estimate_mi(z, np.eye(2)[g], key=jax.random.key(2), steps=1000, batch_size=512,
                         marginal="uniform")
    assert est == pytest.approx(kl, abs=0.05)


def test_divergence_is_reported():
    x, y, _ = _gaussians(0.999, n=1000)
    with pytest.raises(mi.MIDivergenceError, match="diverged"):
        mi.estimate_mi(x, y, key=jax.random.key(0), steps=200, batch_size=256, lr=1.0,
                       max_nats=5.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rows"):
        mi.estimate_mi(np.zeros((5, 2)), np.zeros((4, 2)), key=jax.random.key(0), steps=2)
    with pytest.raises(ValueError, match="marginal"):
        mi.sample_marginal(jax.random.key(0), np.zeros((4, 2)), marginal="nope")
