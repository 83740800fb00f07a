"""Soft weights against independent QP oracles; hard weights, the sweep and the conversion."""

import itertools

import jax
import numpy as np
import pytest
from scipy.optimize import minimize

from jaxunlearn import weights as W


# ----------------------------------------------------------------------------- oracles

def qp_slsqp(f, u, delta, lam):
    """Numerical solve of eq. (6): min -e.f + lam |e|^2  s.t.  e.f <= delta,  e.u >= 0."""
    cons = [{"type": "ineq", "fun": lambda e: delta - e @ f, "jac": lambda e: -f},
            {"type": "ineq", "fun": lambda e: e @ u, "jac": lambda e: u}]
    res = minimize(lambda e: -e @ f + lam * e @ e, np.zeros_like(f), jac=lambda e: -f + 2 * lam * e,
                   constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert res.success, res.message
    return res.x


def qp_active_set(f, u, delta, lam):
    """Exact solve by enumerating active sets of the KKT system (float64 linear algebra).

    Returns (eps, case) with case numbered as eq. (7): 1 none, 2 (6b), 3 (6c), 4 both active.
    """
    best = None
    a_rows = {"b": f, "c": u}
    rhs = {"b": delta, "c": 0.0}
    for case, active in zip((1, 2, 3, 4), ((), ("b",), ("c",), ("b", "c"))):
        n = f.size
        m = len(active)
        # [2 lam I  A^T] [eps]   [f]      stationarity of  -e.f + lam|e|^2 + mu_b(e.f - d) - mu_c(e.u)
        # [A        0  ] [nu ] = [rhs]    with A rows f (6b) and -u (6c): multipliers nu >= 0.
        a = np.stack([a_rows[k] if k == "b" else -a_rows[k] for k in active]) if m else np.zeros((0, n))
        kkt = np.block([[2 * lam * np.eye(n), a.T], [a, np.zeros((m, m))]])
        b = np.concatenate([f, [rhs[k] if k == "b" else -rhs[k] for k in active]])
        sol, *_ = np.linalg.lstsq(kkt, b, rcond=None)
        eps, nu = sol[:n], sol[n:]
        if not np.allclose(kkt @ sol, b, atol=1e-9):
            continue  # singular active set with no solution
        feasible = eps @ f <= delta + 1e-9 and eps @ u >= -1e-9 and np.all(nu >= -1e-9)
        if feasible:
            obj = -eps @ f + lam * eps @ eps
            if best is None or obj < best[2] - 1e-12:
                best = (eps, case, obj)
    return best[0], best[1]


def instance(case, seed, n=12):
    """Random (f, u, delta, lam) whose QP optimum lies in the given case of eq. (7)."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=n)
    u = rng.normal(size=n)
    s = f @ u
    if (case in (1, 2)) != (s > 0):
        u = -u
    delta = 0.5
    if case == 1:
        g2 = f @ f
        lam = 2.0 * g2 / (2 * delta)             # ||f||^2 / (2 lam) = delta / 2
    elif case == 2:
        lam = 0.05 * (f @ f) / (2 * delta)
    else:
        fp = f - (f @ u) / (u @ u) * u
        lam = (2.0 if case == 3 else 0.05) * (fp @ fp) / (2 * delta)
    return f, u, delta, lam


# ----------------------------------------------------------------------------- soft weights

@pytest.mark.parametrize("case,seed", list(itertools.product((1, 2, 3, 4), (0, 1, 2))))
def test_soft_weights_each_case_matches_qp(case, seed):
    f, u, delta, lam = instance(case, seed)
    ref, ref_case = qp_active_set(f, u, delta, lam)
    assert ref_case == case  # the instance really lies in this case
    num = qp_slsqp(f, u, delta, lam)
    np.testing.assert_allclose(ref, num, atol=1e-5)          # the two oracles agree
    eps, info = W.soft_weights(f, u, delta=delta, lam=lam)
    assert int(info["case"]) == case
    assert not bool(info["degenerate"])
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(eps), ref, atol=2e-5 * scale)
    np.testing.assert_allclose(float(info["metric_change"]), -ref @ f, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(info["utility_change"]), -ref @ u, atol=1e-4 * scale * np.abs(u).sum())
    # Constraints (6b), (6c) in the paper's own terms: sum_i I(z_i; eps_i) = -eps . I.
    assert float(info["metric_change"]) >= -delta * (1 + 1e-5)
    assert float(info["utility_change"]) <= 1e-5 * scale * np.abs(u).sum()


def test_soft_weights_eq7_formulas_literal():
    """Each case equals the literal expression printed in eq. (7)."""
    for case in (1, 2, 3, 4):
        f, u, delta, lam = instance(case, 7)
        fu, ff, uu = f @ u, f @ f, u @ u
        literal = {1: f / (2 * lam),
                   2: delta / ff * f,
                   3: (f - fu / uu * u) / (2 * lam),
                   4: delta * (uu * f - fu * u) / (ff * uu - fu ** 2)}[case]
        eps, info = W.soft_weights(f, u, delta=delta, lam=lam)
        assert int(info["case"]) == case
        np.testing.assert_allclose(np.asarray(eps), literal, rtol=1e-4, atol=1e-6 * np.abs(literal).max())


def test_soft_weights_jit_matches_eager():
    fn = jax.jit(lambda f, u, d, lam: W.soft_weights(f, u, delta=d, lam=lam))
    for case in (1, 2, 3, 4):
        f, u, delta, lam = instance(case, 3)
        e1, i1 = W.soft_weights(f, u, delta=delta, lam=lam)
        e2, i2 = fn(f, u, delta, lam)
        np.testing.assert_allclose(np.asarray(e1), np.asarray(e2), rtol=1e-5, atol=1e-7)
        assert int(i1["case"]) == int(i2["case"]) == case


@pytest.mark.parametrize("sign", (1.0, -1.0))
@pytest.mark.parametrize("lam", (0.01, 10.0))
def test_soft_weights_collinear(sign, lam):
    rng = np.random.default_rng(4)
    u = rng.normal(size=10)
    f = sign * 0.7 * u
    delta = 0.3
    eps, info = W.soft_weights(f, u, delta=delta, lam=lam)
    num = qp_slsqp(f, u, delta, lam)
    np.testing.assert_allclose(np.asarray(eps), num, atol=1e-5)
    if sign < 0:  # no eps lowers the metric without raising the validation loss
        np.testing.assert_allclose(np.asarray(eps), 0.0, atol=1e-7)
        assert bool(info["degenerate"]) and int(info["case"]) == 3
        with pytest.raises(W.InfeasibleWeightsError, match=r"\(6c\)"):
            W.soft_weights(f, u, delta=delta, lam=lam, strict=True)
    else:
        assert not bool(info["degenerate"]) and int(info["case"]) in (1, 2)


def test_soft_weights_zero_vectors():
    rng = np.random.default_rng(5)
    f = rng.normal(size=8)
    zero = np.zeros(8)
    # I_util = 0: (6c) is vacuous, the QP is the ridge step capped by (6b).
    for lam in (0.01, 100.0):
        eps, info = W.soft_weights(f, zero, delta=0.2, lam=lam)
        np.testing.assert_allclose(np.asarray(eps), qp_slsqp(f, zero, 0.2, lam), atol=1e-5)
        assert np.all(np.isfinite(np.asarray(eps)))
    # I_metric = 0: nothing to gain, eps = 0.
    eps, info = W.soft_weights(zero, f, delta=0.2, lam=1.0)
    np.testing.assert_array_equal(np.asarray(eps), 0.0)
    assert bool(info["degenerate"])
    with pytest.raises(W.InfeasibleWeightsError, match="i_metric is zero"):
        W.soft_weights(zero, f, delta=0.2, lam=1.0, strict=True)
    # delta = 0: (6b) forbids any decrease, eps = 0.
    eps, _ = W.soft_weights(f, -f + rng.normal(size=8), delta=0.0, lam=1.0)
    np.testing.assert_allclose(np.asarray(eps), 0.0, atol=1e-7)


def test_min_norm_variant_matches_reference():
    rng = np.random.default_rng(6)
    for s in (1.0, -1.0):
        f = rng.normal(size=15)
        u = s * f + rng.normal(size=15)
        f0 = 0.12
        eps, info = W.soft_weights(f, u, delta=f0, variant="min_norm")
        # Oracle 1: minimum-norm solution of [f; u] eps = [|f0|, 0] (pseudo-inverse).
        pinv = np.linalg.lstsq(np.stack([f, u]), np.array([f0, 0.0]), rcond=None)[0]
        np.testing.assert_allclose(np.asarray(eps), pinv, rtol=1e-4, atol=1e-6)
        # Oracle 2: the reference's "soft-2.3" expression with its beta1, beta2 (lam = 0.1 cancels).
        lam, fu, ff, uu = 0.1, f @ u, f @ f, u @ u
        den = ff * uu - fu ** 2
        beta1 = -(2 * lam * f0 * uu * fu) / (den * uu)
        beta2 = 1 - (2 * lam * f0 * uu) / den
        ref = ((1 - beta2) * f + beta1 * u) / (2 * lam)
        np.testing.assert_allclose(np.asarray(eps), ref, rtol=1e-4, atol=1e-6)
        assert int(info["case"]) == 4
        np.testing.assert_allclose(float(info["metric_change"]), -f0, rtol=1e-5)
        assert abs(float(info["utility_change"])) < 1e-5


def test_min_norm_collinear_fallback():
    rng = np.random.default_rng(8)
    u = rng.normal(size=9)
    eps, info = W.soft_weights(2 * u, u, delta=0.5, variant="min_norm")
    np.testing.assert_allclose(np.asarray(eps), 0.5 * 2 * u / (4 * u @ u), rtol=1e-5)
    assert bool(info["degenerate"]) and int(info["case"]) == 2
    eps, info = W.soft_weights(-2 * u, u, delta=0.5, variant="min_norm")
    np.testing.assert_array_equal(np.asarray(eps), 0.0)
    assert bool(info["degenerate"]) and int(info["case"]) == 3
    with pytest.raises(W.InfeasibleWeightsError, match="jointly infeasible"):
        W.soft_weights(2 * u, u, delta=0.5, variant="min_norm", strict=True)


def test_soft_weights_bad_input():
    f, u = np.ones(4), np.arange(4.0)
    with pytest.raises(ValueError, match="i_util has 3"):
        W.soft_weights(f, u[:3], delta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        W.soft_weights(np.array([1.0, np.nan, 0, 0]), u, delta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        W.soft_weights(f, u, delta=-0.1, lam=1.0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        W.soft_weights(f, u, delta=0.1, lam=0.0)
    with pytest.raises(ValueError, match="lam is required"):
        W.soft_weights(f, u, delta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        W.soft_weights(f[None], u[None], delta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="variant"):
        W.soft_weights(f, u, delta=0.1, lam=1.0, variant="gurobi")
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda f, u: W.soft_weights(f, u, delta=0.1, lam=1.0, strict=True))(f, u)


# ----------------------------------------------------------------------------- hard weights

def test_hard_weights():
    scores = np.array([0.3, -2.0, 0.0, -0.5, -0.5, 1.0, -0.1, 0.2, 0.4, -3.0])
    eps = np.asarray(W.hard_weights(scores, 0.3))
    np.testing.assert_array_equal(np.flatnonzero(eps == -1), [1, 3, 9])   # -3, -2, then the first -0.5
    assert set(np.unique(eps)) == {-1.0, 0.0}
    np.testing.assert_array_equal(np.asarray(W.hard_weights(scores, 0.0)), 0.0)
    np.testing.assert_array_equal(np.asarray(W.hard_weights(scores, 1.0)), -1.0)
    only_neg = np.asarray(W.hard_weights(scores, 0.8, negative_only=True))
    np.testing.assert_array_equal(only_neg, np.where(scores < 0, -1.0, 0.0))
    assert int((np.asarray(W.hard_weights(scores, 0.29)) == -1).sum()) == 2   # floor(2.9)
    with pytest.raises(ValueError, match="fraction"):
        W.hard_weights(scores, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        W.hard_weights(np.array([0.0, np.inf]), 0.5)


def test_sweep_hard_fraction_stops_at_best():
    scores = np.linspace(-1, 1, 20)
    calls = []

    def evaluate(eps):  # toy: the target is best when 6 samples are removed
        calls.append(eps.copy())
        return (float(-(eps.sum())) - 6.0) ** 2

    fractions = np.arange(0.0, 1.01, 0.1)
    res = W.sweep_hard_fraction(evaluate, scores, fractions)
    assert res.fraction == pytest.approx(0.3)
    assert res.value == 0.0
    np.testing.assert_array_equal(np.flatnonzero(res.weights == -1), np.arange(6))
    np.testing.assert_allclose(res.fractions, [0.0, 0.1, 0.2, 0.3, 0.4])      # stopped at 0.4
    np.testing.assert_allclose(res.values, [36, 16, 4, 0, 4])
    assert len(calls) == 5
    # patience 3 looks further but keeps the same best
    res3 = W.sweep_hard_fraction(evaluate, scores, fractions, patience=3)
    assert res3.fraction == pytest.approx(0.3) and len(res3.fractions) == 7
    with pytest.raises(ValueError, match="strictly increasing"):
        W.sweep_hard_fraction(evaluate, scores, [0.2, 0.1])
    with pytest.raises(ValueError, match="returned nan"):
        W.sweep_hard_fraction(lambda e: float("nan"), scores, [0.1])


def test_soft_weights_score_scale_is_explicit():
    # scores on influence_scores' default scale ("change": 1/n included) vs seed 004's I(z; -1) = n x
    rng = np.random.default_rng(11)
    n = 50
    f, u = rng.normal(size=n) / n, rng.normal(size=n) / n
    for variant, lam in (("min_norm", None), ("qp", 0.5)):
        eps, info = W.soft_weights(f, u, delta=0.05, lam=lam, variant=variant)
        eps4, info4 = W.soft_weights(n * f, n * u, delta=0.05, lam=lam, variant=variant, scale="seed004")
        np.testing.assert_allclose(eps4, eps, rtol=1e-5)
        assert int(info4["case"]) == int(info["case"])
    # the predicted change -eps . f is in the metric's units: exactly -delta for min_norm
    eps, info = W.soft_weights(f, u, delta=0.05, variant="min_norm")
    assert float(-np.dot(eps, f)) == pytest.approx(-0.05, rel=1e-5)
    # seed-004 scores passed as "change" give eps n times too small: the factor n matters
    wrong, _ = W.soft_weights(n * f, n * u, delta=0.05, variant="min_norm")
    np.testing.assert_allclose(np.asarray(wrong) * n, eps, rtol=1e-5)
    with pytest.raises(ValueError, match="scale must be 'change'"):
        W.soft_weights(f, u, delta=0.05, variant="min_norm", scale="n")
