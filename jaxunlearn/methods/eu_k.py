"""EU-k (Goel et al. 2022): re-initialise the last k blocks and retrain only them on D_r.

The first ``update`` replaces the trainable parameters (and the BatchNorm statistics of the
trainable layers) by the fresh values given to the factory, then every update is a fine-tuning
step on the trainable subset (:func:`~jaxunlearn.methods.finetune.finetune`'s loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import subsets
from jaxunlearn.methods import base
from jaxunlearn.methods.finetune import retain_cross_entropy

__all__ = ["eu_k"]


def eu_k(apply_fn, fresh_variables, trainable, *,
         optimizer: optax.GradientTransformation | None = None) -> base.Method:
    """EU-k.

    Args:
      apply_fn: the model's ``apply``.
      fresh_variables: variables of a freshly initialised model (``model.init(new_key, x)``).
      trainable: per-leaf bool mask of the last k blocks (``models.last_k_mask(params, k)``).
      optimizer: default SGD lr 0.01, momentum 0.9, weight decay 5e-4 (as FT; the reference
        retrains for the original number of epochs).
    """
    if trainable is None:
        raise ValueError("eu_k needs a trainable mask (e.g. models.last_k_mask(params, k))")
    subset = subsets.resolve(trainable)
    if subset.masks:
        raise ValueError("eu_k takes a per-leaf trainable mask (whole layers), not per-element masks")
    optimizer = base.sgd(0.01, momentum=0.9, weight_decay=5e-4) if optimizer is None else \
        base.check_optimizer(optimizer, "EU-k")
    fresh_params, fresh_state = base.split_model_state(fresh_variables)

    def init(variables):
        params, model_state = base.split_model_state(variables)
        if jax.tree.structure(fresh_params) != jax.tree.structure(params):
            raise ValueError("fresh_variables['params'] must have the structure of variables['params']")
        extra = {"params": [jnp.array(l) for l in subsets.take(fresh_params, subset)],
                 "model_state": jax.tree.map(jnp.array, fresh_state)}
        if jax.tree.structure(extra["model_state"]) != jax.tree.structure(model_state):
            raise ValueError("fresh_variables must have the same collections as variables")
        return base.init_state(variables, optimizer, subset, extra)

    def reinit(variables, state):
        first = state.step == 0
        params, model_state = base.split_model_state(variables)
        leaves = [jnp.where(first, f, p) for f, p in zip(state.extra["params"], subsets.take(params, subset))]

        def pick(path, cur, fresh):
            frozen = subsets.state_module(path) in subset.frozen_modules
            return cur if frozen else jnp.where(first, fresh, cur)

        model_state = jax.tree_util.tree_map_with_path(pick, model_state, state.extra["model_state"])
        return {"params": subsets.put(params, subset, leaves), **model_state}

    def update(variables, state, batches, key):
        del key
        batch = base.require(batches, "retain", "EU-k")
        variables = reinit(variables, state)
        variables, opt_state, loss, metrics = base.gradient_step(
            retain_cross_entropy(apply_fn, batch), variables, state.opt_state, optimizer, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, uses=("retain",), name="EU-k", apply_fn=apply_fn)
