"""Adversarial perturbations: FGSM, PGD (L-infinity) and the linear (Megyeri) perturbation.

All attacks are pure functions the caller jits (on a mesh too: they are per-example, so inputs split
over a data axis give the single-device adversarial examples). FGSM and PGD come in two forms:

* a generic form over any differentiable ``loss_of_inputs(x) -> scalar`` (:func:`fgsm_from_loss`,
  :func:`pgd_from_loss`), and
* a model form over the jaxunlearn model contract (:func:`fgsm`, :func:`pgd`), which attacks the
  per-example loss (cross-entropy by default) of ``apply_fn(variables, x, train=False)``.

The attacked loss is the *sum* of per-example losses, so each example's input gradient is its own
(the sign, hence FGSM, does not depend on the batch size).

The linear perturbation of Megyeri et al. (2019), used by seed 004 eq. (5) and by Chhabra et al.
for robustness influence, moves each point orthogonally across a linear decision boundary:

    x_adv = x - gamma * (w^T x + b) / ||w||^2 * w,      gamma = 1.3,

which for gamma > 1 flips the prediction of the linear model at every point. It applies in input
space (logistic regression) or in feature space (a network's linear head on frozen features).

:func:`adversarial_evaluator` attacks a whole split in padded batches, compiled once, optionally
split over a device mesh (``mesh=``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxunlearn import losses
from jaxunlearn.models.api import as_apply

__all__ = [
    "fgsm_from_loss",
    "pgd_from_loss",
    "fgsm",
    "pgd",
    "linear_perturbation",
    "adversarial_accuracy",
    "adversarial_evaluator",
]

def _is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _check_eps(eps, input_range, name: str = "eps") -> None:
    """Raise if ``eps`` is negative or exceeds the width of ``input_range`` (concrete values only)."""
    if not _is_concrete(eps):
        return
    e = float(eps)
    if not e >= 0.0:  # also catches NaN
        raise ValueError(f"{name} must be >= 0, got {e}")
    if input_range is not None:
        lo, hi = map(float, input_range)
        if not hi > lo:
            raise ValueError(f"input_range must satisfy low < high, got {input_range}")
        if e > hi - lo:
            raise ValueError(f"{name}={e} is larger than the input range {input_range} (width {hi - lo})")


def _clip(x, input_range):
    if input_range is None:
        return x
    return jnp.clip(x, input_range[0], input_range[1])


def fgsm_from_loss(loss_of_inputs: Callable[[jax.Array], jax.Array], x: jax.Array, *, eps: float,
                   input_range=(0.0, 1.0)) -> jax.Array:
    """Fast gradient sign method on a generic loss: ``clip(x + eps * sign(d loss / d x))``.

    Args:
      loss_of_inputs: ``x [B, ...] -> scalar`` to be increased (e.g. a sum of per-example losses).
      x: [B, ...] clean inputs.
      eps: L-infinity radius, ``0 <= eps <= high - low``.
      input_range: ``(low, high)`` valid input values, or None for no clipping.

    Returns:
      [B, ...] adversarial inputs.
    """
    _check_eps(eps, input_range)
    g = jax.grad(loss_of_inputs)(x)
    return _clip(x + eps * jnp.sign(g), input_range).astype(x.dtype)


def pgd_from_loss(loss_of_inputs: Callable[[jax.Array], jax.Array], x: jax.Array, *, eps: float,
                  step_size: float, steps: int, input_range=(0.0, 1.0), key: jax.Array | None = None,
                  random_start: bool = False) -> jax.Array:
    """Projected gradient ascent in the L-infinity ball (Madry et al. 2018) on a generic loss.

    Each of ``steps`` iterations takes ``x <- proj(x + step_size * sign(grad))``, the projection
    being onto ``{|x - x0|_inf <= eps} ∩ input_range``. With ``steps=1``, ``step_size=eps`` and no
    random start this is exactly :func:`fgsm_from_loss`.

    Args:
      loss_of_inputs: ``x [B, ...] -> scalar`` to be increased.
      x: [B, ...] clean inputs.
      eps: L-infinity radius.
      step_size: per-step size (>= 0).
      steps: number of iterations (static, >= 1).
      input_range: ``(low, high)`` or None.
      key: PRNG key, required when ``random_start``.
      random_start: start from a uniform point of the eps-ball.

    Returns:
      [B, ...] adversarial inputs.
    """
    _check_eps(eps, input_range)
    if _is_concrete(step_size) and not float(step_size) >= 0.0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if random_start and key is None:
        raise ValueError("random_start=True needs a PRNG key")
    x0 = x
    if random_start:
        x = _clip(x0 + jax.random.uniform(key, x0.shape, x0.dtype, -eps, eps), input_range)
    grad_fn = jax.grad(loss_of_inputs)

    def body(_, xa):
        xa = xa + step_size * jnp.sign(grad_fn(xa))
        xa = jnp.clip(xa, x0 - eps, x0 + eps)
        return _clip(xa, input_range).astype(x0.dtype)

    return jax.lax.fori_loop(0, int(steps), body, x)


def _model_loss(apply_fn, variables, y, loss_fn):
    def loss_of_inputs(x):
        logits, _ = as_apply(apply_fn)(variables, x, train=False)
        return jnp.sum(loss_fn(logits, y))

    return loss_of_inputs


def fgsm(apply_fn, variables, x: jax.Array, y: jax.Array, *, eps: float, input_range=(0.0, 1.0),
         loss_fn=losses.cross_entropy) -> jax.Array:
    """FGSM against a model (Goodfellow et al. 2015), maximising ``sum_i loss(f(x_i), y_i)``.

    Args:
      apply_fn: model ``apply(variables, x, *, train) -> (logits, aux)``.
      variables: model variables (eval mode is used).
      x: [B, ...] inputs; y: [B] integer labels.
      eps: L-infinity radius, ``0 <= eps <= high - low``.
      input_range: ``(low, high)`` or None (e.g. standardised tabular features).
      loss_fn: per-example loss ``(logits, y) -> [B]``.

    Returns:
      [B, ...] adversarial inputs.
    """
    return fgsm_from_loss(_model_loss(apply_fn, variables, y, loss_fn), x, eps=eps,
                          input_range=input_range)


def pgd(apply_fn, variables, x: jax.Array, y: jax.Array, *, eps: float, step_size: float,
        steps: int, input_range=(0.0, 1.0), key: jax.Array | None = None,
        random_start: bool = False, loss_fn=losses.cross_entropy) -> jax.Array:
    """L-infinity PGD against a model; arguments as :func:`fgsm` and :func:`pgd_from_loss`."""
    return pgd_from_loss(_model_loss(apply_fn, variables, y, loss_fn), x, eps=eps,
                         step_size=step_size, steps=steps, input_range=input_range, key=key,
                         random_start=random_start)


def linear_perturbation(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                        gamma: float = 1.3) -> jax.Array:
    """The Megyeri linear adversary (seed 004 eq. (5); Chhabra et al. ``robust_fn.py``).

    Binary (one logit, ``kernel`` [d] or [d, 1]): ``x - gamma * (w^T x + b) / ||w||^2 * w``, which
    reflects x through the decision hyperplane and moves it ``gamma`` times its distance, so the
    sign of the logit flips when ``gamma > 1``.

    Multi-class (``kernel`` [d, K], K >= 2, logits ``z = x W + b``): for each point, with ``c`` its
    predicted class and ``k`` the runner-up, the same step is taken for the pairwise boundary
    ``z_c = z_k``, i.e. with ``w = W[:, c] - W[:, k]`` and margin ``z_c - z_k``. Afterwards
    ``z_c - z_k = (1 - gamma)(z_c - z_k) < 0``, so the prediction changes (to k, or to a third
    class) for ``gamma > 1``. For K = 2 this equals the binary rule on ``z_1 - z_0``.

    Args:
      x: [B, d] inputs (LR) or penultimate features (network head).
      kernel: [d], [d, 1] (single binary logit) or [d, K] head weights (flax ``Dense`` layout).
      bias: scalar, [1] or [K] intercept, or None.
      gamma: step multiple; ``gamma > 1`` flips every prediction.

    Returns:
      [B, d] perturbed points.
    """
    if x.ndim != 2:
        raise ValueError(f"linear_perturbation needs x of shape [B, d], got {x.shape}")
    kernel = kernel[:, None] if kernel.ndim == 1 else kernel
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[1]:
        raise ValueError(f"kernel {kernel.shape} does not match x {x.shape}: expected [{x.shape[1]}, K]")
    k_out = kernel.shape[1]
    b = jnp.zeros((k_out,), x.dtype) if bias is None else jnp.reshape(bias, (-1,))
    if b.shape != (k_out,):
        raise ValueError(f"bias {b.shape} does not match kernel {kernel.shape}")
    z = x @ kernel + b
    if k_out == 1:
        w = jnp.broadcast_to(kernel[:, 0], x.shape)
        margin = z[:, 0]
    else:
        top2 = jnp.argsort(z, axis=-1)[:, ::-1][:, :2]
        c, k = top2[:, 0], top2[:, 1]
        w = kernel.T[c] - kernel.T[k]
        margin = jnp.take_along_axis(z, c[:, None], 1)[:, 0] - jnp.take_along_axis(z, k[:, None], 1)[:, 0]
    sq = jnp.sum(w * w, axis=-1)
    step = jnp.where(sq > 0, gamma * margin / jnp.where(sq > 0, sq, 1.0), 0.0)
    return x - step[:, None] * w


def _attack(apply_fn, variables, x, y, *, eps, attack, input_range, step_size, steps, key,
            random_start, loss_fn):
    if attack == "fgsm":
        return fgsm(apply_fn, variables, x, y, eps=eps, input_range=input_range, loss_fn=loss_fn)
    if attack == "pgd":
        step_size = 2.5 * eps / steps if step_size is None else step_size
        return pgd(apply_fn, variables, x, y, eps=eps, step_size=step_size, steps=steps,
                   input_range=input_range, key=key, random_start=random_start, loss_fn=loss_fn)
    raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")


def _correct(apply_fn, variables, x_adv, y, weight):
    """[B] float 0/1 correctness on x_adv, times the 0/1 mask of nonzero weights."""
    logits, _ = as_apply(apply_fn)(variables, x_adv, train=False)
    correct = (jnp.argmax(losses.class_logits(logits), -1) == y).astype(jnp.float32)
    w = jnp.ones_like(correct) if weight is None else (weight != 0).astype(jnp.float32)
    return correct, w


def adversarial_accuracy(apply_fn, variables, x: jax.Array, y: jax.Array, *, eps: float,
                         attack: str = "fgsm", weight: jax.Array | None = None,
                         input_range=(0.0, 1.0), step_size: float | None = None, steps: int = 10,
                         key: jax.Array | None = None, random_start: bool = False,
                         loss_fn=losses.cross_entropy) -> jax.Array:
    """Accuracy on FGSM or PGD adversarial inputs made against the same model (white box).

    Args:
      apply_fn, variables, x, y, eps, input_range, loss_fn: as :func:`fgsm`.
      attack: ``"fgsm"`` or ``"pgd"`` (static).
      weight: optional [B] sample weights; weight-0 rows (padding) are not counted.
      step_size, steps, key, random_start: PGD settings (``step_size`` defaults to ``2.5 eps / steps``).

    Returns:
      Scalar accuracy in [0, 1].
    """
    x_adv = _attack(apply_fn, variables, x, y, eps=eps, attack=attack, input_range=input_range,
                    step_size=step_size, steps=steps, key=key, random_start=random_start,
                    loss_fn=loss_fn)
    correct, w = _correct(apply_fn, variables, x_adv, y, weight)
    return losses.weighted_mean(correct, w)


def adversarial_evaluator(apply_fn, *, eps: float, attack: str = "fgsm", input_range=(0.0, 1.0),
                          step_size: float | None = None, steps: int = 10,
                          random_start: bool = False, loss_fn=losses.cross_entropy,
                          batch_size: int = 1024, mesh=None, axis: str | None = None):
    """White-box FGSM / PGD accuracy over a whole split, compiled once, optionally on a mesh.

    The split is walked in padded batches of a static size (weight-0 padding rows are not counted,
    :func:`jaxunlearn.evaluation.accumulate`); with ``mesh`` each batch is split over the data axis
    and the attack, being per-example, gives the single-device adversarial inputs. Batch j's PGD
    random start is drawn with ``fold_in(key, j)``::

        ev = attacks.adversarial_evaluator(model.apply, eps=8 / 255, attack="pgd", steps=10,
                                           random_start=True, mesh=sharding.data_mesh())
        ev(variables, ds.test, key=key)          # {"accuracy": ..., "n": ...}

    Args:
      apply_fn, eps, attack, input_range, step_size, steps, random_start, loss_fn: as
        :func:`adversarial_accuracy`.
      batch_size: samples per attacked batch (rounded up to a multiple of the data-axis size).
      mesh: optional :class:`jax.sharding.Mesh` (e.g. :func:`jaxunlearn.sharding.data_mesh`).
      axis: its data axis (default ``"data"`` or its only axis).

    Returns:
      ``evaluate(variables, split, *, key=None) -> {"accuracy": float, "n": int}``.
    """
    from jaxunlearn import evaluation  # evaluation does not import attacks; keep the import local

    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    _check_eps(eps, input_range)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def step(stats, args, batch):
        variables, key = args
        x_adv = _attack(apply_fn, variables, batch["x"], batch["y"], eps=eps, attack=attack,
                        input_range=input_range, step_size=step_size, steps=int(steps),
                        key=jax.random.fold_in(key, stats["batches"]),
                        random_start=random_start, loss_fn=loss_fn)
        correct, w = _correct(apply_fn, variables, x_adv, batch["y"], batch["weight"])
        return {"correct": stats["correct"] + jnp.sum(correct * w), "count": stats["count"] + jnp.sum(w),
                "batches": stats["batches"] + 1}

    jitted = jax.jit(step)

    def evaluate(variables, split, *, key: jax.Array | None = None) -> dict:
        if random_start and key is None:
            raise ValueError("random_start=True needs key= (each batch's start is drawn from it)")
        key = jax.random.key(0) if key is None else key
        stats = {"correct": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32),
                 "batches": jnp.zeros((), jnp.int32)}
        stats = evaluation.accumulate(jitted, stats, (variables, key), split, batch_size=batch_size,
                                      mesh=mesh, axis=axis, keys=("x", "y"))
        n = float(stats["count"])
        if n == 0:
            raise ValueError("no sample with a nonzero weight was attacked")
        return {"accuracy": float(stats["correct"]) / n, "n": int(n)}

    return evaluate
