"""Influence scores: closed-form last layer vs autodiff, scores vs leave-one-out, measurements.

Oracles: ``jax.hessian`` / ``jax.grad`` of single examples, dense inverses, numpy group means,
scikit-learn's logistic regression, and actual leave-one-out retraining on UCI Adult.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import losses, methods, models, weights
from jaxunlearn.influence import update as U
from jaxunlearn.influence import last_layer as ll
from jaxunlearn.influence import measurements as M
from jaxunlearn.influence import scores as S
from jaxunlearn.influence import solvers
from jaxunlearn.influence import validation as V

x64 = functools.partial(jax.enable_x64, True)


def _problem_data(rng, n, d, k, icpt):
    X = ll.design(jnp.asarray(rng.normal(size=(n, d))), fit_intercept=icpt)
    y = jnp.asarray(rng.integers(0, max(k, 2), n))
    W = jnp.asarray(rng.normal(size=(X.shape[1], k))) * 0.4
    w = jnp.asarray(rng.uniform(0.5, 1.5, n)).at[2].set(0.0)
    return X, y, W, w


def _closed_and_oracle(W, X, y, w, l2, V):
    """(closed form, autodiff/brute-force oracle) pairs, computed in one jitted call."""

    def f(th):
        return ll.objective(th.reshape(W.shape), X, y, w, l2=l2)

    th = W.reshape(-1)
    Hd = jax.hessian(f)(th)

    def one(xi, yi):
        return jax.grad(lambda t: losses.cross_entropy((xi @ t.reshape(W.shape))[None], yi[None])[0])(th)

    G = jax.vmap(one)(X, y)
    n_eff = jnp.sum(w != 0)
    return {
        "hessian": (ll.hessian(W, X, w, l2=l2), Hd),
        "gradient": (ll.gradient(W, X, y, w, l2=l2).reshape(-1), jax.grad(f)(th)),
        "per_sample": (ll.per_sample_grads(W, X, y), G),
        "hvp": (ll.hvp(W, X, V, w, l2=l2), Hd @ V),
        "hvp1": (ll.hvp(W, X, V[:, 0], w, l2=l2), Hd @ V[:, 0]),
        "grads_dot": (ll.grads_dot(W, X, y, V), G @ V),
        # exact self-influence vs the brute-force inverse, chunked with a ragged last chunk
        "self_influence": (ll.self_influence(W, X, y, w, l2=l2, chunk_size=7),
                           jnp.einsum("np,pq,nq->n", G, jnp.linalg.inv(Hd), G) / n_eff),
    }


@pytest.mark.parametrize("k,icpt", [(1, False), (1, True), (3, False), (3, True)])
def test_closed_forms_match_autodiff(k, icpt):
    with x64():
        rng = np.random.default_rng(k + 10 * icpt)
        X, y, W, w = _problem_data(rng, 30, 4, k, icpt)
        # an unpenalised intercept is only identifiable for the single binary logit
        l2 = ll.l2_vector(4, 0.1, fit_intercept=icpt, penalize_intercept=k > 1, dtype=X.dtype)
        V = jnp.asarray(rng.normal(size=(W.size, 3)))
        out = jax.jit(_closed_and_oracle)(W, X, y, w, l2, V)
        for name, (closed, oracle) in out.items():
            np.testing.assert_allclose(closed, oracle, rtol=1e-10, atol=1e-12, err_msg=name)


def test_newton_fit_reaches_stationarity_and_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    with x64():
        rng = np.random.default_rng(0)
        n, d, C = 300, 5, 0.5
        x = rng.normal(size=(n, d))
        y = (x @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(np.int32)
        head, info = ll.refit_head(jnp.asarray(x), jnp.asarray(y), l2=ll.l2_from_sklearn(C, n))
        assert bool(info.converged) and float(info.grad_norm) < 1e-10
        ref = LogisticRegression(C=C, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(x, y)
        np.testing.assert_allclose(np.asarray(head["kernel"])[:, 0], ref.coef_[0], rtol=1e-5, atol=1e-7)
        # softmax with an intercept converges too; unpenalised softmax intercepts are rejected
        y3 = rng.integers(0, 3, n)
        head3, info3 = ll.refit_head(jnp.asarray(x), jnp.asarray(y3), l2=0.01, num_outputs=3,
                                     fit_intercept=True)
        assert bool(info3.converged) and float(info3.grad_norm) < 1e-10
        with pytest.raises(ValueError, match="identifiable"):
            ll.refit_head(jnp.asarray(x), jnp.asarray(y3), l2=0.01, num_outputs=3, fit_intercept=True,
                          penalize_intercept=False)


def _lr_setup(rng, n=150, d=4, icpt=True):
    x = rng.normal(size=(n, d))
    y = (x[:, 0] + 0.7 * rng.normal(size=n) > 0).astype(np.int32)
    xv = rng.normal(size=(60, d))
    vb = {"x": jnp.asarray(xv), "y": jnp.asarray((xv[:, 0] > 0).astype(np.int32)),
          "group": jnp.asarray(np.arange(60) % 2)}
    l2 = 0.02
    head, _ = ll.refit_head(jnp.asarray(x), jnp.asarray(y), l2=l2, fit_intercept=icpt)
    return x, y, vb, l2, head


def _measures(apply_fn, vb, head):
    adv = M.linear_adversarial_batch(vb, head["kernel"], head.get("bias"))
    return {"utility": (M.utility(apply_fn), vb), "dp": (M.demographic_parity(apply_fn), vb),
            "eop": (M.equal_opportunity(apply_fn), vb), "robustness": (M.utility(apply_fn), adv)}


def test_last_layer_path_equals_generic_path_on_lr():
    with x64():
        rng = np.random.default_rng(1)
        x, y, vb, l2, head = _lr_setup(rng)
        model = models.logistic_regression(4, 1)
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "weight": jnp.ones(len(y))}
        generic = S.make_problem(S.model_loss(model.apply), {"head": head}, batch, l2=l2, chunk_size=64)
        closed = ll.make_problem(head, {"x": x, "y": y}, l2=l2)
        closed_measures = _measures(ll.head_apply, vb, head)
        rg = S.influence_scores(generic, _measures(model.apply, vb, head))
        rl = S.influence_scores(closed, closed_measures, with_self_influence=True)
        for k in rg.scores:
            scale = float(jnp.max(jnp.abs(rl.scores[k])))
            assert scale > 0
            np.testing.assert_allclose(rg.scores[k], rl.scores[k], atol=1e-10 * scale + 1e-15)
            assert rg.values[k] == pytest.approx(rl.values[k], rel=1e-12)
        # exact self-influence: generic triangular solves vs the closed form sharing the solve's H
        np.testing.assert_allclose(S.self_influence(generic, chunk_size=32), rl.self_influence, rtol=1e-9)
        # the seed-004 scaling drops the 1/n
        r4 = S.influence_scores(closed, closed_measures, scale="seed004", with_self_influence=True)
        np.testing.assert_allclose(r4.scores["dp"], len(y) * rl.scores["dp"], rtol=1e-12)


def test_scores_predict_small_weight_perturbation_exactly():
    # first-order exactness: removing a tiny fraction delta of sample i changes m by delta * score_i
    with x64():
        rng = np.random.default_rng(2)
        x, y, vb, l2, head = _lr_setup(rng)
        n = len(y)
        res = S.influence_scores(ll.make_problem(head, {"x": x, "y": y}, l2=l2), _measures(ll.head_apply, vb, head),
                                 with_self_influence=True)  # same compiled call as the test above
        refit = V.last_layer_refit(x, y, l2=l2, fit_intercept=True, num_outputs=1)
        measures = _measures(ll.head_apply, vb, head)  # adversarial points: fixed data
        evaluate = jax.jit(lambda h, bs: [m(h, b) for (m, _), b in zip(measures.values(), bs)])
        batches = [b for _, b in measures.values()]
        for i in (0, 7):
            new, gn = refit(np.ones(n) - 1e-4 * (np.arange(n) == i), head)
            assert gn < 1e-10
            new = evaluate(new, batches)
            for k, v in zip(measures, new):
                actual = (float(v) - res.values[k]) / 1e-4
                assert actual == pytest.approx(float(res.scores[k][i]), rel=2e-3, abs=1e-9)


def _adult_subset(n, seed=0, min_count=30):
    """A row subset of Adult train; drops one-hot columns with fewer than ``min_count`` ones.

    In a small subset a category seen in only a handful of rows makes those rows high-leverage
    points (standardised value ~ sqrt(n / count)), where first-order influence breaks down; on the
    full training set (experiments/influence_validity.py) no column is dropped.
    """
    from jaxunlearn.data.tabular import load_adult

    ds = load_adult()
    rng = np.random.default_rng(seed)
    idx = rng.choice(ds.train["x"].shape[0], n, replace=False)
    xr = ds.train["x"][idx]
    keep = np.array([len(np.unique(c)) > 2 or np.unique(c, return_counts=True)[1].min() >= min_count
                     for c in xr.T])
    vi = rng.choice(ds.val["x"].shape[0], 1500, replace=False)
    val = {"x": ds.val["x"][vi][:, keep], "y": ds.val["y"][vi], "group": ds.val["group"][vi]}
    return xr[:, keep], ds.train["y"][idx], val


def test_loo_correlations_on_adult_lr():
    with x64():
        x, y, val = _adult_subset(2000)
        x = jnp.asarray(x, jnp.float64)
        vb = {k: jnp.asarray(v, jnp.float64 if k == "x" else None) for k, v in val.items()}
        l2 = 2.2622 / x.shape[0]  # the reference's sklearn C = 1 / 2.2622, no intercept
        head, info = ll.refit_head(x, jnp.asarray(y), l2=l2, fit_intercept=False)
        assert bool(info.converged)
        measures = {
            "utility": (M.utility(ll.head_apply), vb),
            "dp": (M.demographic_parity(ll.head_apply), vb),
            "robustness": (M.utility(ll.head_apply), M.linear_adversarial_batch(vb, head["kernel"])),
        }
        res, infl = V.validate_last_layer(head, {"x": x, "y": y}, measures, l2=l2, num_points=30)
        assert len(res.indices) == 30 and res.max_grad_norm < 1e-8
        for k in measures:
            assert res.pearson[k] >= 0.95, (k, res.pearson)
            assert res.spearman[k] >= 0.95, (k, res.spearman)
            # the points span the range of the scores, both signs
            assert res.predicted[k].min() < 0 < res.predicted[k].max()


def test_dp_and_eop_measurements_match_numpy():
    rng = np.random.default_rng(3)
    n, d = 90, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 3, n)
    g = rng.integers(0, 3, n)
    w = np.ones(n, np.float32)
    w[:5] = 0  # padding
    W = rng.normal(size=(d, 3)).astype(np.float32)
    head = {"kernel": jnp.asarray(W)}
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "group": jnp.asarray(g), "weight": jnp.asarray(w)}
    z = x @ W
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ce = -np.log(p[np.arange(n), y])
    live = w != 0
    mu = np.array([[p[live & (g == s), c].mean() for c in range(3)] for s in range(3)])
    dp = jax.jit(M.demographic_parity(ll.head_apply, num_groups=3, aggregate="range"))(head, batch)
    assert float(dp) == pytest.approx(np.mean(mu.max(0) - mu.min(0)), rel=1e-5)
    mad = jax.jit(M.demographic_parity(ll.head_apply, num_groups=3, aggregate="mad", classes=[2]))(head, batch)
    assert float(mad) == pytest.approx(np.mean(np.abs(mu[:, 2] - p[live, 2].mean())), rel=1e-5)
    L = np.array([[ce[live & (g == s) & (y == c)].mean() for c in range(3)] for s in range(3)])
    eop = jax.jit(M.equal_opportunity(ll.head_apply, num_groups=3, aggregate="range"))(head, batch)
    assert float(eop) == pytest.approx(np.mean(L.max(0) - L.min(0)), rel=1e-5)
    # binary, signed: the reference orientation (DP: s=1 minus s=0; EOP: s=0 minus s=1 on y=1)
    yb, gb = (y > 0).astype(np.int32), (g > 0).astype(np.int32)
    hb = {"kernel": jnp.asarray(W[:, :1]), "bias": jnp.asarray([0.2], jnp.float32)}
    bb = {"x": jnp.asarray(x), "y": jnp.asarray(yb), "group": jnp.asarray(gb)}
    pb = 1 / (1 + np.exp(-(x @ W[:, 0] + 0.2)))
    dps = jax.jit(M.demographic_parity(ll.head_apply, aggregate="signed"))(hb, bb)
    assert float(dps) == pytest.approx(pb[gb == 1].mean() - pb[gb == 0].mean(), rel=1e-5)
    ceb = -np.log(np.where(yb == 1, pb, 1 - pb))
    eops = jax.jit(M.equal_opportunity(ll.head_apply, aggregate="signed"))(hb, bb)
    want = ceb[(gb == 0) & (yb == 1)].mean() - ceb[(gb == 1) & (yb == 1)].mean()
    assert float(eops) == pytest.approx(want, rel=1e-5)
    # signed is the default; "range" is its absolute value
    assert float(jax.jit(M.demographic_parity(ll.head_apply))(hb, bb)) == float(dps)
    assert float(jax.jit(M.demographic_parity(ll.head_apply, aggregate="range"))(hb, bb)) == \
        pytest.approx(abs(float(dps)), rel=1e-6)
    with pytest.raises(ValueError, match="aggregate='range'"):  # more groups: the remedy is named
        M.demographic_parity(ll.head_apply, num_groups=3)


def test_absent_groups_raise():
    head = {"kernel": jnp.ones((2, 1))}
    x = jnp.ones((6, 2))
    only_g0 = {"x": x, "y": jnp.asarray([0, 1, 0, 1, 0, 1]), "group": jnp.zeros(6, jnp.int32)}
    dp = M.demographic_parity(ll.head_apply)
    with pytest.raises(ValueError, match="group=1"):
        dp(head, only_g0)
    with pytest.raises(ValueError, match="group=1"):
        dp.validate(only_g0)
    assert np.isnan(float(jax.jit(dp)(head, only_g0)))  # under jit: NaN, never a silent number
    no_pos_in_g1 = {"x": x, "y": jnp.asarray([1, 1, 0, 0, 0, 0]), "group": jnp.asarray([0, 0, 0, 1, 1, 1])}
    eop = M.equal_opportunity(ll.head_apply)
    with pytest.raises(ValueError, match=r"group=1, y=1"):
        eop(head, no_pos_in_g1)
    padded_away = dict(no_pos_in_g1, y=jnp.asarray([1, 1, 0, 1, 0, 0]), weight=jnp.asarray([1., 1, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"group=1, y=1"):
        eop.validate(padded_away)
    with pytest.raises(ValueError, match="outside"):
        M.demographic_parity(ll.head_apply)(head, dict(only_g0, group=jnp.asarray([0, 1, 2, 0, 1, 0])))
    with pytest.raises(ValueError, match="two groups"):
        M.demographic_parity(ll.head_apply, num_groups=3, aggregate="signed")
    with pytest.raises(ValueError, match="scalar"):
        M.custom(lambda p, b: b["x"])(head, only_g0)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, 2))
    ys = (rng.random(20) < 0.5).astype(np.int32)
    problem = ll.make_problem(head, {"x": xs, "y": ys}, l2=0.1)
    with pytest.raises(ValueError, match="group=1"):
        S.influence_scores(problem, {"dp": (dp, only_g0)}, on_nonstationary="ignore")
    with pytest.raises(ValueError, match="shape"):
        S.influence_scores(problem, {"g": jnp.ones(5)}, on_nonstationary="ignore")


def test_stationarity_check():
    with x64():
        rng = np.random.default_rng(4)
        x, y, vb, l2, head = _lr_setup(rng)
        far = {"kernel": jnp.ones_like(head["kernel"]), "bias": head["bias"]}
        m = {"u": (M.utility(ll.head_apply), vb)}
        with pytest.warns(S.NonStationaryWarning):
            S.influence_scores(ll.make_problem(far, {"x": x, "y": y}, l2=l2), m)
        with pytest.raises(S.NonStationaryError):
            S.influence_scores(ll.make_problem(far, {"x": x, "y": y}, l2=l2), m, on_nonstationary="raise")
        with pytest.raises(S.NonStationaryError):
            S.self_influence(ll.make_problem(far, {"x": x, "y": y}, l2=l2), on_nonstationary="raise")
        res = S.influence_scores(ll.make_problem(head, {"x": x, "y": y}, l2=l2), m, on_nonstationary="raise")
        assert res.grad_norm < 1e-10


def test_cg_on_softmax_head_over_4096_rows_matches_direct():
    # guards the XLA:CPU forward-mode bug of DESIGN.md (>= 4096 rows through softmax(X W))
    rng = np.random.default_rng(5)
    n, d, k = 4500, 6, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    # any point of an L2 logistic objective has H > 0: no fit needed to compare solvers
    head = {"kernel": jnp.asarray(rng.normal(size=(d, k)), jnp.float32) * 0.3,
            "bias": jnp.asarray(rng.normal(size=k), jnp.float32) * 0.3}
    problem = ll.make_problem(head, {"x": x, "y": y}, l2=1e-2)
    vb = {"x": jnp.asarray(x[:500]), "y": jnp.asarray(y[:500]), "group": jnp.asarray(np.arange(500) % 2)}
    m = {"u": (M.utility(ll.head_apply), vb), "dp": (M.demographic_parity(ll.head_apply), vb)}
    kw = {"on_nonstationary": "ignore"}
    cg = S.influence_scores(problem, m, solver=solvers.CG(tol=1e-6), **kw)
    assert float(jnp.max(cg.solve.residual)) < 1e-5
    # oracle: the closed forms in float64 numpy and a dense solve
    # (flat order of both problem builders: the bias row first)
    X = np.concatenate([np.ones((n, 1)), x], 1).astype(np.float64)
    Wm = np.concatenate([np.asarray(head["bias"])[None], np.asarray(head["kernel"])], 0).astype(np.float64)
    z = X @ Wm
    P = np.exp(z - z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    R = P - np.eye(k)[y]
    G = (X[:, :, None] * R[:, None, :]).reshape(n, -1)
    H = sum(np.kron(np.outer(X[i], X[i]), np.diag(P[i]) - np.outer(P[i], P[i])) for i in range(n)) / n
    H += 1e-2 * np.eye(H.shape[0])
    direct = {key: G @ np.linalg.solve(H, np.asarray(cg.measure_grads[key], np.float64)) / n for key in m}
    for key in m:
        np.testing.assert_allclose(cg.scores[key], direct[key], atol=1e-4 * np.abs(direct[key]).max())
    # generic (autodiff) CG on the same model agrees too
    model = models.logistic_regression(d, k)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "weight": jnp.ones(n)}
    generic = S.make_problem(S.model_loss(model.apply), {"head": head}, batch, l2=1e-2, chunk_size=1500)
    gm = {"u": (M.utility(model.apply), vb), "dp": (M.demographic_parity(model.apply), vb)}
    gcg = S.influence_scores(generic, gm, solver=solvers.CG(tol=1e-6), **kw)
    for key in m:
        np.testing.assert_allclose(gcg.scores[key], direct[key], atol=1e-4 * np.abs(direct[key]).max())


def test_lbfgs_refit_agrees_with_newton():
    with x64():
        rng = np.random.default_rng(6)
        x, y, vb, l2, head = _lr_setup(rng, n=120, icpt=True)
        model = models.logistic_regression(4, 1)
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
        w = np.ones(len(y))
        w[3] = 0
        refit = V.lbfgs_refit(S.model_loss(model.apply), batch, l2=l2)
        new, gn = refit(w, {"head": head})
        assert gn < 1e-8
        newton = V.last_layer_refit(x, y, l2=l2, fit_intercept=True, num_outputs=1)
        ref, gn2 = newton(w, head)
        assert gn2 < 1e-10
        np.testing.assert_allclose(new["head"]["kernel"], ref["kernel"], atol=1e-7)
        np.testing.assert_allclose(new["head"]["bias"], ref["bias"], atol=1e-7)


def test_correlation_helpers():
    a = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    assert V.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert V.spearman(a, a ** 3) == pytest.approx(1.0)
    assert V.spearman(a, -a) == pytest.approx(-1.0)
    b = np.array([1.0, 1.0, 2.0, 3.0, 3.0])  # ties averaged like scipy
    from scipy.stats import spearmanr

    assert V.spearman(b, a) == pytest.approx(spearmanr(b, a).statistic)
    idx = V.select_points({"m": np.arange(100.0)[::-1]}, 10)
    assert len(idx) == 10 and 0 in idx and 99 in idx


# ----------------------------------------------------------------------------- one API, staging


def _softmax_setup(seed=7, n=80, d=3, k=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)))
    y = jnp.asarray(rng.integers(0, k, n))
    head = {"kernel": jnp.asarray(rng.normal(size=(d, k))) * 0.3,
            "bias": jnp.asarray(rng.normal(size=k)) * 0.3}
    batch = {"x": x, "y": y, "weight": jnp.ones(n).at[4].set(0.0)}
    return head, batch


def _two_block_loss(params, b):  # a frozen identity "body" under the head: features = x
    feats = b["x"] @ params["body"]["kernel"]
    return losses.cross_entropy(feats @ params["head"]["kernel"] + params["head"]["bias"], b["y"])


def test_both_problem_builders_share_one_flat_order_and_a_mask_selects():
    with x64():
        head, batch = _softmax_setup()
        d, k = head["kernel"].shape
        params = {"body": {"kernel": jnp.eye(d)}, "head": head}
        closed = ll.make_problem(head, batch, l2=0.05)
        by_name = S.make_problem(_two_block_loss, params, batch, l2=0.05, select="head")
        mask = {"body": {"kernel": False}, "head": {"bias": True, "kernel": True}}
        by_mask = S.make_problem(_two_block_loss, params, batch, l2=0.05, select=mask)
        # one flat order: ravel_pytree of {"bias", "kernel"}, the bias first
        want = np.concatenate([np.asarray(head["bias"]), np.asarray(head["kernel"]).reshape(-1)])
        rng = np.random.default_rng(0)
        V = jnp.asarray(rng.normal(size=(d * k + k, 2)))
        Uv = jnp.asarray(rng.normal(size=(batch["y"].shape[0], 2)))
        for prob in (closed, by_name, by_mask):
            np.testing.assert_array_equal(prob.flat, want)
            assert prob.normalizer == closed.normalizer
        for prob in (by_name, by_mask):
            for f, args in (("hvp", (V,)), ("grads_dot", (V,)), ("grads_tdot", (Uv,)), ("hessian", ()),
                            ("gradient", ())):
                np.testing.assert_allclose(getattr(prob, f)(prob.data, *args),
                                           getattr(closed, f)(closed.data, *args), rtol=1e-10, atol=1e-13,
                                           err_msg=f)
        with pytest.raises(ValueError, match="does not have the structure of the parameters"):
            S.make_problem(_two_block_loss, params, batch, select={"head": True})
        with pytest.raises(ValueError, match="'x'"):
            ll.make_problem(head, {"features": batch["x"]}, l2=0.05)


def test_signed_scores_are_range_scores_times_the_sign_of_the_gap():
    with x64():
        head, batch = _softmax_setup(seed=8, k=2)
        head = {"kernel": head["kernel"][:, :1], "bias": head["bias"][:1]}
        batch = dict(batch, y=(batch["y"] > 0).astype(jnp.int32))
        head, _ = ll.refit_head(batch["x"], batch["y"], l2=0.05, fit_intercept=True, weight=batch["weight"])
        vb = {"x": batch["x"], "y": batch["y"], "group": (batch["x"][:, 1] > 0).astype(jnp.int32)}
        problem = ll.make_problem(head, batch, l2=0.05)
        m = {"signed": (M.demographic_parity(ll.head_apply), vb),
             "range": (M.demographic_parity(ll.head_apply, aggregate="range"), vb)}
        res = S.influence_scores(problem, m)
        sign = np.sign(res.values["signed"])
        assert res.values["range"] == pytest.approx(abs(res.values["signed"]))
        np.testing.assert_allclose(res.scores["range"], sign * res.scores["signed"], rtol=1e-10)


def _eq8_oracle(head, x, y, w, eps, l2):
    """Seed 004 eq. (8) in numpy float64 for a binary head with intercept (design [1, x])."""
    X = np.concatenate([np.ones((x.shape[0], 1)), np.asarray(x)], 1)
    th = np.concatenate([np.asarray(head["bias"]), np.asarray(head["kernel"])[:, 0]])
    p = 1 / (1 + np.exp(-(X @ th)))
    live = np.asarray(w) != 0
    n = live.sum()
    H = (X[live] * (p * (1 - p))[live, None]).T @ X[live] / n + l2 * np.eye(X.shape[1])
    g = X.T @ (np.asarray(eps) * live * (p - np.asarray(y)))
    return th - np.linalg.solve(H, g) / n


def test_influence_update_is_eq8_on_both_builders_and_the_method():
    with x64():
        rng = np.random.default_rng(9)
        x, y, vb, l2, head = _lr_setup(rng, n=120, icpt=True)
        n = len(y)
        w = np.ones(n)
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "weight": jnp.asarray(w)}
        eps = np.zeros(n)
        eps[[3, 10, 50]] = -1.0
        eps[20:30] = rng.uniform(-0.3, 0.3, 10)
        want = _eq8_oracle(head, x, y, w, eps, l2)
        closed = ll.make_problem(head, batch, l2=l2)
        new = U.influence_update(closed, solvers.Direct(), eps)
        np.testing.assert_allclose(np.r_[new["bias"], new["kernel"][:, 0]], want, rtol=1e-10)
        generic = S.make_problem(S.model_loss(models.logistic_regression(4, 1).apply), {"head": head},
                                 batch, l2=l2)
        new_cg = U.influence_update(generic, solvers.CG(tol=1e-12), eps)["head"]
        np.testing.assert_allclose(np.r_[new_cg["bias"], new_cg["kernel"][:, 0]], want, rtol=1e-8)
        # the one-shot Method shares eq. (8): same parameters from its forget batch (weights eps)
        L = np.linalg.cholesky(np.asarray(closed.hessian(closed.data)))

        def inverse_hvp(v, chol):
            flat = ll.head_to_matrix(v).reshape(-1)
            sol = jax.scipy.linalg.cho_solve((chol, True), flat)
            return ll.matrix_to_head(sol.reshape(-1, 1), fit_intercept=True)

        method = methods.influence_unlearning(ll.head_apply, inverse_hvp, num_train=n, operands=jnp.asarray(L))
        variables = {"params": head}
        state = method.init(variables)
        forget = {"x": jnp.asarray(x), "y": jnp.asarray(y), "weight": jnp.asarray(eps)}
        out, _, _ = method.update(variables, state, {"forget": forget}, jax.random.key(0))
        np.testing.assert_allclose(np.r_[out["params"]["bias"], out["params"]["kernel"][:, 0]], want, rtol=1e-10)
        # first order in eps: the update predicts the reweighted refit
        refit = V.last_layer_refit(x, y, l2=l2, fit_intercept=True, num_outputs=1)
        t = 1e-4
        actual, gn = refit(1 + t * eps, head)
        small = U.influence_update(closed, solvers.Direct(), t * eps)
        th0 = np.r_[head["bias"], head["kernel"][:, 0]]
        np.testing.assert_allclose(np.r_[small["bias"], small["kernel"][:, 0]] - th0,
                                   np.r_[actual["bias"], actual["kernel"][:, 0]] - th0, rtol=1e-3)
        with pytest.raises(ValueError, match=r"eps must have shape \[120\]"):
            U.influence_update(closed, solvers.Direct(), eps[:-1])
        with pytest.raises(ValueError, match="solver object"):
            U.influence_update(closed, "direct", eps)


def test_sweep_influence_update_matches_a_plain_loop():
    with x64():
        rng = np.random.default_rng(10)
        x, y, vb, l2, head = _lr_setup(rng, n=200, icpt=True)
        closed = ll.make_problem(head, {"x": x, "y": y}, l2=l2)
        dp = M.demographic_parity(ll.head_apply)
        res = S.influence_scores(closed, {"dp": (dp, vb)})
        scores = np.sign(res.values["dp"]) * np.asarray(res.scores["dp"])  # lowers |DP|
        evaluate = jax.jit(lambda h: jnp.abs(dp(h, vb)))
        fractions = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
        got = U.sweep_influence_update(closed, scores, lambda h: float(evaluate(h)), fractions, patience=2)
        plain = weights.sweep_hard_fraction(
            lambda e: float(evaluate(U.influence_update(closed, solvers.Direct(), e))), scores, fractions,
            patience=2)
        assert got.fraction == plain.fraction and got.fraction > 0
        np.testing.assert_allclose(got.values, plain.values, rtol=1e-12)
        cg = U.sweep_influence_update(closed, scores, lambda h: float(evaluate(h)), fractions, patience=2,
                                      solver=solvers.CG(tol=1e-10))
        assert cg.fraction == plain.fraction
        np.testing.assert_allclose(cg.values, plain.values, rtol=1e-7)


def test_factor_is_reused_and_the_hessian_is_chunked_by_default(monkeypatch):
    def formed_again(*args, **kwargs):
        raise AssertionError("H formed again")

    with x64():
        head, batch = _softmax_setup(seed=11)
        params = {"body": {"kernel": jnp.eye(3)}, "head": head}
        loss = lambda p, b: _two_block_loss(p, b)  # a fresh function: nothing cached
        with monkeypatch.context() as mp:  # the default never forms H with all p tangents at once
            mp.setattr(jax, "hessian", formed_again)
            problem = S.make_problem(loss, params, batch, l2=0.05, select="head")
            vb = {"x": batch["x"][:30], "y": batch["y"][:30]}
            m = {"u": (M.custom(lambda p, b: jnp.mean(loss(p, b))), vb)}
            res = S.influence_scores(problem, m, with_self_influence=True, on_nonstationary="ignore")
        closed = ll.make_problem(head, batch, l2=0.05)
        np.testing.assert_allclose(res.factor.hessian, closed.hessian(closed.data), rtol=1e-10, atol=1e-14)
        no_h = problem._replace(hessian=formed_again)
        si = S.self_influence(no_h, factor=res.factor, on_nonstationary="ignore")
        np.testing.assert_allclose(si, res.self_influence, rtol=1e-12)
        again = S.influence_scores(no_h, m, factor=res.factor, on_nonstationary="ignore")
        np.testing.assert_allclose(again.scores["u"], res.scores["u"], rtol=1e-12)
        U.influence_update(no_h, solvers.Direct(), -np.eye(80)[0], factor=res.factor)
        with pytest.raises(ValueError, match="damping"):
            S.self_influence(problem, solver=solvers.Direct(damping=0.1), factor=res.factor)
        with pytest.raises(ValueError, match="Direct"):
            S.self_influence(problem, solver=solvers.CG())


def test_truncated_arnoldi_and_warm_started_cg_in_influence_scores():
    with x64():
        head, batch = _softmax_setup(seed=12, n=300, d=6)
        problem = ll.make_problem(head, batch, l2=1e-3)
        vb = {"x": batch["x"][:50], "y": batch["y"][:50]}
        m = {"u": (M.utility(ll.head_apply), vb)}
        kw = {"on_nonstationary": "ignore"}
        trunc = solvers.Arnoldi(rank=2, num_iters=4, key=jax.random.key(0))
        with pytest.raises(solvers.NonConvergenceError, match="truncation"):
            S.influence_scores(problem, m, solver=trunc, **kw)
        with pytest.warns(solvers.SolverWarning, match="rank-2"):
            r = S.influence_scores(problem, m, solver=dataclasses.replace(trunc, raise_on_fail=False), **kw)
        assert not bool(r.solve.converged) and float(r.solve.residual.max()) > 1e-3
        cold = S.influence_scores(problem, m, solver=solvers.CG(tol=1e-10), **kw)
        warm = S.influence_scores(problem, m, solver=solvers.CG(tol=1e-10), x0=cold.directions, **kw)
        assert int(warm.solve.iterations) < int(cold.solve.iterations)
        np.testing.assert_allclose(warm.scores["u"], cold.scores["u"], rtol=1e-8)
        with pytest.raises(ValueError, match="solver object"):
            S.influence_scores(problem, m, solver="cg", **kw)


def test_kronecker_preconditioner_is_the_dense_inverse_and_speeds_up_cg():
    with x64():
        head, batch = _softmax_setup(seed=13, n=400, d=5, k=4)
        problem = ll.make_problem(head, batch, l2=1e-3)
        X = np.concatenate([np.ones((400, 1)), np.asarray(batch["x"])], 1)
        w = np.asarray(batch["weight"])
        P = np.asarray(ll.probabilities(ll.head_to_matrix(head), jnp.asarray(X)))
        A = (X * (w / w.sum())[:, None]).T @ X
        B = sum(wi * (np.diag(pi) - np.outer(pi, pi)) for wi, pi in zip(w, P)) / w.sum()
        Mk = np.kron(A, B) + (1e-3 + 0.1) * np.eye(A.shape[0] * B.shape[0])  # flat order (j, k)
        R = np.random.default_rng(0).normal(size=(Mk.shape[0], 3))
        got = problem.preconditioner(problem.data, 0.1)(jnp.asarray(R))
        np.testing.assert_allclose(got, np.linalg.solve(Mk, R), rtol=1e-8)
        vb = {"x": batch["x"][:60], "y": batch["y"][:60]}
        meas = {"u": (M.utility(ll.head_apply), vb)}
        kw = {"on_nonstationary": "ignore"}
        direct = S.influence_scores(problem, meas, **kw)
        plain = S.influence_scores(problem, meas, solver=solvers.CG(tol=1e-10, precondition=False), **kw)
        pre = S.influence_scores(problem, meas, solver=solvers.CG(tol=1e-10), **kw)
        assert int(pre.solve.iterations) < int(plain.solve.iterations)
        for r in (plain, pre):
            np.testing.assert_allclose(r.scores["u"], direct.scores["u"], rtol=1e-7, atol=1e-12)


def _two_block_apply(variables, x, train=False):
    p = variables["params"]
    return (x @ p["body"]["kernel"]) @ p["head"]["kernel"] + p["head"]["bias"], {}


def test_equal_problems_and_measures_reuse_one_compilation():
    """No module-level memo: problems built twice from the same loss function, and measures built
    twice from the same arguments, are equal values, so jit's own cache serves the second call."""
    with x64():
        head, batch = _softmax_setup(seed=12)
        params = {"body": {"kernel": jnp.eye(3)}, "head": head}
        vb = {"x": batch["x"][:20], "y": batch["y"][:20]}

        def run():
            problem = S.make_problem(_two_block_loss, params, batch, l2=0.05, select="head")
            m = {"u": (M.utility(_two_block_apply), vb)}
            return problem, m, S.influence_scores(problem, m, on_nonstationary="ignore")

        p1, m1, r1 = run()
        size = S._core_jit._cache_size()
        p2, m2, r2 = run()
        assert p1.hvp == p2.hvp and p1.hvp is not p2.hvp and m1["u"][0] == m2["u"][0]
        assert S._core_jit._cache_size() == size
        np.testing.assert_array_equal(r1.scores["u"], r2.scores["u"])
        other = S.make_problem(_two_block_loss, params, batch, l2=0.06, select="head")
        assert other.hvp != p1.hvp
