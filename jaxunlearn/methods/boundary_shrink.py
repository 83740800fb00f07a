"""BS, boundary shrink (Chen et al. 2023): relabel forget samples to their nearest wrong class.

For a forget batch, ``x_adv = FGSM(theta_0, x, y)`` at L-infinity radius ``eps`` (clipped to the
input range) on the frozen original model; the target is the original model's most likely class
on ``x_adv`` *other than the true label* (the reference's plain argmax returns the true label
whenever the attack fails; masking it makes the target always the nearest wrong class). Loss
(one train-mode pass on the forget batch):

    L(theta) = weighted_mean(CE(f_theta(x), y_nbr), -eps_f).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import attacks, losses
from jaxunlearn.methods import base

__all__ = ["boundary_shrink", "neighbour_labels"]


def neighbour_labels(apply_fn, original_variables, x, y, *, eps: float, input_range):
    """``(y_nbr, x_adv)``: the nearest wrong class of each sample on the original model (jit-able)."""
    variables = jax.lax.stop_gradient(original_variables)
    x_adv = attacks.fgsm(apply_fn, variables, x, y, eps=eps, input_range=input_range)
    logits = losses.class_logits(base.eval_logits(apply_fn, variables, x_adv))
    true = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    return jnp.argmax(jnp.where(true, -jnp.inf, logits), axis=-1).astype(y.dtype), x_adv


def boundary_shrink(apply_fn, *, eps: float = 0.1, input_range=(0.0, 1.0),
                    optimizer: optax.GradientTransformation | None = None,
                    trainable=None) -> base.Method:
    """Boundary shrink.

    Args:
      apply_fn: the model's ``apply``.
      eps: FGSM L-infinity radius in input units (reference 0.1 on [0, 1] pixels).
      input_range: ``(low, high)`` clip range of the inputs, or None (e.g. standardised features).
      optimizer: default SGD lr 1e-5, momentum 0.9 (reference: small lr, 10 epochs).
      trainable: optional bool mask over ``variables["params"]``.
    """
    base.check_positive("eps", eps)
    if input_range is not None:
        lo, hi = map(float, input_range)
        if not hi > lo:
            raise ValueError(f"input_range must satisfy low < high, got {input_range}")
        if eps > hi - lo:
            raise ValueError(f"eps={eps} is larger than the input range {input_range}")
    subset, tx = base.optimizer_for("BS", optimizer, trainable,
                                    default=base.sgd(1e-5, momentum=0.9))

    def init(variables):
        return base.init_state(variables, tx, subset,
                               {"original": jax.tree.map(jnp.array, variables)})

    def update(variables, state, batches, key):
        del key
        fb = base.require(batches, "forget", "BS")
        y_nbr, _ = neighbour_labels(apply_fn, state.extra["original"], fb["x"], fb["y"], eps=eps,
                                    input_range=input_range)

        def loss_fn(params, model_state):
            logits, model_state = base.forward(apply_fn, params, model_state, fb["x"], fb["weight"])
            loss = losses.weighted_mean(losses.cross_entropy(logits, y_nbr), -fb["weight"])
            return loss, (model_state, {"forget_loss": loss})

        variables, opt_state, loss, metrics = base.gradient_step(loss_fn, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, uses=("forget",), name="BS", apply_fn=apply_fn)
