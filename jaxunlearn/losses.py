"""Per-example losses and the one place they are reduced.

Every loss in jaxunlearn is computed per example and reduced by :func:`weighted_mean`, so that any
objective can be re-weighted sample by sample (DESIGN.md: weight 0 = excluded or padding, 1 =
ordinary, -1 = ascent, anything else = a soft weight).

Binary models may emit a single logit ``z`` per example ([B, 1]); it is read as the two-class
softmax over ``[0, z]`` (so ``sigmoid(z) = p(y=1)``). Every function here accepts both layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "weighted_mean",
    "weighted_sum_and_count",
    "class_logits",
    "probabilities",
    "positive_probability",
    "cross_entropy",
    "kl_divergence",
    "distillation_kl",
    "soft_cross_entropy",
    "l2_penalty",
    "l1_norm",
]


def weighted_sum_and_count(values: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sufficient statistics of :func:`weighted_mean`: ``(sum_i w_i v_i, #{i: w_i != 0})``.

    These add across batches and shards, so a mean over a dataset streamed in batches is
    ``sum(s) / sum(c)``.
    """
    weight = weight.astype(values.dtype)
    live = weight != 0
    total = jnp.sum(jnp.where(live, weight * values, 0))  # a non-finite padding value cannot leak
    count = jnp.sum(live.astype(values.dtype))
    return total, count


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Reduce per-example values with per-sample weights: ``(1/m) sum_i w_i v_i``.

    ``m`` is the number of participating samples (``w_i != 0``), so weights in {0, 1} give the plain
    mean over the included samples, padding (weight 0) changes nothing, and a soft weight vector
    ``1 + eps`` gives the reweighted empirical risk of seed 004 eq. (1). Unlike ``sum(w v)/sum(w)``
    this stays well defined for negative (ascent) weights.

    Args:
      values: [B] per-example values.
      weight: [B] per-sample weights.

    Returns:
      A scalar; 0 when every weight is 0.
    """
    if values.shape != weight.shape:
        raise ValueError(f"weighted_mean: values {values.shape} and weight {weight.shape} differ in shape")
    total, count = weighted_sum_and_count(values, weight)
    return total / jnp.maximum(count, 1.0)


def class_logits(logits: jax.Array) -> jax.Array:
    """[B, K] logits for K >= 2 classes; a single binary logit [B, 1] becomes [B, 2] = [0, z]."""
    if logits.shape[-1] == 1:
        return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
    return logits


def probabilities(logits: jax.Array) -> jax.Array:
    """Class probabilities [B, K] (K = 2 for a single binary logit)."""
    return jax.nn.softmax(class_logits(logits), axis=-1)


def positive_probability(logits: jax.Array) -> jax.Array:
    """p(y = 1 | x) [B] for binary models (one logit or two), the soft prediction of the DP surrogate."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[..., 0])
    if logits.shape[-1] != 2:
        raise ValueError(f"positive_probability needs a binary model, got {logits.shape[-1]} logits")
    return jax.nn.softmax(logits, axis=-1)[..., 1]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy [B] for integer labels [B] in [0, K)."""
    return optax.softmax_cross_entropy_with_integer_labels(class_logits(logits), labels)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Per-example cross-entropy [B] against a target distribution [B, K]."""
    return optax.softmax_cross_entropy(class_logits(logits), target_probs)


def kl_divergence(target_logits: jax.Array, logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-example KL(softmax(target/T) || softmax(logits/T)) [B]."""
    log_q = jax.nn.log_softmax(class_logits(logits) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(class_logits(target_logits) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """SCRUB's distillation term KD_T(s, t) = KL(softmax(t/T) || softmax(s/T)) * T^2, per example [B]."""
    return kl_divergence(teacher_logits, student_logits, temperature) * temperature**2


def l2_penalty(params) -> jax.Array:
    """``0.5 * ||params||^2`` over every leaf of a pytree (the regulariser in the influence Hessian)."""
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))


def l1_norm(params) -> jax.Array:
    """``||params||_1`` over every leaf of a pytree (L1-sparse unlearning)."""
    return sum(jnp.sum(jnp.abs(p)) for p in jax.tree_util.tree_leaves(params))
