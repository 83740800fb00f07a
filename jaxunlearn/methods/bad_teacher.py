"""Bad-T, the incompetent teacher (Chundawat et al. 2023).

On the concatenated batch ``[x_f; x_r]`` (one train-mode pass), the target distribution is

    t = l softmax(T_rand(x)/tau) + (1 - l) softmax(T_full(x)/tau),   l = 1 on D_f, 0 on D_r,

with ``T_rand`` a randomly initialised model and ``T_full`` the original (both frozen, eval
mode), and the loss is ``weighted_mean(KL(t || softmax(s/tau)), [-eps_f; w_r])``. The reference
trains on D_f and a random 30% of D_r for one epoch: pass that subset as the retain set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import losses
from jaxunlearn.methods import base
from jaxunlearn.methods.random_labels import concat_batches

__all__ = ["bad_teacher"]


def bad_teacher(apply_fn, random_teacher, *, temperature: float = 1.0,
                optimizer: optax.GradientTransformation | None = None, teacher=None,
                trainable=None) -> base.Method:
    """Bad-T.

    Args:
      apply_fn: the model's ``apply`` (both teachers share the architecture).
      random_teacher: variables of a randomly initialised model (``model.init(other_key, x)``).
      temperature: tau (reference 1).
      optimizer: default Adam lr 1e-4 (reference: 1 epoch).
      teacher: the competent teacher (default: the variables given to ``init``, theta_0).
      trainable: optional bool mask over ``variables["params"]``.
    """
    if random_teacher is None:
        raise ValueError("bad_teacher needs random_teacher variables (model.init with another key)")
    base.check_positive("temperature", temperature)
    subset, tx = base.optimizer_for("Bad-T", optimizer, trainable,
                                    default=optax.adam(1e-4))

    def init(variables):
        good = variables if teacher is None else teacher
        return base.init_state(variables, tx, subset,
                               {"good": jax.tree.map(jnp.array, good),
                                "bad": jax.tree.map(jnp.array, random_teacher)})

    def update(variables, state, batches, key):
        del key
        fb = base.require(batches, "forget", "Bad-T")
        rb = base.require(batches, "retain", "Bad-T")
        x, w, is_f = concat_batches(fb, rb)
        bad = losses.probabilities(base.eval_logits(apply_fn, state.extra["bad"], x) / temperature)
        good = losses.probabilities(base.eval_logits(apply_fn, state.extra["good"], x) / temperature)
        target = jnp.where(is_f[:, None], bad, good)
        nf = fb["x"].shape[0]

        def loss_fn(params, model_state):
            logits, model_state = base.forward(apply_fn, params, model_state, x, w)
            log_s = jax.nn.log_softmax(losses.class_logits(logits) / temperature, axis=-1)
            kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_s, axis=-1)
            return losses.weighted_mean(kl, w), (model_state, {
                "forget_kl": losses.weighted_mean(kl[:nf], -fb["weight"]),
                "retain_kl": losses.weighted_mean(kl[nf:], rb["weight"])})

        variables, opt_state, loss, metrics = base.gradient_step(loss_fn, variables, state.opt_state,
                                                                 tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": loss, **metrics}

    return base.Method(init, update, name="Bad-T", apply_fn=apply_fn)
