"""Fisher forgetting (Golatkar et al. 2020a): noise scaled by the inverse Fisher of D_r.

:func:`fisher_diagonal` computes the (weighted) diagonal Fisher information of the retain set,

    F = weighted_mean_i( sum_y p(y | x_i) (grad_theta log p(y | x_i))^2 , w_i ),

in eval mode (per-sample, per-class gradients, as the SCRUB notebooks' ``hessian``); the SW
version passes ``w_i = 1 + eps_i``. :func:`fisher_forgetting` is the one-shot update

    theta <- theta_0 + sqrt(var) * N(0, I),   var = alpha * min(1 / (F + 1e-8), max_variance),

the clamp applied before the scaling as in the reference (``1/(F+1e-8)`` clamped at 1e3, then
times alpha). Deviation: the reference's further per-layer heuristics (averaging the variance
over each output row, x10 for the head and BatchNorm, class-specific head rows) are not used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import losses
from jaxunlearn.data.batching import batch_plan, split_size
from jaxunlearn.methods import base

__all__ = ["fisher_diagonal", "fisher_forgetting"]


@functools.partial(jax.jit, static_argnames=("apply_fn", "selected"))
def _fisher_batch(apply_fn, selected, params, model_state, x, w):
    all_leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [all_leaves[i] for i in selected]

    def per_example(xi):
        def log_p(train_leaves):
            full = list(all_leaves)
            for i, leaf in zip(selected, train_leaves):
                full[i] = leaf
            p = jax.tree_util.tree_unflatten(treedef, full)
            logits, _ = apply_fn({"params": p, **model_state}, xi[None], train=False)
            return jax.nn.log_softmax(losses.class_logits(logits), axis=-1)[0]

        jac = jax.jacrev(log_p)(leaves)  # per leaf [K, *leaf.shape]
        prob = jnp.exp(log_p(leaves))
        return [jnp.tensordot(prob, jnp.square(j), axes=1) for j in jac]

    per = jax.vmap(per_example)(x)
    return [jnp.tensordot(w, a, axes=1) for a in per]


def fisher_diagonal(apply_fn, variables, retain: dict, *, batch_size: int = 32, trainable=None):
    """The weighted diagonal Fisher of the retain set, a pytree like ``variables["params"]``.

    Args:
      apply_fn: the model's ``apply``.
      variables: the original model's variables.
      retain: the retain split; ``"weight"`` (default 1) weights each sample's Fisher.
      batch_size: samples per vectorised batch (memory ~ batch_size x classes x parameters).
      trainable: optional bool mask; the Fisher is computed only on leaves with a True element,
        the other leaves are NaN (so that using them is an error, not a silent zero).
    """
    params, model_state = base.split_model_state(variables)
    subset = base.resolve_trainable(trainable)
    leaves_all, treedef = jax.tree_util.tree_flatten(params)
    selected = tuple(range(len(leaves_all))) if subset is None else subset.selected
    if subset is not None and subset.treedef != treedef:
        raise ValueError("trainable mask does not have the structure of variables['params']")
    n = split_size(retain)
    w = np.ones(n, np.float32) if retain.get("weight") is None else np.asarray(retain["weight"], np.float32)
    if w.shape != (n,) or not np.all(np.isfinite(w)):
        raise ValueError(f"retain weight must be a finite [{n}] vector")
    index, bw = batch_plan(n, min(batch_size, max(1, int(np.count_nonzero(w)))), weight=w)
    x = np.asarray(retain["x"])
    total = [jnp.zeros_like(leaves_all[i]) for i in selected]
    for i in range(index.shape[0]):
        fi = _fisher_batch(apply_fn, selected, params, model_state, x[index[i]], bw[i])
        total = [a + b for a, b in zip(total, fi)]
    count = float(np.count_nonzero(w))
    out = [jnp.full_like(l, jnp.nan) for l in leaves_all]
    for i, t in zip(selected, total):
        out[i] = t / count
    return jax.tree_util.tree_unflatten(treedef, out)


def fisher_forgetting(fisher, *, alpha: float = 1e-6, max_variance: float = 1e3,
                      trainable=None) -> base.Method:
    """Fisher forgetting, a one-shot method.

    Args:
      fisher: the diagonal Fisher, a pytree like ``variables["params"]`` (:func:`fisher_diagonal`).
      alpha: noise scale (reference 1e-9 ... 1e-6; the SCRUB notebook applies 1e-6).
      max_variance: clamp of ``1 / (F + 1e-8)`` before scaling by alpha (reference 1e3).
      trainable: optional bool mask; only these elements receive noise.

    Returns:
      A one-shot :class:`~jaxunlearn.methods.base.Method` (it reads no batch; its ``update``
      perturbs the variables it is given, theta_0).
    """
    base.check_positive("alpha", alpha, allow_zero=True)
    base.check_positive("max_variance", max_variance)
    subset = base.resolve_trainable(trainable)

    def init(variables):
        params, _ = base.split_model_state(variables)
        if jax.tree.structure(fisher) != jax.tree.structure(params):
            raise ValueError("fisher does not have the structure of variables['params']")
        f = [jnp.asarray(l) for l in base.take(fisher, subset)]
        for leaf, p in zip(f, base.take(params, subset)):
            if leaf.shape != jnp.shape(p):
                raise ValueError(f"fisher leaf of shape {leaf.shape} for a parameter of shape {jnp.shape(p)}")
            if not bool(jnp.all(jnp.isfinite(leaf))) or bool(jnp.any(leaf < 0)):
                raise ValueError("fisher must be finite and >= 0 on the trainable parameters "
                                 "(was it computed with a smaller trainable subset?)")
        masks = [] if subset is None else [jnp.asarray(m) for m in subset.masks]
        return base.init_state(variables, None, subset, {"fisher": f, "masks": masks})

    def update(variables, state, batches, key):
        del batches
        params, model_state = base.split_model_state(variables)
        leaves = base.take(params, subset)
        keys = jax.random.split(key, len(leaves))
        masks = state.extra["masks"]
        new = []
        for j, (p, f, k) in enumerate(zip(leaves, state.extra["fisher"], keys)):
            var = alpha * jnp.minimum(1.0 / (f + 1e-8), max_variance)
            q = p + jnp.sqrt(var).astype(p.dtype) * jax.random.normal(k, p.shape, p.dtype)
            e = None if subset is None else subset.elementwise[j]
            new.append(q if e is None else jnp.where(masks[e], q, p))
        params = base.put(params, subset, new)
        noise_std = jnp.sqrt(sum(jnp.sum(alpha * jnp.minimum(1.0 / (f + 1e-8), max_variance))
                                 for f in state.extra["fisher"]) / sum(f.size for f in state.extra["fisher"]))
        return {"params": params, **model_state}, state._replace(step=state.step + 1), \
            {"loss": jnp.zeros(()), "noise_rms": noise_std}

    return base.Method(init, update, uses=(), one_shot=True, name="Fisher")
