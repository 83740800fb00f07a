"""SCRUB (Kurmanji et al. 2023): a student moves away from the teacher on D_f, stays close on D_r.

With ``KD_T(s, t) = KL(softmax(t/T) || softmax(s/T)) T^2`` (:func:`jaxunlearn.losses.distillation_kl`)
and the frozen teacher ``theta_0`` (eval mode), each update of a zipped batch pair takes

1. a *max-step* on the forget batch, only during the first ``max_epochs`` epochs and only on the
   first pass of the cycled forget loader in the epoch (so, as in the reference, each of those
   epochs makes one pass of max-steps over D_f):
   ``L_max = weighted_mean(KD_T(s_f, t_f), eps_f)`` (= ``-mean KD`` for ``eps_f = -1``);
2. a *min-step* on the retain batch: ``L_min = weighted_mean(gamma CE + alpha KD_T, w_r)``.

Both steps share one optimizer state. Deviation from the reference: the max-steps of an epoch
are interleaved with its first min-steps instead of all preceding them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import losses
from jaxunlearn.methods import base

__all__ = ["scrub"]


def scrub(apply_fn, *, alpha: float = 0.5, gamma: float = 1.0, temperature: float = 2.0,
          max_epochs: int = 3, optimizer: optax.GradientTransformation | None = None,
          teacher=None, trainable=None) -> base.Method:
    """SCRUB.

    Args:
      apply_fn: the model's ``apply``.
      alpha: weight of the distillation term on D_r (small-scale reference 0.5).
      gamma: weight of the cross-entropy on D_r (reference 1).
      temperature: distillation temperature T (reference 2).
      max_epochs: number of epochs with max-steps, m (reference 3).
      optimizer: default Adam lr 5e-4 (small-scale recipe; large-scale: SGD 5e-4, gamma 0.99,
        alpha 0.001).
      teacher: teacher variables (default: the variables given to ``init``, i.e. theta_0).
      trainable: optional bool mask over ``variables["params"]``.
    """
    base.check_positive("temperature", temperature)
    base.check_positive("alpha", alpha, allow_zero=True)
    base.check_positive("gamma", gamma, allow_zero=True)
    if int(max_epochs) < 0:
        raise ValueError(f"max_epochs must be >= 0, got {max_epochs}")
    subset, tx = base.optimizer_for("SCRUB", optimizer, trainable,
                                    default=optax.adam(5e-4))

    def init(variables):
        t = variables if teacher is None else teacher
        return base.init_state(variables, tx, subset, {"teacher": jax.tree.map(jnp.array, t)})

    def update(variables, state, batches, key):
        del key
        fb = base.require(batches, "forget", "SCRUB")
        rb = base.require(batches, "retain", "SCRUB")
        t_vars = state.extra["teacher"]

        def max_loss(params, model_state):
            t_f = base.eval_logits(apply_fn, t_vars, fb["x"])
            s_f, model_state = base.forward(apply_fn, params, model_state, fb["x"], fb["weight"])
            kd = losses.distillation_kl(s_f, t_f, temperature)
            return losses.weighted_mean(kd, fb["weight"]), (model_state, {})

        def min_loss(params, model_state):
            t_r = base.eval_logits(apply_fn, t_vars, rb["x"])
            s_r, model_state = base.forward(apply_fn, params, model_state, rb["x"], rb["weight"])
            kd = losses.distillation_kl(s_r, t_r, temperature)
            ce = losses.cross_entropy(s_r, rb["y"])
            loss = losses.weighted_mean(gamma * ce + alpha * kd, rb["weight"])
            return loss, (model_state, {"retain_kd": losses.weighted_mean(kd, rb["weight"]),
                                        "retain_ce": losses.weighted_mean(ce, rb["weight"])})

        def do_max(carry):
            v, o = carry
            v, o, loss, _ = base.gradient_step(max_loss, v, o, tx, subset)
            return v, o, loss

        def skip_max(carry):
            v, o = carry
            return v, o, jnp.zeros((), jnp.float32)

        active = (state.epoch < max_epochs) & base.first_pass(fb)
        variables, opt_state, l_max = jax.lax.cond(active, do_max, skip_max,
                                                   (variables, state.opt_state))
        variables, opt_state, l_min, metrics = base.gradient_step(min_loss, variables, opt_state,
                                                                  tx, subset)
        return variables, state._replace(step=state.step + 1, opt_state=opt_state), \
            {"loss": l_min, "max_loss": l_max, "max_step": active.astype(jnp.float32), **metrics}

    return base.Method(init, update, name="SCRUB", apply_fn=apply_fn)
