"""L1-sparse unlearning (Jia et al. 2023): fine-tune on D_r with a decaying L1 penalty.

Loss in epoch e of E (one train-mode pass on the retain batch):

    L(theta) = weighted_mean(CE_r, w_r) + alpha_e ||theta||_1,   alpha_e = alpha (1 - e / E),

alpha_e constant within an epoch and decaying linearly to 0 (the reference's ``compute_alpha``).
The L1 norm covers the trainable parameters. ``E`` is the ``epochs`` hyperparameter (the decay
horizon, as an optax schedule knows its length) and ``e`` is ``state.epoch``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxunlearn import losses
from jaxunlearn import subsets
from jaxunlearn.methods import base
from jaxunlearn.methods.finetune import retain_cross_entropy

__all__ = ["l1_sparse"]


def l1_sparse(apply_fn, *, epochs: int, alpha: float = 5e-4,
              optimizer: optax.GradientTransformation | None = None, trainable=None) -> base.Method:
    """L1-sparse.

    Args:
      apply_fn: the model's ``apply``.
      epochs: E, the number of epochs over which alpha decays to 0 (the run's epochs).
      alpha: initial L1 coefficient (reference ~5e-4).
      optimizer: default SGD lr 0.01, momentum 0.9, weight decay 1e-4 (De Min et al.'s config).
      trainable: optional bool mask over ``variables["params"]``.
    """
    alpha = base.check_positive("alpha", alpha, allow_zero=True)
    if int(epochs) < 1:
        raise ValueError(f"L1-sparse: epochs must be >= 1, got {epochs}")
    num_epochs = int(epochs)
    subset, tx = base.optimizer_for("L1-sparse", optimizer, trainable,
                                    default=base.sgd(0.01, momentum=0.9, weight_decay=1e-4))

    def init(variables):
        return base.init_state(variables, tx, subset)

    def update(variables, state, batches, key):
        del key
        batch = base.require(batches, "retain", "L1-sparse")
        coef = alpha * (1.0 - state.epoch.astype(jnp.float32) / num_epochs)
        ce_loss = retain_cross_entropy(apply_fn, batch)

        def loss_fn(params, model_state):
            ce, (model_state, metrics) = ce_loss(params, model_state)
            l1 = losses.l1_norm(subsets.take(params, subset))
            return ce + coef * l1, (model_state, {**metrics, "l1": l1, "l1_coef": coef})

        variables, opt_state, loss, metrics = base.gradient_step(loss_fn, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, uses=("retain",), name="L1-sparse", apply_fn=apply_fn)
