"""SalUn (Fan et al. 2024): random labels with the update restricted to salient weights.

1. :func:`saliency_mask`: one eval-mode pass over D_f accumulates
   ``g = sum_{i in D_f} (-eps_i) grad_theta(-CE_i)`` (the reference's ``sum grad(-CE)`` for the
   hard ``eps = -1``), and keeps the top fraction ``threshold`` of ``|g|`` ranked over all
   (trainable) parameter elements.
2. :func:`salun`: :func:`~jaxunlearn.methods.random_labels.random_labels` with that mask as the
   trainable set. The *whole* optimizer update is masked (momentum and weight decay included) and
   zero-update elements are kept bit-identical, so masked-out weights never move (the reference
   masked only the gradient, so its weight decay moved them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import evaluation, loop, losses
from jaxunlearn import subsets
from jaxunlearn.methods import base
from jaxunlearn.methods.random_labels import random_labels
from jaxunlearn.models.api import as_apply

__all__ = ["saliency_mask", "forget_gradient", "salun"]


def forget_gradient(apply_fn, variables, forget: dict, *, batch_size: int = 256, mesh=None):
    """``g = sum_i eps_i grad CE_i`` over the forget set in eval mode (a params-like pytree).

    ``eps`` is ``forget["weight"]`` (:func:`jaxunlearn.weights.unlearning_sets`), so
    ``g = sum_i (-eps_i) grad(-CE_i)``.
    """
    params, model_state = base.split_model_state(variables)
    w = loop.set_weight(forget, "forget")

    @jax.jit
    def step(g, args, batch):
        params, model_state = args

        def total(p):
            logits, _ = as_apply(apply_fn)({"params": p, **model_state}, batch["x"], train=False)
            return jnp.sum(batch["weight"] * losses.cross_entropy(logits, batch["y"]))

        return jax.tree.map(jnp.add, g, jax.grad(total)(params))

    return evaluation.accumulate(step, jax.tree.map(jnp.zeros_like, params), (params, model_state),
                                 {**forget, "weight": w},
                                 batch_size=min(batch_size, int(np.count_nonzero(w))), keys=("x", "y"),
                                 mesh=mesh)


def saliency_mask(apply_fn, variables, forget: dict, *, threshold: float = 0.5,
                  batch_size: int = 256, trainable=None, mesh=None):
    """SalUn's saliency mask: the top ``threshold`` fraction of ``|g|`` (:func:`forget_gradient`).

    Args:
      apply_fn: the model's ``apply``.
      variables: the original model's variables.
      forget: the forget split (``"weight"`` = eps, :func:`jaxunlearn.weights.unlearning_sets`).
      threshold: fraction t in (0, 1] of elements kept (reference 0.5); exactly ``int(N t)``
        elements are kept, N the number of ranked elements, ties broken by position.
      batch_size: batch size of the gradient pass.
      trainable: optional bool mask; only its elements are ranked (and can be kept).
      mesh: optional device mesh for the gradient pass (batches split over its data axis).

    Returns:
      A pytree of numpy bool arrays with the structure of ``variables["params"]``.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    g = forget_gradient(apply_fn, variables, forget, batch_size=batch_size, mesh=mesh)
    leaves, treedef = jax.tree_util.tree_flatten(g)
    if trainable is None:
        allowed = [np.ones(np.shape(l), bool) for l in leaves]
    else:
        t_leaves, t_def = jax.tree_util.tree_flatten(trainable)
        if t_def != treedef:
            raise ValueError("trainable mask does not have the structure of variables['params']")
        allowed = [np.broadcast_to(np.asarray(m, bool), np.shape(l)) for m, l in zip(t_leaves, leaves)]
    mags = np.concatenate([np.abs(np.asarray(l, np.float64)).ravel()[a.ravel()]
                           for l, a in zip(leaves, allowed)])
    keep = int(mags.size * float(threshold))
    if keep == 0:
        raise ValueError(f"threshold {threshold} keeps no element of {mags.size}")
    order = np.argsort(-mags, kind="stable")
    chosen = np.zeros(mags.size, bool)
    chosen[order[:keep]] = True
    out, start = [], 0
    for l, a in zip(leaves, allowed):
        m = np.zeros(np.size(l), bool)
        flat_a = a.ravel()
        cnt = int(flat_a.sum())
        m[flat_a] = chosen[start:start + cnt]
        start += cnt
        out.append(m.reshape(np.shape(l)))
    return jax.tree_util.tree_unflatten(treedef, out)


def salun(apply_fn, mask, *, optimizer: optax.GradientTransformation | None = None,
          trainable=None) -> base.Method:
    """SalUn: random-label unlearning on the salient weights only.

    Args:
      apply_fn: the model's ``apply``.
      mask: from :func:`saliency_mask`.
      optimizer: as :func:`~jaxunlearn.methods.random_labels.random_labels`.
      trainable: optional further restriction (e.g. the last k blocks), ANDed with ``mask``.
    """
    if mask is None:
        raise ValueError("salun needs a saliency mask (methods.saliency_mask)")
    return random_labels(apply_fn, optimizer=optimizer, trainable=subsets.combine_masks(mask, trainable),
                         name="SalUn")
