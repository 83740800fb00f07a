"""Unlearning methods: one update of each against a hand computation, weights, masks, the loop.

The oracles are closed forms written here in float64 numpy for a softmax regression
(z = x W + b; 20 samples, 3 features, 3 classes): d CE / dz = softmax(z) - onehot(y),
d KD_T / dz_s = T (softmax(z_s/T) - softmax(z_t/T)), and so on, independent of the library's
losses and step code. Each oracle drops the weight-0 rows of the batch it is given, so every
comparison also checks that those rows change nothing. Each method is jitted once and shared
by the tests (the machine is slow; compilation dominates).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxunlearn import loop, models
from jaxunlearn import methods as M
from jaxunlearn.methods import base

N, D, K = 20, 3, 3
LR = 0.1
TOL = dict(atol=2e-6, rtol=2e-5)


# ----------------------------------------------------------------------------- the tiny problem

def _data(seed=0, n=N, d=D, k=K):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n).astype(np.int32)


X, Y = _data()
MODEL = models.logistic_regression(D, K)
APPLY = MODEL.apply


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"params": {"head": {"kernel": jnp.asarray(rng.normal(size=(D, K)), jnp.float32),
                                "bias": jnp.asarray(rng.normal(size=(K,)) * 0.3, jnp.float32)}}}


V0, V1, VR = _params(1), _params(2), _params(3)   # theta_0, the current iterate, a random teacher

# Forget batch: 6 rows with soft weights and a weight-0 row; retain batch: 10 rows, two weight 0.
FI, RI = np.arange(6), np.arange(6, 16)
WF = np.array([-1.0, -0.5, -1.0, -0.2, 0.0, -1.3], np.float32)
WR = np.array([1.0, 0.7, 1.3, 1.0, 0.0, 1.1, 0.9, 1.0, 1.2, 0.0], np.float32)


def _batch(idx, w, x=X, y=Y):
    return {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx]), "weight": jnp.asarray(w, jnp.float32),
            "index": jnp.asarray(idx, jnp.int32)}


FB, RB = _batch(FI, WF), _batch(RI, WR)


def _batches(forget_pass=0, fb=FB, rb=RB):
    """A (forget, retain) batch pair; forget marked with its pass over D_f, as the loop does."""
    return {"forget": {**fb, "pass": jnp.full(fb["weight"].shape, forget_pass, jnp.int32)}, "retain": rb}


# ----------------------------------------------------------------------------- numpy oracles

def wb(v):
    return (np.asarray(v["params"]["head"]["kernel"], np.float64),
            np.asarray(v["params"]["head"]["bias"], np.float64))


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def onehot(y):
    return np.eye(K)[np.asarray(y)]


def rows(batch):
    """(x, y, w) of the batch's non-zero-weight rows, float64."""
    w = np.asarray(batch["weight"], np.float64)
    keep = w != 0
    return np.asarray(batch["x"], np.float64)[keep], np.asarray(batch["y"])[keep], w[keep]


def ce_dz(W, b, x, y, w):
    """d/dz of weighted_mean(CE, w) over rows that all have w != 0."""
    return (w / w.size)[:, None] * (softmax(x @ W + b) - onehot(y))


def kd_dz(zs, zt, w, temp):
    """d/dz_s of weighted_mean(T^2 KL(softmax(z_t/T) || softmax(z_s/T)), w)."""
    return (w / w.size)[:, None] * temp * (softmax(zs / temp) - softmax(zt / temp))


def grad(x, dz):
    return x.T @ dz, dz.sum(0)


def sgd(W, b, g, lr=LR):
    return W - lr * g[0], b - lr * g[1]


def check(out, W, b, **tol):
    tol = {**TOL, **tol}
    np.testing.assert_allclose(np.asarray(out["params"]["head"]["kernel"]), W, **tol)
    np.testing.assert_allclose(np.asarray(out["params"]["head"]["bias"]), b, **tol)


# ----------------------------------------------------------------------------- the methods

def _inverse_hvp_of(v, x, y, l2):
    """``v -> H^{-1} v`` for H of mean CE + (l2/2)||theta||^2 (closed form, layout [W; b])."""
    W, b = wb(v)
    xt = np.concatenate([x, np.ones((x.shape[0], 1))], 1).astype(np.float64)
    p = softmax(x @ W + b)
    s = np.einsum("ik,kl->ikl", p, np.eye(K)) - np.einsum("ik,il->ikl", p, p)
    h = np.einsum("ia,ib,ikl->akbl", xt, xt, s).reshape((D + 1) * K, (D + 1) * K) / x.shape[0]
    h_inv = jnp.asarray(np.linalg.inv(h + l2 * np.eye(h.shape[0])), jnp.float32)

    def inverse_hvp(t):
        flat = jnp.concatenate([t["head"]["kernel"], t["head"]["bias"][None]]).reshape(-1)
        out = (h_inv @ flat).reshape(D + 1, K)
        return {"head": {"kernel": out[:D], "bias": out[D]}}

    return inverse_hvp, np.linalg.inv(h + l2 * np.eye(h.shape[0]))


IF_L2 = 0.05
INV_HVP, H_INV = _inverse_hvp_of(V1, X, Y, IF_L2)
SGD = optax.sgd(LR)
METHODS = {
    "FT": M.finetune(APPLY, optimizer=SGD),
    "GA": M.gradient_ascent(APPLY, optimizer=SGD),
    "GA_FT": M.neggrad_plus(APPLY, alpha=0.8, weight_decay=0.3, optimizer=SGD),
    "RL": M.random_labels(APPLY, optimizer=SGD),
    "L1": M.l1_sparse(APPLY, epochs=4, alpha=0.05, optimizer=SGD),
    "BS": M.boundary_shrink(APPLY, eps=0.5, input_range=(-3.0, 3.0), optimizer=SGD),
    "SCRUB": M.scrub(APPLY, alpha=0.5, gamma=0.9, temperature=2.0, max_epochs=2, optimizer=SGD),
    "BadT": M.bad_teacher(APPLY, VR, temperature=1.5, optimizer=SGD),
    "CF-k": M.cf_k(APPLY, {"head": {"kernel": True, "bias": False}}, optimizer=SGD),
    "EU-k": M.eu_k(APPLY, _params(4), {"head": {"kernel": False, "bias": True}}, optimizer=SGD),
    "NTK": M.ntk_forgetting(APPLY, weight_decay=0.05, chunk_size=7),          # primal, chunked
    "NTK-dual": M.ntk_forgetting(APPLY, weight_decay=0.05, solve="dual"),     # kernel
    "IF": M.influence_unlearning(APPLY, INV_HVP, num_train=N),
}
JIT = {name: jax.jit(m.update) for name, m in METHODS.items()}


def _step(name, batches=None, key=jax.random.key(7), epoch=0):
    """One update of METHODS[name] from V1, its state initialised at theta_0 = V0, in ``epoch``."""
    state = METHODS[name].init(V0)._replace(epoch=jnp.int32(epoch))
    return JIT[name](V1, state, _batches() if batches is None else batches, key)


# ----------------------------------------------------------------------------- one update each

def test_finetune_one_update_matches_hand():
    out, _, m = _step("FT")
    W, b = wb(V1)
    x, y, w = rows(RB)
    check(out, *sgd(W, b, grad(x, ce_dz(W, b, x, y, w))))
    p = softmax(x @ W + b)[np.arange(len(y)), y]
    np.testing.assert_allclose(m["loss"], np.mean(w * -np.log(p)), rtol=1e-5)


def test_gradient_ascent_one_update_matches_hand():
    out, _, m = _step("GA")
    W, b = wb(V1)
    x, y, w = rows(FB)
    check(out, *sgd(W, b, grad(x, ce_dz(W, b, x, y, w))))
    # the hard weights eps = -1 are plain ascent: theta + lr grad mean CE
    out, _, _ = _step("GA", _batches(fb=_batch(FI, -np.ones(6))))
    x, y = X[FI].astype(np.float64), Y[FI]
    gw, gb = grad(x, (softmax(x @ W + b) - onehot(y)) / 6)
    check(out, W + LR * gw, b + LR * gb)


def test_neggrad_plus_one_update_matches_hand():
    alpha, wd = 0.8, 0.3
    out, _, _ = _step("GA_FT")
    W, b = wb(V1)
    W0, b0 = wb(V0)
    xr, yr, wr = rows(RB)
    xf, yf, wf = rows(FB)
    gr, gf = grad(xr, ce_dz(W, b, xr, yr, wr)), grad(xf, ce_dz(W, b, xf, yf, wf))
    g = (alpha * (gr[0] + wd * (W - W0)) + (1 - alpha) * gf[0],
         alpha * (gr[1] + wd * (b - b0)) + (1 - alpha) * gf[1])
    check(out, *sgd(W, b, g))


def test_random_labels_one_update_matches_hand():
    key = jax.random.key(11)
    out, _, _ = _step("RL", key=key)
    y_rand = np.asarray(jax.random.randint(key, (6,), 0, K, dtype=jnp.int32))  # documented draw
    W, b = wb(V1)
    x = np.concatenate([X[FI], X[RI]]).astype(np.float64)
    y = np.concatenate([y_rand, Y[RI]])
    w = np.concatenate([-WF, WR]).astype(np.float64)
    keep = w != 0
    check(out, *sgd(W, b, grad(x[keep], ce_dz(W, b, x[keep], y[keep], w[keep]))))


def test_l1_sparse_one_update_matches_hand():
    out, _, m = _step("L1", epoch=1)
    coef = 0.05 * (1 - 1 / 4)
    W, b = wb(V1)
    x, y, w = rows(RB)
    gw, gb = grad(x, ce_dz(W, b, x, y, w))
    check(out, *sgd(W, b, (gw + coef * np.sign(W), gb + coef * np.sign(b))))
    np.testing.assert_allclose(m["l1_coef"], coef, rtol=1e-6)


def test_boundary_shrink_one_update_matches_hand():
    eps, lo, hi = 0.5, -3.0, 3.0
    out, _, _ = _step("BS")
    W0, b0 = wb(V0)
    x, y = X[FI].astype(np.float64), Y[FI]
    gx = (softmax(x @ W0 + b0) - onehot(y)) @ W0.T                 # d sum CE / dx on theta_0
    x_adv = np.clip(x + eps * np.sign(gx), lo, hi)
    z_adv = np.where(onehot(y) > 0, -np.inf, x_adv @ W0 + b0)
    target = z_adv.argmax(1)
    assert np.all(target != y)
    y_nbr, _ = M.neighbour_labels(APPLY, V0, FB["x"], FB["y"], eps=eps, input_range=(lo, hi))
    np.testing.assert_array_equal(np.asarray(y_nbr), target)
    W, b = wb(V1)
    keep = WF != 0
    dz = ce_dz(W, b, x[keep], target[keep], -WF[keep].astype(np.float64))
    check(out, *sgd(W, b, grad(x[keep], dz)))


def test_boundary_shrink_target_is_never_the_true_label():
    # eps = 0: the attack cannot change the prediction; the target is still the best wrong class
    y_nbr, _ = jax.jit(M.neighbour_labels, static_argnames=("apply_fn", "eps", "input_range"))(
        APPLY, V0, jnp.asarray(X), jnp.asarray(Y), eps=0.0, input_range=None)
    W0, b0 = wb(V0)
    masked = np.where(onehot(Y) > 0, -np.inf, X @ W0 + b0)
    np.testing.assert_array_equal(np.asarray(y_nbr), masked.argmax(1))
    assert np.all(np.asarray(y_nbr) != Y)


@pytest.mark.parametrize("max_active", [True, False])
def test_scrub_one_update_matches_hand(max_active):
    temp, alpha, gamma = 2.0, 0.5, 0.9
    # max-steps only in epochs < m = 2 and on the first forget pass
    out, _, m = _step("SCRUB", epoch=1 if max_active else 2)
    W0, b0 = wb(V0)
    W, b = wb(V1)
    if max_active:
        xf, _, wf = rows(FB)
        W, b = sgd(W, b, grad(xf, kd_dz(xf @ W + b, xf @ W0 + b0, wf, temp)))
    xr, yr, wr = rows(RB)
    dz = gamma * ce_dz(W, b, xr, yr, wr) + alpha * kd_dz(xr @ W + b, xr @ W0 + b0, wr, temp)
    check(out, *sgd(W, b, grad(xr, dz)))
    assert float(m["max_step"]) == float(max_active)
    out, _, m = _step("SCRUB", _batches(forget_pass=1), epoch=0)
    assert float(m["max_step"]) == 0.0


def test_bad_teacher_one_update_matches_hand():
    temp = 1.5
    out, _, _ = _step("BadT")
    x = np.concatenate([X[FI], X[RI]]).astype(np.float64)
    w = np.concatenate([-WF, WR]).astype(np.float64)
    (Wr, br), (W0, b0), (W, b) = wb(VR), wb(V0), wb(V1)
    target = np.concatenate([softmax((x[:6] @ Wr + br) / temp), softmax((x[6:] @ W0 + b0) / temp)])
    keep = w != 0
    # d KL(t || softmax(z/T)) / dz = (softmax(z/T) - t) / T
    dz = (w[keep] / keep.sum())[:, None] * (softmax((x[keep] @ W + b) / temp) - target[keep]) / temp
    check(out, *sgd(W, b, grad(x[keep], dz)))


def test_eu_k_reinitialises_then_trains_only_the_subset():
    fresh = _params(4)
    state = METHODS["EU-k"].init(V1)
    out, state, _ = JIT["EU-k"](V1, state, _batches(), jax.random.key(0))
    W, _ = wb(V1)
    b = wb(fresh)[1]
    x, y, w = rows(RB)
    np.testing.assert_array_equal(out["params"]["head"]["kernel"], V1["params"]["head"]["kernel"])
    check(out, W, b - LR * grad(x, ce_dz(W, b, x, y, w))[1])
    # the next update continues from the trained value (no second re-initialisation)
    out2, _, _ = JIT["EU-k"](out, state, _batches(), jax.random.key(0))
    W, b = wb(out)
    check(out2, W, b - LR * grad(x, ce_dz(W, b, x, y, w))[1])


def test_cf_k_one_update_matches_hand():
    out, _, _ = _step("CF-k")
    W, b = wb(V1)
    x, y, w = rows(RB)
    check(out, W - LR * grad(x, ce_dz(W, b, x, y, w))[0], b)
    np.testing.assert_array_equal(out["params"]["head"]["bias"], V1["params"]["head"]["bias"])


def test_fisher_diagonal_matches_hand():
    w = np.linspace(0.0, 1.5, 12)   # a weight-0 sample and soft weights
    fisher = M.fisher_diagonal(APPLY, V0, {"x": X[:12], "y": Y[:12], "weight": w}, batch_size=5)
    W0, b0 = wb(V0)
    fw, fb = np.zeros((D, K)), np.zeros(K)
    for i in range(12):
        p = softmax(X[i] @ W0 + b0)
        for c in range(K):
            d_logp = np.eye(K)[c] - p          # d log p_c / dz
            fw += w[i] * p[c] * np.outer(X[i], d_logp) ** 2
            fb += w[i] * p[c] * d_logp ** 2
    np.testing.assert_allclose(fisher["head"]["kernel"], fw / 11, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fisher["head"]["bias"], fb / 11, rtol=1e-5, atol=1e-7)


def test_fisher_forgetting_noise_scale_and_clamp():
    fisher = {"head": {"kernel": jnp.asarray([[0.0, 1e-6, 1.0], [2.0, 0.5, 4.0], [0.0, 3.0, 1e-2]]),
                       "bias": jnp.asarray([0.1, 0.0, 10.0])}}
    key = jax.random.key(3)
    z = []
    for alpha in (1e-6, 4e-4):
        method = M.fisher_forgetting(fisher, alpha=alpha)
        out, _, _ = jax.jit(method.update)(V0, method.init(V0), {}, key)
        var = jax.tree.map(lambda f: alpha * np.minimum(1 / (np.asarray(f, np.float64) + 1e-8), 1e3), fisher)
        z.append(jax.tree.map(lambda a, b, v: (np.asarray(a, np.float64) - np.asarray(b)) / np.sqrt(v),
                              out["params"], V0["params"], var))
    # the same N(0, I) draw, scaled by exactly sqrt(alpha min(1/(F+1e-8), 1e3)) (clamped at F ~ 0)
    for a, b in zip(jax.tree.leaves(z[0]), jax.tree.leaves(z[1])):
        np.testing.assert_allclose(a, b, rtol=5e-3, atol=5e-3)
    flat = ravel_pytree(z[1])[0]
    assert np.all(np.abs(flat) < 6) and np.std(flat) > 0.2
    with pytest.raises(ValueError, match="finite"):
        M.fisher_forgetting(jax.tree.map(lambda f: f * np.nan, fisher)).init(V0)


def test_fisher_newton_step_matches_hand():
    """theta_0 - g_r / (F + damping), g_r = weighted-mean CE gradient + l2 theta_0 (alpha = 0)."""
    w = np.r_[np.linspace(0.2, 1.4, 11), 0.0]
    retain = {"x": X[:12], "y": Y[:12], "weight": w}
    fisher = M.fisher_diagonal(APPLY, V0, retain, batch_size=5)
    l2 = 0.03
    g = M.retain_gradient(APPLY, V0, retain, l2=l2, batch_size=5)
    W0, b0 = wb(V0)
    gw, gb = np.zeros((D, K)), np.zeros(K)
    for i in range(12):
        dz = softmax(X[i] @ W0 + b0) - np.eye(K)[Y[i]]
        gw += w[i] * np.outer(X[i], dz)
        gb += w[i] * dz
    gw, gb = gw / 11 + l2 * W0, gb / 11 + l2 * b0
    np.testing.assert_allclose(g["head"]["kernel"], gw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["head"]["bias"], gb, rtol=1e-5, atol=1e-7)
    method = M.fisher_forgetting(fisher, alpha=0.0, newton_grad=g, damping=l2)
    out, _, _ = method.update(V0, method.init(V0), {}, jax.random.key(0))
    fw, fb = (np.asarray(fisher["head"][k], np.float64) for k in ("kernel", "bias"))
    np.testing.assert_allclose(out["params"]["head"]["kernel"], W0 - gw / (fw + l2), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["params"]["head"]["bias"], b0 - gb / (fb + l2), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="damping"):
        M.fisher_forgetting(fisher, newton_grad=g)
    with pytest.raises(ValueError, match="newton_grad must be finite"):
        M.fisher_forgetting(fisher, newton_grad=jax.tree.map(lambda a: a * np.nan, g), damping=1.0).init(V0)
    with pytest.raises(ValueError, match="retain set has weight 0"):
        M.retain_gradient(APPLY, V0, {**retain, "weight": np.zeros(12)})


def test_newton_step_size_is_armijo_backtracking():
    """The largest eta = 2^-j with L(theta + eta d) <= L(theta) + 1e-4 eta g.d, against a dense scan."""
    retain = {"x": X, "y": Y, "weight": np.r_[np.ones(14), np.zeros(6)]}
    l2, damping = 1e-3, 1e-3
    g = M.retain_gradient(APPLY, V0, retain, l2=l2)
    fisher = M.fisher_diagonal(APPLY, V0, retain)
    eta = M.newton_step_size(APPLY, V0, retain, fisher, g, l2=l2, damping=damping)
    W0, b0 = (np.asarray(a, np.float64) for a in wb(V0))
    dW = -np.asarray(g["head"]["kernel"]) / (np.asarray(fisher["head"]["kernel"]) + damping)
    db = -np.asarray(g["head"]["bias"]) / (np.asarray(fisher["head"]["bias"]) + damping)
    slope = np.sum(np.asarray(g["head"]["kernel"]) * dW) + np.sum(np.asarray(g["head"]["bias"]) * db)

    def L(W, b):  # float64 oracle of the retain objective
        z = X[:14] @ W + b
        ce = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(14), Y[:14]]
        return ce.mean() + 0.5 * l2 * (np.sum(W * W) + np.sum(b * b))

    ok = [e for e in 0.5 ** np.arange(31) if L(W0 + e * dW, b0 + e * db) <= L(W0, b0) + 1e-4 * e * slope]
    assert slope < 0 and eta == pytest.approx(ok[0])
    with pytest.raises(FloatingPointError, match="decreases the retain objective"):
        M.newton_step_size(APPLY, V0, retain, fisher, jax.tree.map(lambda a: -a, g), l2=l2,
                           damping=damping, max_halvings=5)


def _ntk_primal(v, x, y, c, lam):
    """argmin_w sum_i c_i ||J_i w + r_i||^2 + (sum c) lam ||w||^2, w = (dW, db), float64."""
    W, b = wb(v)
    n = x.shape[0]
    # z_k = sum_a x_a W_ak + b_k: dz_k / dW_ak' = x_a delta_kk', dz_k / db_k' = delta_kk'
    jac = np.zeros((n, K, (D + 1) * K))
    xt = np.concatenate([x, np.ones((n, 1))], 1)
    for k in range(K):
        jac[:, k, k::K] = xt
    r = softmax(x @ W + b) - onehot(y)
    a = np.einsum("i,ikp,ikq->pq", c, jac, jac) + np.sum(c) * lam * np.eye(jac.shape[-1])
    sol = np.linalg.solve(a, -np.einsum("i,ikp,ik->p", c, jac, r)).reshape(D + 1, K)
    return sol[:D], sol[D], jac, r


@pytest.mark.parametrize("name", ["NTK", "NTK-dual"])
def test_ntk_one_update_matches_hand(name):
    lam = 0.05
    out, _, _ = _step(name)
    x = np.concatenate([X[FI], X[RI]]).astype(np.float64)
    y = np.concatenate([Y[FI], Y[RI]])
    c_complete = np.concatenate([-WF, WR]).astype(np.float64)
    c_retain = np.concatenate([np.zeros(6), WR]).astype(np.float64)
    dw_r, db_r, _, _ = _ntk_primal(V1, x, y, c_retain, lam)
    dw_c, db_c, _, _ = _ntk_primal(V1, x, y, c_complete, lam)
    W, b = wb(V1)
    check(out, W + dw_r - dw_c, b + db_r - db_c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["NTK", "NTK-dual"])
def test_ntk_hard_weights_match_reference_formula(name):
    # the SCRUB notebooks: w = -G (G^T G + n lam I)^{-1} (f0 - y), on D and on D_r (G: [P, N K])
    lam = 0.05
    out, _, _ = _step(name, _batches(fb=_batch(FI, -np.ones(6)), rb=_batch(RI, np.ones(10))))
    x, y = X[:16].astype(np.float64), Y[:16]
    _, _, jac, r = _ntk_primal(V1, x, y, np.ones(16), lam)

    def w_of(idx):
        g = jac[idx].reshape(-1, jac.shape[-1]).T
        return -g @ np.linalg.solve(g.T @ g + len(idx) * lam * np.eye(g.shape[1]), r[idx].reshape(-1))

    delta = (w_of(np.arange(6, 16)) - w_of(np.arange(16))).reshape(D + 1, K)
    W, b = wb(V1)
    check(out, W + delta[:D], b + delta[D], atol=1e-4, rtol=1e-4)


def test_ntk_refuses_large_models():
    method = M.ntk_forgetting(APPLY, max_params=5)
    with pytest.raises(ValueError, match="max_params"):
        method.update(V1, method.init(V1), _batches(), None)
    method = M.ntk_forgetting(APPLY, solve="dual", max_rows=20)
    with pytest.raises(ValueError, match="max_rows"):
        method.update(V1, method.init(V1), _batches(), None)


def test_influence_one_update_matches_eq8():
    out, _, _ = _step("IF")
    W, b = wb(V1)
    x, y, w = rows(FB)
    dz = w[:, None] * (softmax(x @ W + b) - onehot(y))              # sum_i eps_i d CE_i / dz
    g = np.concatenate([x.T @ dz, dz.sum(0)[None]]).reshape(-1)
    step = (-(H_INV @ g) / N).reshape(D + 1, K)
    check(out, W + step[:D], b + step[D], atol=1e-5)
    # chunked accumulation gives the same step
    chunked = M.influence_unlearning(APPLY, INV_HVP, num_train=N, chunk_size=4)
    out2, _, _ = jax.jit(chunked.update)(V1, chunked.init(V1), _batches(), None)
    check(out2, W + step[:D], b + step[D], atol=1e-5)


def _newton_fit(x, y, c, l2, n, theta=None, iters=30):
    """argmin (1/n) sum_i c_i BCE(x_i . w + b, y_i) + (l2/2)||(w, b)||^2, float64 Newton."""
    xd = np.concatenate([x, np.ones((x.shape[0], 1))], 1).astype(np.float64)
    th = np.zeros(xd.shape[1]) if theta is None else theta.copy()
    for _ in range(iters):
        p = 1 / (1 + np.exp(-xd @ th))
        g = xd.T @ (c * (p - y)) / n + l2 * th
        h = (xd * (c * p * (1 - p))[:, None]).T @ xd / n + l2 * np.eye(xd.shape[1])
        th = th - np.linalg.solve(h, g)
    assert np.linalg.norm(g) < 1e-10
    return th, h


def test_influence_update_approximates_exact_retraining():
    # convex model: L2-regularised binary logistic regression fit to stationarity (Newton, f64)
    n, l2 = 200, 0.05
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x @ np.array([1.5, -1.0, 0.5]) + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    model = models.logistic_regression(D, 1)
    th_hat, hess = _newton_fit(x, y, np.ones(n), l2, n)
    variables = {"params": {"head": {"kernel": jnp.asarray(th_hat[:D, None], jnp.float32),
                                     "bias": jnp.asarray(th_hat[D:], jnp.float32)}}}
    h_inv = jnp.asarray(np.linalg.inv(hess), jnp.float32)

    def inverse_hvp(v):   # design order [kernel, bias]
        s = h_inv @ jnp.concatenate([v["head"]["kernel"].ravel(), v["head"]["bias"]])
        return {"head": {"kernel": s[:D, None], "bias": s[D:]}}

    method = M.influence_unlearning(model.apply, inverse_hvp, num_train=n)
    cases = {"hard (3 removed)": np.where(np.arange(n) < 3, -1.0, 0.0),
             "soft (N(0, 0.2) weights)": rng.normal(size=n) * 0.2}
    for name, eps in cases.items():
        eps = eps.astype(np.float32)
        out, _, _ = loop.run(method, variables, {"forget": {"x": x, "y": y, "weight": eps}},
                             key=jax.random.key(0), progress=False)
        th_if = np.concatenate([np.asarray(out["params"]["head"]["kernel"]).ravel(),
                                np.asarray(out["params"]["head"]["bias"])])
        th_rt, _ = _newton_fit(x, y, 1.0 + eps, l2, n, theta=th_hat)   # exact retraining
        # tolerance: the one Newton step recovers the exact change to within 3% (error O(|eps|^2))
        err = np.linalg.norm(th_if - th_rt) / np.linalg.norm(th_hat - th_rt)
        assert err < 0.03, (name, err)


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("name", sorted(METHODS))
def test_weight_zero_samples_change_nothing(name):
    # Same shapes (so compiled code and random draws are shared), other content in weight-0 rows.
    rng = np.random.default_rng(9)

    def junk(b):
        zero = np.asarray(b["weight"]) == 0
        x = np.asarray(b["x"]).copy()
        y = np.asarray(b["y"]).copy()
        x[zero] = rng.normal(size=(zero.sum(), D)) * 5
        y[zero] = (y[zero] + 1) % K
        return {**b, "x": jnp.asarray(x), "y": jnp.asarray(y)}

    out_a, _, _ = _step(name)
    out_b, _, _ = _step(name, _batches(fb=junk(FB), rb=junk(RB)))
    for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- SalUn and masks

def test_saliency_mask_matches_hand_ranking():
    w = np.array([-1, -1, -0.5, -1, -2, -1, -1, -1], np.float32)
    forget = {"x": X[:8], "y": Y[:8], "weight": w}
    mask = M.saliency_mask(APPLY, V0, forget, threshold=0.5, batch_size=3)
    W0, b0 = wb(V0)
    dz = w[:, None] * (softmax(X[:8] @ W0 + b0) - onehot(Y[:8]))   # sum_i (-eps_i) d(-CE_i)/dz
    gw, gb = grad(X[:8].astype(np.float64), dz)
    flat = np.abs(np.concatenate([gb, gw.ravel()]))                  # ravel_pytree: bias, kernel
    keep = int(flat.size * 0.5)
    expected = np.zeros(flat.size, bool)
    expected[np.argsort(-flat, kind="stable")[:keep]] = True
    got = np.asarray(ravel_pytree(jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), mask))[0]) > 0
    np.testing.assert_array_equal(got, expected)
    # restricted to a trainable subset: only its elements are ranked
    sub = M.saliency_mask(APPLY, V0, forget, threshold=0.5, trainable={"head": {"kernel": True, "bias": False}})
    assert not sub["head"]["bias"].any() and sub["head"]["kernel"].sum() == int(D * K * 0.5)
    with pytest.raises(ValueError, match="threshold"):
        M.saliency_mask(APPLY, V0, forget, threshold=0.0)


def _bits(a):
    return np.asarray(a).view(np.uint32)


def test_salun_masked_weights_bit_identical_with_weight_decay():
    forget, retain = {"x": X[:6], "y": Y[:6], "weight": -np.ones(6, np.float32)}, {"x": X[6:], "y": Y[6:]}
    v = jax.tree.map(lambda a: a, V0)
    v["params"]["head"]["bias"] = v["params"]["head"]["bias"].at[0].set(-0.0)  # a -0.0 weight
    mask = M.saliency_mask(APPLY, v, forget, threshold=0.4)
    mask["head"]["bias"][0] = False
    tx = base.sgd(0.1, momentum=0.9, weight_decay=0.05)
    out, _, _ = loop.run(M.salun(APPLY, mask, optimizer=tx), v, {"forget": forget, "retain": retain},
                         epochs=3, batch_size=4, key=jax.random.key(2), progress=False)
    for name in ("kernel", "bias"):
        m = np.asarray(mask["head"][name])
        before, after = v["params"]["head"][name], out["params"]["head"][name]
        np.testing.assert_array_equal(_bits(after)[~m], _bits(before)[~m])
        assert np.all(np.asarray(after)[m] != np.asarray(before)[m])


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        m = None if (mask is None or not train) else mask[:, None]
        h = nn.Dense(6, name="dense_0")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_0")(h, mask=m))
        h = nn.Dense(5, name="dense_1")(h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_1")(h, mask=m))
        return nn.Dense(K, name="head")(h), h


def test_layer_restricted_run_keeps_frozen_leaves_bit_identical():
    model = models.from_linen(_BNNet(), (D,), K, uses_mask=True)
    v = model.init(jax.random.key(0), X[:2])
    mask = models.last_k_mask(v["params"], 1)                       # head only
    mask = {**mask, "bn_1": {"scale": True, "bias": True}}         # and the last BatchNorm
    tx = base.sgd(0.05, momentum=0.9, weight_decay=0.01)
    method = M.cf_k(model.apply, mask, optimizer=tx)
    out, _, _ = loop.run(method, v, {"retain": {"x": X[5:], "y": Y[5:]}},
                         epochs=2, batch_size=4, key=jax.random.key(1), progress=False)
    for layer in ("dense_0", "bn_0", "dense_1"):
        for a, b in zip(jax.tree.leaves(v["params"][layer]), jax.tree.leaves(out["params"][layer])):
            np.testing.assert_array_equal(_bits(a), _bits(b))
    for a, b in zip(jax.tree.leaves(v["batch_stats"]["bn_0"]), jax.tree.leaves(out["batch_stats"]["bn_0"])):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    assert not np.allclose(v["batch_stats"]["bn_1"]["mean"], out["batch_stats"]["bn_1"]["mean"])
    assert not np.allclose(v["params"]["head"]["kernel"], out["params"]["head"]["kernel"])
    assert not np.allclose(v["params"]["bn_1"]["scale"], out["params"]["bn_1"]["scale"])


def test_bad_input_is_rejected():
    forget, retain = {"x": X[:5], "y": Y[:5]}, {"x": X[5:], "y": Y[5:]}
    kw = dict(epochs=1, batch_size=4, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="reads the 'forget' set"):
        loop.run(M.random_labels(APPLY), V0, {"retain": retain}, **kw)
    with pytest.raises(ValueError, match="forget set has no 'weight'"):
        loop.run(M.random_labels(APPLY), V0, {"forget": forget, "retain": retain}, **kw)
    with pytest.raises(ValueError, match="forget set's weight has shape"):
        loop.run(M.random_labels(APPLY), V0, {"forget": {**forget, "weight": np.ones(3)},
                                              "retain": retain}, **kw)
    with pytest.raises(ValueError, match="structure"):
        loop.run(M.finetune(APPLY, trainable={"body": True}), V0, {"retain": retain}, **kw)
    with pytest.raises(ValueError, match="selects no parameter"):
        M.finetune(APPLY, trainable={"head": {"kernel": False, "bias": False}})
    with pytest.raises(ValueError, match="epochs"):
        M.l1_sparse(APPLY, epochs=0)
    with pytest.raises(ValueError, match="larger than the input range"):
        M.boundary_shrink(APPLY, eps=2.0, input_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="alpha"):
        M.neggrad_plus(APPLY, alpha=1.5)
    with pytest.raises(ValueError, match="cf_k needs"):
        M.cf_k(APPLY, None)
