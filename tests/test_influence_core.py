"""Per-sample gradients, HVPs and inverse-HVP solvers against independent oracles.

Oracles: ``jax.grad`` of one example at a time, dense ``jax.hessian`` of a hand-flattened
objective, ``numpy.linalg.solve`` / ``eigh``. Tolerances (float32 unless stated): per-sample
grads rtol 1e-5; HVPs and dense Hessians rtol 1e-4 of the float32 ``jax.hessian``; the direct
solve rtol 1e-10 in float64; CG rtol 1e-4 of the float64 solution; LiSSA rtol 1e-3; Arnoldi
eigenvalues rtol 1e-4 and its full-rank solve rtol 1e-4 (all relative to the largest entry).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import losses, models
from jaxunlearn.influence import grads, hvp as hvp_lib, solvers

RTOL = 1e-5


# ------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def mlp():
    """``(loss_fn, params, batch)``: a Flax MLP 5-6-4-3 on 12 examples."""
    n, d, k = 12, 5, 3
    model = models.mlp(d, k, hidden=(6, 4))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, n), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]

    def loss_fn(p, batch):
        logits, _ = model.apply({"params": p}, batch["x"])
        return losses.cross_entropy(logits, batch["y"])

    return loss_fn, params, {"x": x, "y": y, "weight": jnp.ones(n, jnp.float32)}


L2 = 0.1


@pytest.fixture(scope="module")
def dense_oracle(mlp):
    """``(H [p, p] float64, unflatten)``: jax.hessian of a hand-flattened mean loss + L2 term."""
    loss_fn, params, batch = mlp
    flat, unflatten = grads.flatten_params(params)

    def f(q, batch):
        return jnp.mean(loss_fn(unflatten(q), batch)) + 0.5 * L2 * jnp.sum(q * q)

    return np.asarray(jax.jit(jax.hessian(f))(flat, batch), np.float64), unflatten


def _logreg_hessian(n=200, d=8, l2=0.05, seed=0, dtype=np.float64):
    """Closed-form logistic-regression Hessian X^T diag(p(1-p)) X / n + l2 I (numpy)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d) * 0.5
    p = 1 / (1 + np.exp(-x @ w))
    return ((x.T * (p * (1 - p))) @ x / n + l2 * np.eye(d)).astype(dtype)


def _spd(eigvals, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigvals), len(eigvals))))
    return (q * np.asarray(eigvals)) @ q.T, q


def _matvec(H):
    H = jnp.asarray(H)
    return lambda v: H @ v


def _tree_close(a, b, rtol=RTOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7), a, b)


# ------------------------------------------------------------------------------------------
# per-sample gradients

def test_per_sample_grads_match_single_example_autodiff(mlp):
    """Full tree, head-only subset, flat layout and chunking, against jax.grad of one example."""
    loss_fn, params, batch = mlp
    head, rest = grads.partition(params, "head")
    assert jax.tree_util.tree_structure(grads.combine(head, rest)) == jax.tree_util.tree_structure(params)

    @jax.jit
    def run(p, h, r, b):
        return {"tree": grads.per_sample_grads(loss_fn, p, b),
                "chunked": grads.per_sample_grads(loss_fn, p, b, chunk_size=5),  # 12 = 5 + 5 + 2
                "flat": grads.per_sample_grads_flat(loss_fn, p, b),
                "flat_chunked": grads.per_sample_grads_flat(loss_fn, p, b, chunk_size=4),
                "head": grads.per_sample_grads_flat(loss_fn, h, b, frozen=r, chunk_size=8)}

    out = run(params, head, rest, batch)
    single = jax.jit(jax.grad(lambda p, one: loss_fn(p, one)[0]))
    p_head = params["head"]["kernel"].size + params["head"]["bias"].size
    assert out["flat"].shape == (12, grads.flatten_params(params)[0].size)
    assert out["head"].shape == (12, p_head)
    for i in (0, 5, 11):
        ref = single(params, {k: v[i:i + 1] for k, v in batch.items()})
        _tree_close(jax.tree.map(lambda a: a[i], out["tree"]), ref)
        np.testing.assert_allclose(out["flat"][i], grads.flatten_params(ref)[0], rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(out["head"][i], grads.flatten_params(ref["head"])[0], rtol=RTOL, atol=1e-7)
    _tree_close(out["chunked"], out["tree"])
    np.testing.assert_allclose(out["flat_chunked"], out["flat"], rtol=RTOL, atol=1e-7)


def test_mean_grad_is_weighted_mean_of_per_sample_grads(mlp):
    loss_fn, params, batch = mlp
    w = np.ones(12, np.float32)
    w[[2, 9]] = 0.0
    w[4] = 0.25
    batch = {**batch, "weight": jnp.asarray(w)}
    per, got = jax.jit(lambda p, b: (grads.per_sample_grads_flat(loss_fn, p, b),
                                     grads.flatten_params(grads.mean_grad(loss_fn, p, b))[0]))(params, batch)
    ref = (w[:, None] * np.asarray(per)).sum(0) / np.count_nonzero(w)  # weighted_mean: / #(w != 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_bad_inputs_to_gradients_are_clear_errors(mlp):
    loss_fn, params, batch = mlp
    with pytest.raises(ValueError, match="per-example"):
        jax.eval_shape(lambda p, b: grads.per_sample_grads(lambda p, b: jnp.mean(loss_fn(p, b)), p, b),
                       params, batch)
    with pytest.raises(ValueError, match="leading size"):
        grads.per_sample_grads(loss_fn, params, {**batch, "y": batch["y"][:5]})
    with pytest.raises(ValueError, match="selects no parameter"):
        grads.partition(params, "decoder")
    # non-finite gradients: check_finite names the quantity and the leaves
    per = jax.jit(lambda p, b: grads.per_sample_grads(loss_fn, p, b))
    bad_x = batch["x"].at[3, 0].set(jnp.nan)
    with pytest.raises(grads.NonFiniteError, match="per-sample gradients.*kernel"):
        grads.check_finite(per(params, {**batch, "x": bad_x}), "per-sample gradients")
    assert grads.check_finite(per(params, batch), "ok") is not None


# ------------------------------------------------------------------------------------------
# Hessian-vector products

def test_hvp_modes_and_dense_hessian_match_jax_hessian(mlp, dense_oracle):
    loss_fn, params, batch = mlp
    H, unflatten = dense_oracle
    obj = grads.make_mean_objective(loss_fn, l2=L2)
    rng = np.random.default_rng(1)
    v = rng.normal(size=H.shape[0]).astype(np.float32)
    V = rng.normal(size=(H.shape[0], 3)).astype(np.float32)

    head, rest = grads.partition(params, "head")
    p_head = grads.flatten_params(head)[0].size  # "head" sorts last: the trailing block of H

    @jax.jit
    def run(p, b, v, V, head, rest):
        out = {mode: grads.flatten_params(hvp_lib.hvp(obj, p, unflatten(v), b, mode=mode))[0]
               for mode in hvp_lib.MODES}
        head_v = grads.flatten_params(head)[1](v[-p_head:])
        out["head"] = grads.flatten_params(hvp_lib.hvp(obj, head, head_v, b, rest))[0]
        out["flat"] = hvp_lib.make_flat_hvp(obj, p, b, damping=0.5, linearize=False)(V)
        out["linearized"] = hvp_lib.make_flat_hvp(obj, p, b, linearize=True)(V)
        out["dense"] = hvp_lib.dense_hessian(obj, p, b)
        out["dense_chunked"] = hvp_lib.dense_hessian(obj, p, b, chunk_size=16)
        return out

    out = run(params, batch, jnp.asarray(v), jnp.asarray(V), head, rest)
    np.testing.assert_allclose(out["head"], H[-p_head:, -p_head:] @ v[-p_head:], rtol=1e-4, atol=1e-5)
    for mode in hvp_lib.MODES:
        np.testing.assert_allclose(out[mode], H @ v, rtol=1e-4, atol=1e-5, err_msg=mode)
    np.testing.assert_allclose(out["flat"], H @ V + 0.5 * V, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["linearized"], H @ V, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["dense"], H, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["dense_chunked"], H, rtol=1e-4, atol=1e-6)


def test_hvp_shape_mismatch_is_a_clear_error(mlp):
    loss_fn, params, batch = mlp
    obj = grads.make_mean_objective(loss_fn)
    bad = jax.tree.map(jnp.zeros_like, params)
    bad["head"]["bias"] = jnp.zeros(7)
    with pytest.raises(ValueError, match="head/bias"):
        hvp_lib.hvp(obj, params, bad, batch)
    with pytest.raises(ValueError, match="structure"):
        hvp_lib.hvp(obj, params, {"head": params["head"]}, batch)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(lambda p, b: hvp_lib.make_flat_hvp(obj, p, b)(jnp.zeros(3)), params, batch)
    with pytest.raises(ValueError, match="mode"):
        hvp_lib.hvp(obj, params, params, batch, mode="fwd_fwd")


# ------------------------------------------------------------------------------------------
# direct solve

@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_solve_direct_matches_numpy_float64(method):
    H = _logreg_hessian(l2=0.0)
    b = np.random.default_rng(3).normal(size=(8, 3))
    with jax.enable_x64(True):
        solve = jax.jit(lambda h, b: solvers.solve_direct(h, b, damping=0.01, method=method))
        res = jax.tree.map(np.asarray, solve(jnp.asarray(H), jnp.asarray(b)))
        one = jax.tree.map(np.asarray, solve(jnp.asarray(H), jnp.asarray(b[:, 0])))
    assert res.x.dtype == np.float64
    np.testing.assert_allclose(res.x, np.linalg.solve(H + 0.01 * np.eye(8), b), rtol=1e-10)
    assert res.residual.shape == (3,) and res.residual.max() < 1e-12 and bool(res.converged)
    assert one.x.shape == (8,) and one.residual.shape == ()
    np.testing.assert_allclose(one.x, res.x[:, 0], rtol=1e-12)
    if method == "cholesky":  # a factor from the caller is used as is (and checked like its own)
        with jax.enable_x64(True):
            L = np.linalg.cholesky(H + 0.01 * np.eye(8))
            given = solvers.solve_direct(jnp.asarray(H), jnp.asarray(b), damping=0.01, factor=L)
            with pytest.warns(solvers.SolverWarning, match="not positive definite"):
                wrong = solvers.solve_direct(jnp.asarray(H), jnp.asarray(b), damping=0.01,
                                             factor=np.full((8, 8), np.nan), raise_on_fail=False)
        np.testing.assert_allclose(np.asarray(given.x), res.x, rtol=1e-10)
        assert not bool(wrong.converged)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_singular_or_indefinite_hessian_raises(method):
    # duplicated feature: X^T X is singular without damping
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5))
    x[:, 4] = x[:, 3]
    H = jnp.asarray(x.T @ x / 100, jnp.float32)
    b = jnp.ones(5)
    with pytest.raises(solvers.SingularHessianError, match="add damping"):
        solvers.solve_direct(H, b, method=method)
    solve = jax.jit(lambda h, b, damping: solvers.solve_direct(h, b, damping=damping, method=method))
    assert bool(solve(H, b, 0.1).converged)
    assert not bool(solve(H, b, 0.0).converged)  # inside jit: reported, not raised
    indefinite = jnp.asarray(_spd([2.0, 1.0, -0.5, 0.3, 0.1])[0], jnp.float32)
    with pytest.warns(solvers.SolverWarning, match="not positive definite"):
        res = solvers.solve_direct(indefinite, b, method=method, raise_on_fail=False)
    assert not bool(res.converged)


# ------------------------------------------------------------------------------------------
# iterative solvers vs the direct solve

def _system(q=4, seed=0):
    H = _logreg_hessian(d=12, l2=0.02, seed=seed, dtype=np.float32)
    b = np.random.default_rng(seed + 1).normal(size=(12, q)).astype(np.float32)
    ref = np.linalg.solve(H.astype(np.float64) + 0.01 * np.eye(12), b.astype(np.float64))
    return jnp.asarray(H), jnp.asarray(b), ref


def _close(x, ref, rtol, **kw):
    np.testing.assert_allclose(x, ref, rtol=rtol, atol=rtol * np.abs(ref).max(), **kw)


def test_cg_matches_direct():
    H, b, ref = _system()

    @jax.jit
    def run(H, b, x0):
        plain = solvers.solve_cg(_matvec(H), b, damping=0.01, tol=1e-6)
        warm = solvers.solve_cg(_matvec(H), b[:, 0], damping=0.01, x0=x0)
        diag = jnp.diag(H) + 0.01
        pre = solvers.solve_cg(_matvec(H), b, damping=0.01, preconditioner=lambda r: r / diag)
        return plain, warm, pre

    plain, warm, pre = run(H, b, jnp.asarray(ref[:, 0] * 0.9, jnp.float32))
    assert bool(plain.converged) and plain.residual.shape == (4,) and float(plain.residual.max()) < 1e-5
    _close(plain.x, ref, 1e-4)
    _close(warm.x, ref[:, 0], 1e-4)
    _close(pre.x, ref, 1e-4)
    assert bool(pre.converged) and int(pre.iterations) <= int(plain.iterations)


def test_cg_non_convergence_is_reported_with_residual():
    H, b, _ = _system()
    with pytest.raises(solvers.NonConvergenceError, match="residual .* after 2 iterations"):
        solvers.solve_cg(_matvec(H), b, damping=0.01, maxiter=2)
    with pytest.warns(solvers.SolverWarning, match="residual"):
        res = solvers.solve_cg(_matvec(H), b, damping=0.01, maxiter=2, raise_on_fail=False)
    assert int(res.iterations) == 2 and float(res.residual.max()) > 1e-3 and not bool(res.converged)
    jitted = jax.jit(lambda h, b: solvers.solve_cg(_matvec(h), b, damping=0.01, maxiter=2))(H, b)
    assert not bool(jitted.converged)
    with pytest.raises(solvers.NonConvergenceError, match="influence CG"):
        solvers.check_solve(jitted, "influence CG")
    indefinite = jnp.asarray(_spd([2.0, 1.0, -0.5, 0.3, 0.1])[0], jnp.float32)
    with pytest.raises(solvers.NonConvergenceError, match="not positive definite"):
        solvers.solve_cg(_matvec(indefinite), jnp.ones((5, 2)))


def test_lissa_matches_direct_and_detects_divergence():
    H, b, ref = _system(q=2)
    res = jax.jit(lambda H, b: solvers.solve_lissa(_matvec(H), b, damping=0.01, tol=1e-6, depth=20_000))(H, b)
    assert bool(res.converged) and int(res.iterations) < 20_000
    _close(res.x, ref, 1e-3)
    lam_max = float(np.linalg.eigvalsh(np.asarray(H))[-1] + 0.01)
    with pytest.raises(solvers.DivergenceError, match="diverged"):
        solvers.solve_lissa(_matvec(H), b, damping=0.01, scale=lam_max / 4)
    indefinite = jnp.asarray(_spd([2.0, 1.0, -0.5, 0.3, 0.1])[0], jnp.float32)
    with pytest.raises(solvers.DivergenceError):
        solvers.solve_lissa(_matvec(indefinite), jnp.ones(5), scale=2.5)
    with pytest.raises(solvers.NonConvergenceError, match="depth"):
        solvers.solve_lissa(_matvec(H), b, damping=0.01, depth=5)


def test_arnoldi_decaying_spectrum_and_full_rank():
    lam = 2.0 ** -np.arange(30)  # decaying spectrum, p = 30
    A, q = _spd(lam, seed=4)
    b = np.random.default_rng(5).normal(size=30)

    @jax.jit
    def run(A, b):
        mv = _matvec(A)
        top = solvers.arnoldi(mv, 30, rank=8, num_iters=20, key=jax.random.key(0))
        full = solvers.arnoldi(mv, 30, rank=30, num_iters=30, key=jax.random.key(1))
        return (top, solvers.solve_lowrank(top, b, damping=0.1),
                solvers.solve_lowrank(full, b, damping=0.1, matvec=mv, tol=1e-4))

    lr, res, got = run(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(lr.eigvals, lam[:8], rtol=1e-4)
    # the eigenvectors span the top-8 eigenspace
    np.testing.assert_allclose(np.abs(np.asarray(lr.eigvecs).T @ q[:, :8]), np.eye(8), atol=1e-3)
    # "ignore": the exact inverse on the top-r subspace, the rest of b dropped
    u = q[:, :8]
    _close(res.x, u @ ((u.T @ b) / (lam[:8] + 0.1)), 1e-4)
    np.testing.assert_allclose(res.residual, np.linalg.norm(b - u @ (u.T @ b)) / np.linalg.norm(b), rtol=1e-3)
    # full rank: exact
    assert bool(got.converged)
    _close(got.x, np.linalg.solve(A + 0.1 * np.eye(30), b), 1e-4)
    with pytest.raises(ValueError, match="num_iters"):
        solvers.arnoldi(_matvec(A), 30, rank=10, num_iters=5, key=jax.random.key(0))


def test_arnoldi_rank_deficient_restart_and_damping_complement():
    lam = np.r_[np.linspace(3.0, 1.0, 6), np.zeros(14)]  # rank 6, p = 20
    A, _ = _spd(lam, seed=6)
    b = np.random.default_rng(7).normal(size=(20, 2))

    @jax.jit
    def run(A, b):
        mv = _matvec(A)
        lr = solvers.arnoldi(mv, 20, rank=6, num_iters=12, key=jax.random.key(2))  # invariant after 6
        return lr, solvers.solve_lowrank(lr, b, damping=0.5, complement="damping", matvec=mv)

    lr, res = run(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(np.sort(lr.eigvals), np.sort(lam[:6]), rtol=1e-4)
    # H has rank 6, so treating the complement as 0 ("damping") is exact
    _close(res.x, np.linalg.solve(A + 0.5 * np.eye(20), b), 1e-4)
    assert float(res.residual.max()) < 1e-4
    with pytest.raises(solvers.SingularHessianError):
        solvers.solve_lowrank(solvers.LowRank(-lr.eigvals, lr.eigvecs), jnp.asarray(b[:, 0], jnp.float32))


def test_solver_objects_one_api():
    H, b, ref = _system(q=3)
    configs = {
        "direct": (solvers.Direct(damping=0.01), 1e-5),
        "cg": (solvers.CG(damping=0.01, tol=1e-6), 1e-4),
        "lissa": (solvers.LiSSA(damping=0.01, tol=1e-6, depth=20_000), 1e-3),
        "arnoldi": (solvers.Arnoldi(rank=12, num_iters=12, key=jax.random.key(0), damping=0.01), 1e-4),
    }
    shapes = []

    def matmat(V):  # a block product: the solvers must hand it [p, q] blocks, never vmap it
        shapes.append(V.shape)
        return H @ V

    @jax.jit
    def run(H, b, solver_tree):  # solver objects are pytrees: they pass through jit as arguments
        out = {}
        for name, solver in solver_tree.items():
            out[name] = (solver.solve(_matvec(H), b).x, solver.solve(H, b).x,
                         solver.solve(solvers.LinearOperator(matmat, lambda: H), b).x)
        return out

    got = run(H, b, {k: v[0] for k, v in configs.items()})
    for name, xs in got.items():
        for x in xs:
            _close(x, ref, configs[name][1], err_msg=name)
    assert all(len(s) == 2 for s in shapes) and {s[1] for s in shapes} <= {1, 3, 12}
    # hyperparameters are checked at construction, naming the argument
    with pytest.raises(ValueError, match="tol"):
        solvers.CG(tol=-1.0)
    with pytest.raises(ValueError, match="damping"):
        solvers.Direct(damping=-0.1)
    with pytest.raises(ValueError, match="rank"):
        solvers.Arnoldi(rank=13, num_iters=12, key=jax.random.key(0))
    with pytest.raises(ValueError, match="method"):
        solvers.Direct(method="lu")
    with pytest.raises(ValueError, match="square matrix"):
        solvers.CG().solve(jnp.ones((3, 4)), jnp.ones(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        solvers.CG().tol = 1.0
    # a factor serves many solves; its damping must be the solver's
    direct = solvers.Direct(damping=0.01)
    factor = direct.factorize(H)
    _close(direct.solve(factor, b).x, ref, 1e-5)
    with pytest.raises(ValueError, match="damping"):
        solvers.Direct(damping=0.5).solve(factor, b)


def test_truncated_arnoldi_reports_its_true_residual():
    lam = np.linspace(1.0, 0.5, 30)  # flat spectrum: a rank-5 inverse misses most of b
    A, _ = _spd(lam, seed=8)
    b = jnp.asarray(np.random.default_rng(9).normal(size=(30, 2)), jnp.float32)
    trunc = solvers.Arnoldi(rank=5, num_iters=10, key=jax.random.key(0), raise_on_fail=False)
    with pytest.warns(solvers.SolverWarning, match="exceeds tol"):
        res = trunc.solve(jnp.asarray(A, jnp.float32), b)
    true = np.linalg.norm(A @ np.asarray(res.x, np.float64) - np.asarray(b), axis=0) / np.linalg.norm(b, axis=0)
    np.testing.assert_allclose(res.residual, true, rtol=1e-3)
    assert true.min() > 0.3 and not bool(res.converged)
    with pytest.raises(solvers.NonConvergenceError):
        solvers.Arnoldi(rank=5, num_iters=10, key=jax.random.key(0)).solve(jnp.asarray(A, jnp.float32), b)
    full = solvers.Arnoldi(rank=30, num_iters=30, key=jax.random.key(0)).solve(jnp.asarray(A, jnp.float32), b)
    assert bool(full.converged) and float(full.residual.max()) < 1e-3


def test_cg_inside_jit_on_more_than_4096_softmax_rows():
    """Guard for the XLA:CPU bug of DESIGN.md: a constant-zero tangent through softmax(X W^T) with
    >= 4096 rows returns NaN/garbage inside jit; jax.scipy's cg with the default x0 hits it."""
    n, d, k = 4500, 32, 10
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, n))
    w = jnp.asarray(rng.normal(size=(k, d)) * 0.1, jnp.float32)

    def brier(w, batch):  # squared error of softmax probabilities: goes through jax.nn.softmax
        return jnp.sum(jnp.square(jax.nn.softmax(batch["x"] @ w.T) - jax.nn.one_hot(batch["y"], k)), -1)

    obj = grads.make_mean_objective(brier, l2=0.1)
    batch = {"x": x, "y": y, "weight": jnp.ones(n)}
    b = jnp.asarray(rng.normal(size=(d * k, 2)), jnp.float32)

    @jax.jit
    def solve(w, batch, b):
        return solvers.solve_cg(hvp_lib.make_flat_hvp(obj, w, batch), b, tol=1e-6)

    res = solve(w, batch, b)
    assert bool(res.converged) and float(res.residual.max()) < 1e-5
    H = np.asarray(jax.jit(lambda w, b: hvp_lib.dense_hessian(obj, w, b))(w, batch), np.float64)
    ref = np.linalg.solve(H, np.asarray(b, np.float64))
    np.testing.assert_allclose(res.x, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cg_object_warm_start_inside_jit_on_more_than_4096_softmax_rows():
    """The same guard through the CG object with a warm start passed as a jit argument."""
    n, d, k = 4500, 32, 10
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, n))
    w = jnp.asarray(rng.normal(size=(k, d)) * 0.1, jnp.float32)

    def brier(w, batch):
        return jnp.sum(jnp.square(jax.nn.softmax(batch["x"] @ w.T) - jax.nn.one_hot(batch["y"], k)), -1)

    obj = grads.make_mean_objective(brier, l2=0.1)
    batch = {"x": x, "y": y, "weight": jnp.ones(n)}
    b = jnp.asarray(rng.normal(size=(d * k, 2)), jnp.float32)

    @jax.jit
    def solve(w, batch, b, x0, solver):
        return solver.solve(hvp_lib.make_flat_hvp(obj, w, batch), b, x0=x0)

    cold = solve(w, batch, b, jnp.zeros_like(b), solvers.CG(tol=1e-6))
    warm = solve(w, batch, b, cold.x * 0.99, solvers.CG(tol=1e-6))
    assert bool(cold.converged) and bool(warm.converged) and float(warm.residual.max()) < 1e-5
    assert int(warm.iterations) < int(cold.iterations)
    np.testing.assert_allclose(warm.x, cold.x, rtol=1e-3, atol=1e-4 * float(jnp.abs(cold.x).max()))
