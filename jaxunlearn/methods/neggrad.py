"""GA_FT / NegGrad+ (Kurmanji et al. 2023): descend on D_r, ascend on D_f, anchored at theta_0.

Loss on a zipped pair of batches (train-mode passes: retain, then forget, as the reference):

    L(theta) = alpha * [weighted_mean(CE_r, w_r) + (wd / 2) ||theta - theta_0||^2]
               + (1 - alpha) * weighted_mean(CE_f, eps_f),

which for the hard weights (``w_r = 1``, ``eps_f = -1``) is the reference's
``alpha [CE_r + (wd/2)||theta - theta_0||^2] - (1 - alpha) CE_f``. ``theta_0`` is the variables
given to ``init`` (the original model); the anchor covers the trainable parameters.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxunlearn import losses
from jaxunlearn import subsets
from jaxunlearn.methods import base
from jaxunlearn.methods.gradient_ascent import forget_cross_entropy

__all__ = ["neggrad_plus"]


def neggrad_plus(apply_fn, *, alpha: float = 0.95, weight_decay: float = 0.1,
                 optimizer: optax.GradientTransformation | None = None,
                 trainable=None) -> base.Method:
    """GA_FT / NegGrad+.

    Args:
      apply_fn: the model's ``apply``.
      alpha: weight of the retain term, in [0, 1] (reference 0.95).
      weight_decay: coefficient ``wd`` of the anchor ``(wd/2)||theta - theta_0||^2`` (the SCRUB
        notebooks' ``weight_decay`` 0.1).
      optimizer: default plain SGD lr 0.01 (reference: 10 epochs).
      trainable: optional bool mask over ``variables["params"]``.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base.check_positive("weight_decay", weight_decay, allow_zero=True)
    subset, tx = base.optimizer_for("GA_FT", optimizer, trainable,
                                    default=base.sgd(0.01))

    def init(variables):
        params, _ = base.split_model_state(variables)
        anchor = [jnp.array(p) for p in subsets.take(params, subset)]
        return base.init_state(variables, tx, subset, {"anchor": anchor})

    def update(variables, state, batches, key):
        del key
        fb = base.require(batches, "forget", "GA_FT")
        rb = base.require(batches, "retain", "GA_FT")
        anchor = state.extra["anchor"]

        def loss_fn(params, model_state):
            logits_r, model_state = base.forward(apply_fn, params, model_state, rb["x"], rb["weight"])
            ce_r = losses.weighted_mean(losses.cross_entropy(logits_r, rb["y"]), rb["weight"])
            drift = sum(jnp.sum(jnp.square(p - a))
                        for p, a in zip(subsets.take(params, subset), anchor))
            ce_f, model_state, _ = forget_cross_entropy(apply_fn, fb, params, model_state)
            loss = alpha * (ce_r + 0.5 * weight_decay * drift) + (1.0 - alpha) * ce_f
            return loss, (model_state, {"retain_loss": ce_r, "forget_loss": ce_f, "drift": drift})

        variables, opt_state, loss, metrics = base.gradient_step(loss_fn, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, name="GA_FT", apply_fn=apply_fn)
