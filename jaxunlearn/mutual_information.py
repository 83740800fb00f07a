"""MINE: a neural lower bound on mutual information, as used by MIU (De Min et al. 2025).

The statistics network of De Min et al. is ``T(z, c) = Linear(512) -> ReLU -> Linear(1)`` on the
concatenation of penultimate features ``z`` [B, F] and a condition ``c`` [B, C] (the one-hot group).
The Donsker-Varadhan bound (Belghazi et al. 2018, eq. 10) is

    I(Z; C) >= E_P[T(z, c)] - log E_{P_Z x Q_C}[exp T(z, c~)],

where ``c~`` is drawn from a reference distribution ``Q_C``. With ``Q_C`` = the marginal of C (a
shuffled copy of ``c``, ``marginal="shuffle"``) the bound is on I(Z; C). De Min's code draws the
group uniformly at random (``marginal="uniform"``); the bound is then on
``KL(P_ZC || P_Z x U_C) = I(Z; C) + KL(P_C || U_C)``, which equals I(Z; C) only for balanced groups.

MINE's gradient of the log term is biased on minibatches; Belghazi et al. (Sec. 3.2) replace the
denominator ``E[exp T]`` of that gradient by an exponential moving average, which
:func:`mine_objective` does (the returned estimate itself is the plain DV bound).

The network is plain jnp (only :mod:`jaxunlearn.models` knows Flax); everything is pure, the caller
jits :func:`make_mine_step`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "MIDivergenceError",
    "MineState",
    "mine_init",
    "mine_statistic",
    "sample_marginal",
    "dv_bound",
    "mine_objective",
    "make_mine_step",
    "create_mine_state",
    "estimate_mi",
]


class MIDivergenceError(FloatingPointError):
    """The MINE estimate became non-finite or exploded (reported, never passed on silently)."""


class MineState(NamedTuple):
    """A MINE estimator under training: network params, optimizer state and the EMA of E[exp T]."""

    params: dict
    opt_state: object
    ema: jax.Array  # running estimate of E_{P_Z x Q_C}[exp T]
    step: jax.Array


def mine_init(key: jax.Array, z_dim: int, c_dim: int, *, hidden: int = 512) -> dict:
    """Parameters of ``T(z, c) = w2 . relu(W1 [z; c] + b1) + b2`` (LeCun-normal init)."""
    k1, k2 = jax.random.split(key)
    d = z_dim + c_dim
    return {
        "w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden),
        "b2": jnp.zeros((1,)),
    }


def mine_statistic(params: dict, z: jax.Array, c: jax.Array) -> jax.Array:
    """``T(z, c)`` [B] for features z [B, F] and condition c [B, C]."""
    h = jnp.concatenate([z.reshape(z.shape[0], -1), c], axis=-1)
    h = jax.nn.relu(h @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"])[:, 0]


def sample_marginal(key: jax.Array, c: jax.Array, *, marginal: str = "shuffle") -> jax.Array:
    """Draw ``c~`` from Q_C: a permutation of ``c`` ("shuffle") or uniform one-hots ("uniform")."""
    if marginal == "shuffle":
        return c[jax.random.permutation(key, c.shape[0])]
    if marginal == "uniform":
        g = jax.random.randint(key, (c.shape[0],), 0, c.shape[1])
        return jax.nn.one_hot(g, c.shape[1], dtype=c.dtype)
    raise ValueError(f"marginal must be 'shuffle' or 'uniform', got {marginal!r}")


def _log_mean_exp(t: jax.Array, weight: jax.Array) -> jax.Array:
    m = jnp.maximum(jnp.sum(weight), 1.0)
    return jax.nn.logsumexp(t, b=weight) - jnp.log(m)


def dv_bound(params: dict, z, c, c_marginal, weight=None) -> jax.Array:
    """The Donsker-Varadhan estimate ``mean T(z, c) - log mean exp T(z, c~)`` (nats).

    Args:
      params: statistics-network parameters.
      z: [B, F] features; c: [B, C] conditions (joint samples); c_marginal: [B, C] draws from Q_C.
      weight: optional [B] 0/1 mask (padding rows have weight 0).
    """
    w = jnp.ones(z.shape[0]) if weight is None else weight.astype(jnp.float32)
    t_joint = mine_statistic(params, z, c)
    t_marg = mine_statistic(params, z, c_marginal)
    return jnp.sum(w * t_joint) / jnp.maximum(jnp.sum(w), 1.0) - _log_mean_exp(t_marg, w)


def mine_objective(params: dict, z, c, c_marginal, ema, weight=None):
    """Loss to minimise (``-bound`` with the EMA-corrected gradient) and ``(estimate, batch E[e^T])``.

    The loss is ``-(mean T_joint - mean(exp T_marg) / stopgrad(ema))``: its gradient in the log term
    is ``grad E[e^T] / ema`` instead of the biased ``grad E[e^T] / batch E[e^T]``.
    """
    w = jnp.ones(z.shape[0]) if weight is None else weight.astype(jnp.float32)
    m = jnp.maximum(jnp.sum(w), 1.0)
    t_joint = mine_statistic(params, z, c)
    t_marg = mine_statistic(params, z, c_marginal)
    mean_joint = jnp.sum(w * t_joint) / m
    # exp with a stop-gradient shift for stability; the shift cancels in value and gradient ratio.
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(w > 0, t_marg, -jnp.inf)))
    batch_exp = jnp.sum(w * jnp.exp(t_marg - shift)) / m
    ema_shifted = jax.lax.stop_gradient(ema * jnp.exp(-shift))
    loss = -(mean_joint - batch_exp / ema_shifted)
    estimate = mean_joint - (jnp.log(batch_exp) + shift)
    return loss, (estimate, jax.lax.stop_gradient(batch_exp * jnp.exp(shift)))


def create_mine_state(key: jax.Array, z_dim: int, c_dim: int, tx: optax.GradientTransformation,
                      *, hidden: int = 512) -> MineState:
    params = mine_init(key, z_dim, c_dim, hidden=hidden)
    return MineState(params, tx.init(params), jnp.ones(()), jnp.zeros((), jnp.int32))


def make_mine_step(tx: optax.GradientTransformation, *, ema_decay: float = 0.99,
                   marginal: str = "shuffle"):
    """``step(state, z, c, key, weight=None) -> (state, estimate)``: one ascent step on the bound."""

    def step(state: MineState, z, c, key, weight=None):
        c_marg = sample_marginal(key, c, marginal=marginal)
        (_, (estimate, batch_exp)), grads = jax.value_and_grad(mine_objective, has_aux=True)(
            state.params, z, c, c_marg, state.ema, weight)
        ema = jnp.where(state.step == 0, batch_exp, ema_decay * state.ema + (1 - ema_decay) * batch_exp)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return MineState(params, opt_state, ema, state.step + 1), estimate

    return step


def estimate_mi(z, c, *, key: jax.Array, steps: int = 500, batch_size: int = 256,
                lr: float = 1e-3, hidden: int = 128, marginal: str = "shuffle",
                ema_decay: float = 0.99, eval_draws: int = 8, max_nats: float = 50.0) -> float:
    """Train a fresh MINE on samples ``(z, c)`` and return its estimate of I(Z; C) in nats.

    The estimate is the DV bound on the full sample with the trained network, averaged over
    ``eval_draws`` draws of ``c~``.

    Raises:
      MIDivergenceError: the estimate became non-finite or exceeded ``max_nats`` during training.
    """
    z = jnp.asarray(z, jnp.float32)
    c = jnp.asarray(c, jnp.float32)
    if z.shape[0] != c.shape[0]:
        raise ValueError(f"z has {z.shape[0]} rows but c has {c.shape[0]}")
    n = z.shape[0]
    tx = optax.adam(lr)
    k_init, k_loop, k_eval = jax.random.split(key, 3)
    state = create_mine_state(k_init, z.reshape(n, -1).shape[1], c.shape[1], tx, hidden=hidden)
    step = make_mine_step(tx, ema_decay=ema_decay, marginal=marginal)
    b = min(batch_size, n)

    @jax.jit
    def run(state, z, c, key):
        def body(state, k):
            k_idx, k_marg = jax.random.split(k)
            idx = jax.random.choice(k_idx, n, (b,), replace=False)
            return step(state, z[idx], c[idx], k_marg)

        return jax.lax.scan(body, state, jax.random.split(key, steps))

    state, trace = run(state, z, c, k_loop)
    trace = np.asarray(trace)
    if not np.all(np.isfinite(trace)) or np.max(np.abs(trace)) > max_nats:
        bad = int(np.argmax(~np.isfinite(trace) | (np.abs(trace) > max_nats)))
        raise MIDivergenceError(
            f"MINE estimate diverged at step {bad}: {trace[bad]} (lower the learning rate or "
            f"raise ema_decay)")
    draws = [float(dv_bound(state.params, z, c, sample_marginal(k, c, marginal=marginal)))
             for k in jax.random.split(k_eval, eval_draws)]
    return float(np.mean(draws))
