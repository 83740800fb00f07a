"""Retrain (exact unlearning) and De Min et al.'s group-reweighted retraining.

:func:`retrain` trains from scratch on D_r with the original recipe (:mod:`jaxunlearn.train`),
either with per-sample loss weights (``weight``: 0 drops a sample, soft weights give SW-retrain)
or with a weighted sampler with replacement (``sampling_weight``: |D_r| draws per epoch).

:func:`group_weights` gives the reweighting of seed 002/003: with group ``g = s + y |S|``,

    w_i = N_train(g_i) / N_retain(g_i)   for retained i (0 for forgotten samples),

so that sampling D_r with probabilities proportional to w (the reference) or weighting its
losses by w restores the original group distribution (each group's total weight on D_r equals
its size in the full training set).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import losses, train

__all__ = ["group_weights", "retrain"]


def group_weights(y, s, retain, *, num_sensitive: int | None = None,
                  normalize: bool = False) -> np.ndarray:
    """De Min et al.'s group reweighting ``w_i = N_train(g_i) / N_retain(g_i)``, ``g = s + y |S|``.

    Args:
      y: [n] integer target labels of the whole training set.
      s: [n] integer sensitive attribute values (>= 0).
      retain: [n] bool, True for retained samples (False = forgotten).
      num_sensitive: |S| (default ``max(s) + 1``, so groups never collide).
      normalize: rescale so that the weights average 1 over D_r (as loss weights, this keeps the
        learning rate's effective scale; the sampling distribution is unchanged).

    Returns:
      [n] float32 weights, 0 on forgotten samples.
    """
    y = np.asarray(y)
    s = np.asarray(s)
    retain = np.asarray(retain)
    n = y.shape[0]
    if y.shape != (n,) or s.shape != (n,) or retain.shape != (n,):
        raise ValueError(f"y, s and retain must all have shape ({n},): got {y.shape}, {s.shape}, {retain.shape}")
    if retain.dtype != np.bool_:
        raise ValueError(f"retain must be a bool mask, got dtype {retain.dtype}")
    for name, a in (("y", y), ("s", s)):
        if not np.issubdtype(a.dtype, np.integer) or (a.size and a.min() < 0):
            raise ValueError(f"{name} must hold non-negative integers")
    if not retain.any():
        raise ValueError("the retain set is empty")
    size_s = int(s.max()) + 1 if num_sensitive is None else int(num_sensitive)
    if size_s <= int(s.max()):
        raise ValueError(f"num_sensitive={num_sensitive} but s takes the value {int(s.max())}")
    g = s.astype(np.int64) + y.astype(np.int64) * size_s
    n_groups = int(g.max()) + 1
    n_train = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_retain = np.bincount(g[retain], minlength=n_groups).astype(np.float64)
    w = np.zeros(n, np.float64)
    w[retain] = n_train[g[retain]] / n_retain[g[retain]]
    if normalize:
        w[retain] /= w[retain].mean()
    return w.astype(np.float32)


def retrain(variables, apply_fn, optimizer: optax.GradientTransformation, split: dict, *,
            epochs: int, batch_size: int, key: jax.Array, weight=None, sampling_weight=None,
            l2: float = 0.0, loss_fn=losses.cross_entropy, checkpoints=None, progress: bool = True):
    """Train from scratch on a split with loss weights or a weighted sampler.

    Args:
      variables: freshly initialised variables (``model.init(key, x)``).
      apply_fn: the model's ``apply``.
      optimizer: the original recipe's optimizer.
      split: the training split ``{"x", "y", ...}``; pass the full training set with ``weight`` 0
        on D_f, or D_r itself.
      epochs, batch_size, key: as :func:`jaxunlearn.train.fit`.
      weight: optional [n] loss weights (0 = excluded), e.g. ``group_weights(..., normalize=True)``.
      sampling_weight: optional [n] sampling weights: each epoch draws (with replacement) as many
        samples as have non-zero loss weight, with probabilities proportional to these weights.
      l2: coefficient of ``(l2/2)||theta||^2`` in the objective (the original recipe's).
      loss_fn: per-example loss.
      checkpoints: optional :class:`jaxunlearn.checkpoint.Checkpointer`: saved after every epoch,
        resumed from if it holds a checkpoint (the resumed run equals an uninterrupted one).
      progress: progress bar.

    Returns:
      ``(variables, history)``.
    """
    params = dict(variables)
    model_state = {k: v for k, v in params.items() if k != "params"}
    state = train.TrainState(jnp.zeros((), jnp.int32), params["params"], model_state,
                             optimizer.init(params["params"]))
    step = train.make_train_step(apply_fn, optimizer, loss_fn=loss_fn, l2=l2)
    state, history = train.fit(state, step, split, batch_size=batch_size, epochs=epochs, key=key,
                               weight=weight, sampling_weight=sampling_weight,
                               checkpoints=checkpoints, progress=progress, desc="retrain")
    return state.variables, history
