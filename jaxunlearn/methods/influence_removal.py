"""IF: influence-function (one Newton step) unlearning with per-sample weights, seed 004 eq. (8):

    theta_new = theta - (1/n) H^{-1} sum_i eps_i grad l_i(theta),

``eps_i`` the forget weights (-1 removes sample i, eq. (2); soft weights give SW-IF), ``n`` the
training-set size and ``H`` the Hessian of the *mean* training objective including its
regulariser, ``(1/n) sum_i l_i + (l2/2)||theta||^2`` (:mod:`jaxunlearn.train`). It is the first
Newton step, from the original optimum, towards the minimiser of the reweighted objective
``(1/n) sum_i (1 + eps_i) l_i + (l2/2)||theta||^2`` (seed 004 eq. (1)); the influence engine
(:mod:`jaxunlearn.influence`) provides the inverse-Hessian solvers, and eq. (8) itself is
:func:`jaxunlearn.influence.influence_step`, shared with the pure library update
:func:`jaxunlearn.influence.influence_update` (which takes an influence ``Problem`` and a solver
object and returns the new parameters directly; this Method is the same update inside the
unlearning loop, reading eps from its forget batches). For networks, restrict it to the last layer
(``trainable`` = the head, with ``inverse_hvp`` the head's solver).

``sum_i eps_i grad l_i`` is the gradient of one weighted sum (no per-sample gradients), taken in
eval mode and accumulated over chunks of ``chunk_size`` samples to bound memory.

Example (the last layer, with the closed-form head Hessian of :mod:`jaxunlearn.influence.last_layer`;
``features`` are the penultimate features of the training set)::

    W = last_layer.head_to_matrix(params["head"])
    H = last_layer.hessian(W, last_layer.design(features, fit_intercept=True), l2=l2)

    def inverse_hvp(v, chol):
        g = last_layer.head_to_matrix(v["head"]).reshape(-1)
        s = jax.scipy.linalg.cho_solve((chol, True), g).reshape(W.shape)
        return {**v, "head": last_layer.matrix_to_head(s, fit_intercept=True)}

    method = influence_unlearning(model.apply, inverse_hvp, num_train=n,
                                  operands=jnp.linalg.cholesky(H),
                                  trainable=models.last_k_mask(params, 1))
    variables, _, _ = run_method(method, variables, forget_with_eps, None, epochs=1,
                                 batch_size=1, key=key)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxunlearn import losses
from jaxunlearn import subsets
from jaxunlearn.influence.update import influence_step
from jaxunlearn.methods import base
from jaxunlearn.models.api import as_apply

__all__ = ["influence_unlearning"]


def _chunked_weighted_grad(objective, leaves, batch: dict, chunk_size: int | None):
    b = batch["weight"].shape[0]
    if chunk_size is None or chunk_size >= b:
        return jax.grad(objective)(leaves, batch)
    nc = -(-b // chunk_size)
    pad = nc * chunk_size - b

    def chunks(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a
        return a.reshape((nc, chunk_size) + a.shape[1:])

    w = batch["weight"]
    data = {k: chunks(v) for k, v in batch.items() if k != "weight"}
    w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)]) if pad else w  # padding rows: weight 0
    data["weight"] = w.reshape(nc, chunk_size)

    def body(acc, chunk):
        g = jax.grad(objective)(leaves, chunk)
        return [a + gi for a, gi in zip(acc, g)], None

    acc, _ = jax.lax.scan(body, [jnp.zeros_like(l) for l in leaves], data)
    return acc


def influence_unlearning(apply_fn, inverse_hvp: Callable[..., Any], *, num_train: int,
                         operands: Any = None, loss_fn=losses.cross_entropy, trainable=None,
                         chunk_size: int | None = None) -> base.Method:
    """IF unlearning, a one-shot method reading the whole forget set (weights = eps).

    Args:
      apply_fn: the model's ``apply``.
      inverse_hvp: ``v -> H^{-1} v`` (or ``(v, operands) -> H^{-1} v`` when ``operands`` is
        given). ``v`` is a pytree with the structure of ``variables["params"]``, zero outside the
        trainable leaves; the result's frozen leaves are ignored. For the last layer, e.g.
        ``lambda v: {**v, "head": solve_head(v["head"])}``.
      num_train: n, the training-set size of eq. (8).
      operands: optional arrays ``inverse_hvp`` needs (e.g. a Cholesky factor); they are kept in
        the state so that a jitted update receives them as arguments, not constants.
      loss_fn: the per-example training loss l (the one the model was trained with).
      trainable: optional bool mask (per leaf) of the updated parameters, e.g. the head.
      chunk_size: accumulate the gradient over chunks of this many samples (None: one pass).
    """
    if not callable(inverse_hvp):
        raise ValueError("inverse_hvp must be a callable v -> H^{-1} v")
    if int(num_train) <= 0:
        raise ValueError(f"num_train must be positive, got {num_train}")
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    subset = subsets.resolve(trainable)
    if subset is not None and subset.masks:
        raise ValueError("influence_unlearning takes a per-leaf trainable mask, not per-element masks")
    n = float(num_train)

    def init(variables):
        extra = {} if operands is None else {"operands": operands}
        return base.init_state(variables, None, subset, extra)

    def update(variables, state, batches, key):
        del key
        fb = base.require(batches, "forget", "IF")
        params, model_state = base.split_model_state(variables)
        leaves = subsets.take(params, subset)

        def objective(train_leaves, chunk):
            p = subsets.put(params, subset, train_leaves)
            logits, _ = as_apply(apply_fn)({"params": p, **model_state}, chunk["x"], train=False)
            return jnp.sum(chunk["weight"] * loss_fn(logits, chunk["y"]))

        g = _chunked_weighted_grad(objective, leaves, {"x": fb["x"], "y": fb["y"],
                                                       "weight": fb["weight"]}, chunk_size)
        zeros = jax.tree.map(jnp.zeros_like, params)

        def inverse(g_leaves):  # H^{-1} on the trainable leaves, through the full-tree inverse_hvp
            v = subsets.put(zeros, subset, g_leaves)
            h = inverse_hvp(v) if operands is None else inverse_hvp(v, state.extra["operands"])
            if jax.tree.structure(h) != jax.tree.structure(params):
                raise ValueError("inverse_hvp must return a pytree with the structure of variables['params']")
            return subsets.take(h, subset)

        new_leaves, step = influence_step(list(leaves), list(g), inverse, n)
        params = subsets.put(params, subset, new_leaves)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(s)) for s in step))
        return {"params": params, **model_state}, state._replace(step=state.step + 1), \
            {"loss": jnp.zeros(()), "step_norm": norm}

    return base.Method(init, update, uses=("forget",), one_shot=True, name="IF", apply_fn=apply_fn)
