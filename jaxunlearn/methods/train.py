"""Training as a method: the original recipe, Retrain (exact unlearning) and reweighted retraining.

The objective of every step is seed 004 eq. (1) with an explicit L2 regulariser,

    L(theta) = weighted_mean(loss(f_theta(x_i), y_i), w_i) + (l2 / 2) ||theta||^2,

:func:`jaxunlearn.losses.weighted_mean` dividing by the batch's number of nonzero weights. The
regulariser is part of the objective (not decoupled weight decay) so that the influence Hessian
of :mod:`jaxunlearn.influence` is the Hessian of exactly what was minimised.

Training is a :class:`~jaxunlearn.methods.Method` like any other and runs through
:func:`jaxunlearn.loop.run`::

    trainer = methods.train(model.apply, optax.adam(1e-3), l2=1e-4)
    variables, state, history = loop.run(trainer, model.init(key, x[:1]), {"train": ds.train},
                                         epochs=10, batch_size=256, key=key)

Retrain trains fresh variables on the retain set (``{"retain": sets["retain"]}`` of
:func:`jaxunlearn.weights.unlearning_sets`: weight 0 drops a sample, soft weights give SW-retrain);
De Min et al.'s reweighted retrain adds ``sampling=weights.group_weights(...)`` to ``run``.
"""

from __future__ import annotations

import optax

from jaxunlearn import losses
from jaxunlearn.methods import base

__all__ = ["train", "retrain"]


def train(apply_fn, optimizer: optax.GradientTransformation, *, l2: float = 0.0,
          loss_fn=losses.cross_entropy, on: str = "train", trainable=None,
          name: str = "train") -> base.Method:
    """Supervised training on one set (train-mode passes; BatchNorm statistics update).

    Args:
      apply_fn: the model's ``apply``.
      optimizer: the optax optimizer.
      l2: coefficient of ``(l2/2)||params||^2`` in the objective (all parameters).
      loss_fn: per-example loss ``(logits [B, K], y [B]) -> [B]``.
      on: the name of the set it reads (``"train"``; :func:`retrain` uses ``"retain"``).
      trainable: optional bool mask over ``variables["params"]`` (:mod:`jaxunlearn.methods.base`).
      name: label for reports and progress bars.

    Returns:
      A :class:`~jaxunlearn.methods.Method`; its metrics are the weighted ``loss`` and the
      ``accuracy`` on the batch's nonzero-weight samples.
    """
    base.check_positive("l2", l2, allow_zero=True)
    subset, tx = base.optimizer_for(name, optimizer, trainable)

    def init(variables):
        return base.init_state(variables, tx, subset)

    def update(variables, state, batches, key):
        del key  # the built-in models are deterministic
        batch = base.require(batches, on, name)

        def objective(params, model_state):
            logits, model_state = base.forward(apply_fn, params, model_state, batch["x"], batch["weight"])
            loss = losses.weighted_mean(loss_fn(logits, batch["y"]), batch["weight"])
            if l2:
                loss = loss + l2 * losses.l2_penalty(params)
            acc = losses.weighted_mean(base.correct(logits, batch["y"]), (batch["weight"] != 0) * 1.0)
            return loss, (model_state, {"accuracy": acc})

        variables, opt_state, loss, metrics = base.gradient_step(objective, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, uses=(on,), name=name, apply_fn=apply_fn)


def retrain(apply_fn, optimizer: optax.GradientTransformation, *, l2: float = 0.0,
            loss_fn=losses.cross_entropy) -> base.Method:
    """Retrain (exact unlearning): :func:`train` on the ``"retain"`` set, from fresh variables."""
    return train(apply_fn, optimizer, l2=l2, loss_fn=loss_fn, on="retain", name="Retrain")
