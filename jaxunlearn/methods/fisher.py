"""Fisher forgetting (Golatkar et al. 2020a): noise scaled by the inverse Fisher of D_r.

:func:`fisher_diagonal` computes the (weighted) diagonal Fisher information of the retain set,

    F = weighted_mean_i( sum_y p(y | x_i) (grad_theta log p(y | x_i))^2 , w_i ),

in eval mode (per-sample, per-class gradients, as the SCRUB notebooks' ``hessian``); the SW
version passes ``w_i = 1 + eps_i``. :func:`fisher_forgetting` is the one-shot update

    theta <- theta_0 + sqrt(var) * N(0, I),   var = alpha * min(1 / (F + 1e-8), max_variance),

the clamp applied before the scaling as in the reference (``1/(F+1e-8)`` clamped at 1e3, then
times alpha). Deviation: the reference's further per-layer heuristics (averaging the variance
over each output row, x10 for the head and BatchNorm, class-specific head rows) are not used.

Optionally (``newton_grad``) the update first takes Golatkar et al.'s Newton step towards the
retain optimum with the diagonal Fisher as the Hessian (their eq. (8) with B = diag(F) + damping):

    theta <- theta_0 - g_r / (F + damping) + sqrt(var) * N(0, I),

``g_r`` the gradient of the (weighted) retain objective at theta_0
(:func:`retain_gradient`). The noise-only update depends on the forget set only through the
Fisher of what is left, so with soft weights (every sample kept, weights near 1) it barely differs
from the original model; the Newton step is what makes the SW- version move.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import evaluation, loop, losses
from jaxunlearn import subsets
from jaxunlearn.methods import base
from jaxunlearn.models.api import as_apply

__all__ = ["fisher_diagonal", "retain_gradient", "newton_step_size", "fisher_forgetting"]


def _with_leaves(all_leaves, treedef, selected, train_leaves):
    """The params pytree with the ``selected`` leaves replaced by ``train_leaves``."""
    full = list(all_leaves)
    for i, leaf in zip(selected, train_leaves):
        full[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, full)


def _fisher_batch(apply_fn, selected, params, model_state, x, w):
    all_leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [all_leaves[i] for i in selected]

    def per_example(xi):
        def log_p(train_leaves):
            p = _with_leaves(all_leaves, treedef, selected, train_leaves)
            logits, _ = as_apply(apply_fn)({"params": p, **model_state}, xi[None], train=False)
            return jax.nn.log_softmax(losses.class_logits(logits), axis=-1)[0]

        jac = jax.jacrev(log_p)(leaves)  # per leaf [K, *leaf.shape]
        prob = jnp.exp(log_p(leaves))
        return [jnp.tensordot(prob, jnp.square(j), axes=1) for j in jac]

    per = jax.vmap(per_example)(x)
    return [jnp.tensordot(w, a, axes=1) for a in per]


def fisher_diagonal(apply_fn, variables, retain: dict, *, batch_size: int = 32, trainable=None,
                    mesh=None):
    """The weighted diagonal Fisher of the retain set, a pytree like ``variables["params"]``.

    Args:
      apply_fn: the model's ``apply``.
      variables: the original model's variables.
      retain: the retain split; ``"weight"`` (default 1) weights each sample's Fisher.
      batch_size: samples per vectorised batch (memory ~ batch_size x classes x parameters).
      trainable: optional bool mask; the Fisher is computed only on leaves with a True element,
        the other leaves are NaN (so that using them is an error, not a silent zero).
      mesh: optional device mesh: batches split over its data axis (:mod:`jaxunlearn.evaluation`).
    """
    params, model_state = base.split_model_state(variables)
    selected, leaves_all, treedef = _selected(params, trainable)
    retain, count = _weighted(retain)
    total = evaluation.accumulate(_fisher_step(apply_fn, selected), [jnp.zeros_like(leaves_all[i]) for i in selected],
                                  (params, model_state), retain, batch_size=min(batch_size, count),
                                  keys=("x",), mesh=mesh)
    out = [jnp.full_like(l, jnp.nan) for l in leaves_all]
    for i, t in zip(selected, total):
        out[i] = t / count
    return jax.tree_util.tree_unflatten(treedef, out)


# The jitted batch steps, one per (apply_fn, selected leaves): built once and reused, so repeated
# calls (a Newton line search, one Fisher per run of a study) do not recompile.
@functools.lru_cache(maxsize=64)
def _fisher_step(apply_fn, selected):
    @jax.jit
    def step(total, args, batch):
        fi = _fisher_batch(apply_fn, selected, *args, batch["x"], batch["weight"])
        return [a + b for a, b in zip(total, fi)]

    return step


@functools.lru_cache(maxsize=64)
def _objective_step(apply_fn, selected):
    @jax.jit
    def step(acc, args, batch):
        vi, gi = _objective_batch(apply_fn, selected, *args, batch["x"], batch["y"], batch["weight"])
        return acc[0] + vi, [a + b for a, b in zip(acc[1], gi)]

    return step


def _objective_batch(apply_fn, selected, params, model_state, x, y, w):
    """``(sum_i w_i CE_i, its gradient on the selected leaves)`` for one batch, eval mode."""
    all_leaves, treedef = jax.tree_util.tree_flatten(params)

    def loss(train_leaves):
        p = _with_leaves(all_leaves, treedef, selected, train_leaves)
        logits, _ = as_apply(apply_fn)({"params": p, **model_state}, x, train=False)
        return jnp.sum(w * losses.cross_entropy(logits, y))

    return jax.value_and_grad(loss)([all_leaves[i] for i in selected])


def _weighted(retain: dict) -> tuple[dict, int]:
    """The retain split with its checked weights (default 1) and the number of nonzero ones."""
    w = loop.set_weight(retain, "retain")
    return {**retain, "weight": w}, int(np.count_nonzero(w))


def _selected(params, trainable):
    subset = subsets.resolve(trainable)
    leaves_all, treedef = jax.tree_util.tree_flatten(params)
    if subset is not None and subset.treedef != treedef:
        raise ValueError("trainable mask does not have the structure of variables['params']")
    return (tuple(range(len(leaves_all))) if subset is None else subset.selected), leaves_all, treedef


def _retain_objective(apply_fn, variables, retain, l2, batch_size, trainable, mesh=None):
    """Value and gradient (selected leaves, NaN elsewhere) of the weighted retain objective."""
    base.check_positive("l2", l2, allow_zero=True)
    params, model_state = base.split_model_state(variables)
    selected, leaves_all, treedef = _selected(params, trainable)
    retain, count = _weighted(retain)
    value, total = evaluation.accumulate(
        _objective_step(apply_fn, selected), (jnp.zeros(()), [jnp.zeros_like(leaves_all[i]) for i in selected]),
        (params, model_state), retain, batch_size=min(batch_size, count), keys=("x", "y"), mesh=mesh)
    penalty = sum(jnp.sum(jnp.square(l)) for l in leaves_all)
    out = [jnp.full_like(l, jnp.nan) for l in leaves_all]
    for i, t in zip(selected, total):
        out[i] = t / count + l2 * leaves_all[i]
    return float(value / count + 0.5 * l2 * penalty), jax.tree_util.tree_unflatten(treedef, out)


def retain_gradient(apply_fn, variables, retain: dict, *, l2: float = 0.0, batch_size: int = 1024,
                    trainable=None, mesh=None):
    """Gradient at ``variables`` of the weighted retain objective, for the Newton step.

    The objective is ``weighted_mean_i(CE_i, w_i) + (l2/2) ||theta||^2`` in eval mode (the
    normalisation of :func:`fisher_diagonal`, so that ``g / (F + l2)`` is a diagonal Newton step
    on it). Leaves outside ``trainable`` are NaN.

    Args:
      apply_fn: the model's ``apply``.
      variables: the original model's variables (theta_0).
      retain: the retain split; ``"weight"`` (default 1) weights each sample.
      l2: the L2 coefficient the model was trained with.
      batch_size: samples per batch.
      trainable: optional bool mask of the parameters to differentiate.
      mesh: optional device mesh: batches split over its data axis.
    """
    return _retain_objective(apply_fn, variables, retain, l2, batch_size, trainable, mesh)[1]


def newton_step_size(apply_fn, variables, retain: dict, fisher, newton_grad, *, l2: float = 0.0,
                     damping: float, batch_size: int = 1024, trainable=None, shrink: float = 0.5,
                     armijo: float = 1e-4, max_halvings: int = 30) -> float:
    """Backtracking (Armijo) step size for the diagonal Newton step of :func:`fisher_forgetting`.

    A diagonal Fisher ignores the correlation of parameters, so the full step
    ``d = -g / (F + damping)`` can overshoot by roughly the number of correlated coordinates.
    Returns the largest ``eta = shrink^j`` with ``L_r(theta_0 + eta d) <= L_r(theta_0) + armijo *
    eta * g.d`` on the weighted retain objective ``L_r`` of :func:`retain_gradient`: training data
    only, no validation metric is consulted.

    Raises:
      FloatingPointError: no step of at least ``shrink**max_halvings`` decreases ``L_r``
        (``g`` is not a descent direction: a wrong ``newton_grad`` or a non-finite objective).
    """
    params, model_state = base.split_model_state(variables)
    f0, _ = _retain_objective(apply_fn, variables, retain, l2, batch_size, trainable)
    subset = subsets.resolve(trainable)
    g = subsets.take(newton_grad, subset)
    d = [-gl / (fl + damping) for gl, fl in zip(g, subsets.take(fisher, subset))]
    if subset is not None:  # element masks: the update of fisher_forgetting moves only these
        d = [dl if e is None else jnp.where(jnp.asarray(subset.masks[e]), dl, 0.0)
             for dl, e in zip(d, subset.elementwise)]
    slope = float(sum(jnp.sum(gl * dl) for gl, dl in zip(g, d)))
    eta = 1.0
    for _ in range(max_halvings + 1):
        moved = subsets.put(params, subset, [p + eta * dl for p, dl in zip(subsets.take(params, subset), d)])
        f, _ = _retain_objective(apply_fn, {"params": moved, **model_state}, retain, l2, batch_size,
                                 trainable)
        if np.isfinite(f) and f <= f0 + armijo * eta * slope:
            return eta
        eta *= shrink
    raise FloatingPointError(f"no Newton step size down to {eta / shrink:.1e} decreases the retain "
                             f"objective (value {f0:.6g}, slope {slope:.3g})")


def fisher_forgetting(fisher, *, alpha: float = 1e-6, max_variance: float = 1e3,
                      trainable=None, newton_grad=None, damping: float = 0.0,
                      step_size: float = 1.0) -> base.Method:
    """Fisher forgetting, a one-shot method.

    Args:
      fisher: the diagonal Fisher, a pytree like ``variables["params"]`` (:func:`fisher_diagonal`).
      alpha: noise scale (reference 1e-9 ... 1e-6; the SCRUB notebook applies 1e-6).
      max_variance: clamp of ``1 / (F + 1e-8)`` before scaling by alpha (reference 1e3).
      trainable: optional bool mask; only these elements receive noise.
      newton_grad: optional gradient of the retain objective at theta_0 (a pytree like
        ``variables["params"]``, :func:`retain_gradient`); adds the diagonal Newton step
        ``-newton_grad / (fisher + damping)`` (module docstring).
      damping: added to the Fisher in the Newton step (> 0 when ``newton_grad`` is given; the
        model's L2 coefficient makes it the diagonal of the regularised GGN).
      step_size: multiplies the Newton step (:func:`newton_step_size` picks one by backtracking).

    Returns:
      A one-shot :class:`~jaxunlearn.methods.base.Method` (it reads no batch; its ``update``
      perturbs the variables it is given, theta_0).
    """
    base.check_positive("alpha", alpha, allow_zero=True)
    base.check_positive("max_variance", max_variance)
    if newton_grad is not None:
        base.check_positive("damping", damping)
        base.check_positive("step_size", step_size)
    subset = subsets.resolve(trainable)

    def init(variables):
        params, _ = base.split_model_state(variables)
        if jax.tree.structure(fisher) != jax.tree.structure(params):
            raise ValueError("fisher does not have the structure of variables['params']")
        f = [jnp.asarray(l) for l in subsets.take(fisher, subset)]
        for leaf, p in zip(f, subsets.take(params, subset)):
            if leaf.shape != jnp.shape(p):
                raise ValueError(f"fisher leaf of shape {leaf.shape} for a parameter of shape {jnp.shape(p)}")
            if not bool(jnp.all(jnp.isfinite(leaf))) or bool(jnp.any(leaf < 0)):
                raise ValueError("fisher must be finite and >= 0 on the trainable parameters "
                                 "(was it computed with a smaller trainable subset?)")
        masks = [] if subset is None else [jnp.asarray(m) for m in subset.masks]
        step = [jnp.zeros_like(l) for l in f]
        if newton_grad is not None:
            if jax.tree.structure(newton_grad) != jax.tree.structure(params):
                raise ValueError("newton_grad does not have the structure of variables['params']")
            g = [jnp.asarray(l) for l in subsets.take(newton_grad, subset)]
            for leaf, fl in zip(g, f):
                if leaf.shape != fl.shape or not bool(jnp.all(jnp.isfinite(leaf))):
                    raise ValueError("newton_grad must be finite with the shapes of the trainable "
                                     "parameters (was it computed with another trainable subset?)")
            step = [step_size * gl / (fl + damping) for gl, fl in zip(g, f)]
        return base.init_state(variables, None, subset, {"fisher": f, "masks": masks, "step": step})

    update = _make_update(alpha, max_variance, subset)
    return base.Method(init, update, uses=(), one_shot=True, name="Fisher")


def _make_update(alpha: float, max_variance: float, subset):
    """The update of :func:`fisher_forgetting`: the Fisher and the step come from the state."""

    def update(variables, state, batches, key):
        del batches
        params, model_state = base.split_model_state(variables)
        leaves = subsets.take(params, subset)
        keys = jax.random.split(key, len(leaves))
        masks = state.extra["masks"]
        new = []
        for j, (p, f, k, d) in enumerate(zip(leaves, state.extra["fisher"], keys, state.extra["step"])):
            var = alpha * jnp.minimum(1.0 / (f + 1e-8), max_variance)
            q = p - d.astype(p.dtype) + jnp.sqrt(var).astype(p.dtype) * jax.random.normal(k, p.shape, p.dtype)
            e = None if subset is None else subset.elementwise[j]
            new.append(q if e is None else jnp.where(masks[e], q, p))
        params = subsets.put(params, subset, new)
        noise_std = jnp.sqrt(sum(jnp.sum(alpha * jnp.minimum(1.0 / (f + 1e-8), max_variance))
                                 for f in state.extra["fisher"]) / sum(f.size for f in state.extra["fisher"]))
        return {"params": params, **model_state}, state._replace(step=state.step + 1), \
            {"loss": jnp.zeros(()), "noise_rms": noise_std}

    return update
