"""GA: gradient ascent on the forget set (seed 004 eq. (9)).

Loss (one train-mode pass on the forget batch):

    L(theta) = weighted_mean_i(CE(f_theta(x_i), y_i), eps_i),  i in D_f,

so the hard weights ``eps_i = -1`` give ``-mean CE`` (ascent) and soft weights the SW-GA step
``theta <- theta - eta * eps_i * grad l_i``.
"""

from __future__ import annotations

import optax

from jaxunlearn import losses
from jaxunlearn.methods import base

__all__ = ["gradient_ascent", "forget_cross_entropy"]


def forget_cross_entropy(apply_fn, batch: dict, params, model_state):
    """``(weighted_mean(CE, eps_f), model_state, logits)`` on one forget batch (train mode)."""
    logits, model_state = base.forward(apply_fn, params, model_state, batch["x"], batch["weight"])
    loss = losses.weighted_mean(losses.cross_entropy(logits, batch["y"]), batch["weight"])
    return loss, model_state, logits


def gradient_ascent(apply_fn, *, optimizer: optax.GradientTransformation,
                    trainable=None) -> base.Method:
    """GA: ascend the cross-entropy of D_f.

    Args:
      apply_fn: the model's ``apply``.
      optimizer: required; GA is very learning-rate sensitive and has no reference default
        (REFERENCE.md: grid the lr in [1e-5, 1e-1]).
      trainable: optional bool mask over ``variables["params"]``.

    Returns:
      A :class:`~jaxunlearn.methods.base.Method` reading the forget set.
    """
    subset, tx = base.optimizer_for("GA", optimizer, trainable)

    def init(variables):
        return base.init_state(variables, tx, subset)

    def update(variables, state, batches, key):
        del key
        batch = base.require(batches, "forget", "GA")

        def loss_fn(params, model_state):
            loss, model_state, logits = forget_cross_entropy(apply_fn, batch, params, model_state)
            acc = losses.weighted_mean(base.correct(logits, batch["y"]), (batch["weight"] != 0) * 1.0)
            return loss, (model_state, {"forget_loss": loss, "forget_accuracy": acc})

        variables, opt_state, loss, metrics = base.gradient_step(loss_fn, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, uses=("forget",), name="GA", apply_fn=apply_fn)
