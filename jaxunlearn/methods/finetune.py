"""FT / CF (fine-tuning on the retain set) and CF-k (fine-tuning only the last k blocks).

Loss (one train-mode pass on the retain batch):

    L(theta) = weighted_mean_i(CE(f_theta(x_i), y_i), w_i),  i in D_r,

with ``w_i = 1`` (hard) or ``1 + eps_i`` (SW-FT: the reweighted risk of seed 004 eq. (1)).
CF-k (Goel et al. 2022) is the same loss with every parameter outside the last k blocks frozen.
"""

from __future__ import annotations

import optax

from jaxunlearn import losses
from jaxunlearn.methods import base

__all__ = ["finetune", "cf_k", "retain_cross_entropy"]


def retain_cross_entropy(apply_fn, batch: dict):
    """``loss_fn(params, model_state)`` of the FT loss on one retain batch (for :func:`base.gradient_step`)."""

    def loss_fn(params, model_state):
        logits, model_state = base.forward(apply_fn, params, model_state, batch["x"], batch["weight"])
        loss = losses.weighted_mean(losses.cross_entropy(logits, batch["y"]), batch["weight"])
        acc = losses.weighted_mean(base.correct(logits, batch["y"]), (batch["weight"] != 0) * 1.0)
        return loss, (model_state, {"retain_loss": loss, "retain_accuracy": acc})

    return loss_fn


def finetune(apply_fn, *, optimizer: optax.GradientTransformation | None = None, trainable=None,
             name: str = "FT") -> base.Method:
    """FT / CF: fine-tune on D_r with weighted cross-entropy.

    Args:
      apply_fn: the model's ``apply``.
      optimizer: default SGD lr 0.01, momentum 0.9, weight decay 5e-4 (REFERENCE.md, 10 epochs).
      trainable: optional bool mask over ``variables["params"]`` (:mod:`~jaxunlearn.methods.base`).
      name: label for reports.

    Returns:
      A :class:`~jaxunlearn.methods.base.Method` reading the retain set.
    """
    subset, tx = base.optimizer_for(name, optimizer, trainable,
                                    default=base.sgd(0.01, momentum=0.9, weight_decay=5e-4))

    def init(variables):
        return base.init_state(variables, tx, subset)

    def update(variables, state, batches, key):
        del key
        batch = base.require(batches, "retain", name)
        variables, opt_state, loss, metrics = base.gradient_step(
            retain_cross_entropy(apply_fn, batch), variables, state.opt_state, tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, uses=("retain",), name=name, apply_fn=apply_fn)


def cf_k(apply_fn, trainable, *, optimizer: optax.GradientTransformation | None = None) -> base.Method:
    """CF-k: freeze all but the last k blocks and fine-tune them on D_r.

    Args:
      apply_fn: the model's ``apply``.
      trainable: the bool mask of the last k blocks, e.g.
        ``jaxunlearn.models.last_k_mask(variables["params"], k)`` (required).
      optimizer: as :func:`finetune`.
    """
    if trainable is None:
        raise ValueError("cf_k needs a trainable mask (e.g. models.last_k_mask(params, k))")
    return finetune(apply_fn, optimizer=optimizer, trainable=trainable, name="CF-k")
