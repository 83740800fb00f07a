"""NTK forgetting (Golatkar et al. 2020b), a one-shot method for small models (or a small
trainable subset, e.g. the head).

Linearise the network at theta (eval mode): per-sample Jacobians of the K logits give
``G = [J_1; ...; J_N]`` [N K, P], and ``r = softmax(f_0) - onehot(y)`` [N K] (the SCRUB
notebooks' cross-entropy residual ``f0 - y``). The ridge-regularised NTK regression of a set
with per-sample weights ``c`` has the solution

    w(c) = -G^T C (G G^T C + s lambda I)^{-1} r,   C = diag(c) (x) I_K,  s = sum_i c_i,

the reference's ``w = -G (G^T G + n lambda I)^{-1} (f0 - y)`` for ``c = 1`` (s = n), and the
minimiser of ``sum_i c_i ||J_i w + r_i||^2 + s lambda ||w||^2`` in general. By the push-through
identity it equals the *primal* solution

    w(c) = -(G^T C G + s lambda I)^{-1} G^T C r,

a [P, P] system accumulated over chunks of samples without holding G (O(N K P^2) flops, each
row visited once): this is the path for few parameters and many samples (e.g. the head on a
whole training set); the kernel ("dual") path above is taken when N K < P. The update is

    theta <- theta + w(c_retain) - w(c_complete).

The rows are ``[forget; retain]`` with ``c_complete = [-eps_f; w_r]`` (every training sample
once: weight 1 in the hard case) and ``c_retain = [0; w_r]``; a sample appearing in both sets
(:func:`~jaxunlearn.weights.unlearning_sets`) has total weight ``1`` complete and ``1 + eps``
retained, since the objective is linear in the row weights. Padding rows (weight 0) drop out.
Deviation: the reference's rescaling of the update by a predicted norm ratio is not applied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxunlearn import losses
from jaxunlearn import subsets
from jaxunlearn.methods import base
from jaxunlearn.methods.random_labels import concat_batches
from jaxunlearn.models.api import as_apply

__all__ = ["ntk_forgetting", "ntk_weights"]


def ntk_weights(jac: jax.Array, residual: jax.Array, c: jax.Array, weight_decay: float) -> jax.Array:
    """``w(c) = -G^T C (G G^T C + s lambda I)^{-1} r`` for ``jac`` [N, K, P], ``residual`` [N, K], ``c`` [N]."""
    n, k, p = jac.shape
    g = jac.reshape(n * k, p)
    cc = jnp.repeat(c, k).astype(g.dtype)
    s = jnp.sum(c).astype(g.dtype)
    a = (g @ g.T) * cc[None, :] + s * weight_decay * jnp.eye(n * k, dtype=g.dtype)
    z = jnp.linalg.solve(a, residual.reshape(-1).astype(g.dtype))
    return -g.T @ (cc * z)


def _gram(logits_of, flat, x, y, c, chunk):
    """``(sum_i c_i J_i^T J_i [P, P], sum_i c_i J_i^T r_i [P])``, accumulated over row chunks."""
    n, p = x.shape[0], flat.size
    chunk = min(chunk, n)
    nc = -(-n // chunk)
    pad = nc * chunk - n

    def chunks(a):  # padding rows get weight 0
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
        return a.reshape((nc, chunk) + a.shape[1:])

    def body(acc, part):
        xc, yc, cc = part
        jac = jax.vmap(jax.jacrev(logits_of), in_axes=(None, 0))(flat, xc)       # [B, K, P]
        logits0 = jax.vmap(lambda xi: logits_of(flat, xi))(xc)
        resid = jax.nn.softmax(logits0, -1) - jax.nn.one_hot(yc, logits0.shape[-1], dtype=logits0.dtype)
        cj = jac * cc[:, None, None]
        return (acc[0] + jnp.einsum("bkp,bkq->pq", cj, jac),
                acc[1] + jnp.einsum("bkp,bk->p", cj, resid)), None

    init = (jnp.zeros((p, p), flat.dtype), jnp.zeros((p,), flat.dtype))
    (a, b), _ = jax.lax.scan(body, init, (chunks(x), chunks(y), chunks(c)))
    return a, b


def _primal_delta(logits_of, flat, forget, retain, weight_decay, chunk):
    """``w(c_retain) - w(c_complete)`` by the primal [P, P] systems; each row is visited once:
    ``A_complete = A_retain + A_forget`` since the forget rows have retained weight 0."""
    (xf, yf, cf), (xr, yr, cr) = forget, retain
    a_f, b_f = _gram(logits_of, flat, xf, yf, cf, chunk)
    a_r, b_r = _gram(logits_of, flat, xr, yr, cr, chunk)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    s_r, s_f = jnp.sum(cr), jnp.sum(cf)
    w_retain = -jnp.linalg.solve(a_r + s_r * weight_decay * eye, b_r)
    w_complete = -jnp.linalg.solve(a_r + a_f + (s_r + s_f) * weight_decay * eye, b_r + b_f)
    return w_retain - w_complete


def ntk_forgetting(apply_fn, *, weight_decay: float = 0.1, trainable=None,
                   max_params: int = 10_000, max_rows: int = 5_000, solve: str = "auto",
                   chunk_size: int = 256) -> base.Method:
    """NTK forgetting, a one-shot method reading whole forget and retain sets.

    Args:
      apply_fn: the model's ``apply``.
      weight_decay: lambda of the ridge term ``s lambda`` (the SCRUB notebooks' weight decay 0.1).
      trainable: optional bool mask (per leaf) of the linearised parameters, e.g. the head.
      max_params: largest trainable parameter count P allowed (the primal system is [P, P]).
      max_rows: largest N K (samples x classes) allowed on the kernel path ([N K, N K] kernel).
      solve: ``"primal"``, ``"dual"`` (kernel) or ``"auto"`` (primal unless N K < P).
      chunk_size: samples per Jacobian chunk on the primal path (memory ~ chunk_size K P).

    Raises (at trace time):
      ValueError: P or N K above the limits, or a per-element trainable mask.
    """
    base.check_positive("weight_decay", weight_decay)
    if solve not in ("auto", "primal", "dual"):
        raise ValueError(f"solve must be 'auto', 'primal' or 'dual', got {solve!r}")
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    subset = subsets.resolve(trainable)
    if subset is not None and subset.masks:
        raise ValueError("ntk_forgetting takes a per-leaf trainable mask, not per-element masks")

    def init(variables):
        return base.init_state(variables, None, subset)

    def update(variables, state, batches, key):
        del key
        fb = base.require(batches, "forget", "NTK")
        rb = base.require(batches, "retain", "NTK")
        params, model_state = base.split_model_state(variables)
        flat, unravel = ravel_pytree(subsets.take(params, subset))
        x, _, _ = concat_batches(fb, rb)
        y = jnp.concatenate([fb["y"], rb["y"].astype(fb["y"].dtype)])
        wf = fb["weight"].astype(flat.dtype)
        wr = rb["weight"].astype(flat.dtype)

        def logits_of(q, xi):
            p = subsets.put(params, subset, unravel(q))
            logits, _ = as_apply(apply_fn)({"params": p, **model_state}, xi[None], train=False)
            return losses.class_logits(logits)[0]

        n = x.shape[0]
        k = jax.eval_shape(logits_of, flat, x[0]).shape[-1]
        p = flat.size
        if p > max_params:
            raise ValueError(f"NTK forgetting solves a [P, P] system (or builds an [N K, P] Jacobian); "
                             f"P = {p} trainable parameters exceeds max_params = {max_params}: "
                             "restrict `trainable` (e.g. to the head) or raise max_params")
        c_complete = jnp.concatenate([-wf, wr])
        c_retain = jnp.concatenate([jnp.zeros_like(wf), wr])
        dual = solve == "dual" or (solve == "auto" and n * k < p)
        if dual:
            if n * k > max_rows:
                raise ValueError(f"the kernel path builds an [N K, N K] kernel; N K = {n} x {k} "
                                 f"exceeds max_rows = {max_rows} (use solve='primal')")
            jac = jax.vmap(jax.jacrev(logits_of), in_axes=(None, 0))(flat, x)  # [N, K, P]
            logits0 = jax.vmap(lambda xi: logits_of(flat, xi))(x)
            resid = jax.nn.softmax(logits0, axis=-1) - jax.nn.one_hot(y, k, dtype=logits0.dtype)
            delta = ntk_weights(jac, resid, c_retain, weight_decay) - \
                ntk_weights(jac, resid, c_complete, weight_decay)
        else:
            delta = _primal_delta(logits_of, flat, (fb["x"], fb["y"], -wf),
                                  (rb["x"].astype(fb["x"].dtype), rb["y"].astype(fb["y"].dtype), wr),
                                  weight_decay, int(chunk_size))
        params = subsets.put(params, subset, unravel(flat + delta))
        return {"params": params, **model_state}, state._replace(step=state.step + 1), \
            {"loss": jnp.zeros(()), "delta_norm": jnp.linalg.norm(delta)}

    return base.Method(init, update, one_shot=True, name="NTK", apply_fn=apply_fn)
