"""RL: random labels on the forget set, trained together with the retain set (Golatkar et al.;
the SalUn reference's ``RL``).

Each update draws a label for every forget sample uniformly from {0, ..., K-1} (the true label
included, as the reference's ``randint``), with ``jax.random.randint(key, [B_f], 0, K)``, and
takes one step on the concatenated batch ``[x_f; x_r]`` (one train-mode pass, like the
reference's mixed loader):

    L(theta) = weighted_mean([CE(f(x_f), y_rand); CE(f(x_r), y_r)], [-eps_f; w_r]).

The forgetting objective on a forget sample is CE to its random label, scaled by ``-eps_f``
(:mod:`~jaxunlearn.methods.base`): 1 for the hard method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import losses
from jaxunlearn.methods import base

__all__ = ["random_labels", "concat_batches"]


def concat_batches(forget: dict, retain: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x, weight, is_forget)`` of ``[forget; retain]`` with forget weights negated (``-eps_f``)."""
    if forget["x"].shape[1:] != retain["x"].shape[1:]:
        raise ValueError(f"forget inputs {forget['x'].shape[1:]} and retain inputs "
                         f"{retain['x'].shape[1:]} differ in shape")
    x = jnp.concatenate([forget["x"], retain["x"].astype(forget["x"].dtype)])
    w = jnp.concatenate([-forget["weight"], retain["weight"].astype(forget["weight"].dtype)])
    is_f = jnp.concatenate([jnp.ones(forget["x"].shape[0], bool), jnp.zeros(retain["x"].shape[0], bool)])
    return x, w, is_f


def random_labels(apply_fn, *, optimizer: optax.GradientTransformation | None = None,
                  trainable=None, name: str = "RL") -> base.Method:
    """RL unlearning.

    Args:
      apply_fn: the model's ``apply``.
      optimizer: default SGD lr 0.01, momentum 0.9, weight decay 1e-3 (De Min et al.'s SalUn/RL
        configuration, 10 epochs).
      trainable: optional bool mask over ``variables["params"]`` (SalUn passes its saliency mask).
      name: label for reports.
    """
    subset, tx = base.optimizer_for(name, optimizer, trainable,
                                    default=base.sgd(0.01, momentum=0.9, weight_decay=1e-3))

    def init(variables):
        return base.init_state(variables, tx, subset)

    def update(variables, state, batches, key):
        fb = base.require(batches, "forget", name)
        rb = base.require(batches, "retain", name)
        x, w, _ = concat_batches(fb, rb)
        nf = fb["x"].shape[0]

        def loss_fn(params, model_state):
            logits, model_state = base.forward(apply_fn, params, model_state, x, w)
            k = losses.class_logits(logits).shape[-1]
            y_rand = jax.random.randint(key, (nf,), 0, k, dtype=rb["y"].dtype)
            y = jnp.concatenate([y_rand, rb["y"]])
            ce = losses.cross_entropy(logits, y)
            loss = losses.weighted_mean(ce, w)
            return loss, (model_state, {"forget_loss": losses.weighted_mean(ce[:nf], -fb["weight"]),
                                        "retain_loss": losses.weighted_mean(ce[nf:], rb["weight"])})

        variables, opt_state, loss, metrics = base.gradient_step(loss_fn, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, name=name, apply_fn=apply_fn)
