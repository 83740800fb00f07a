"""What every unlearning method shares: its shape, its state, weights, trainable subsets, one step.

**The method shape** (DESIGN.md, modelled on ``optax.GradientTransformation``). A factory whose
keyword arguments are the hyperparameters returns a :class:`Method`, a pair of pure functions

    init(variables) -> state
    update(variables, state, batches, key) -> (variables, state, metrics)

that the caller jits (:func:`jaxunlearn.loop.run` runs every method, training included, the same way).

* ``variables`` is the model's full variables dict ``{"params": ..., "batch_stats": ..., ...}``,
  exactly what ``apply`` takes. Only ``variables["params"]`` is trained; the other collections
  (BatchNorm statistics) are updated by the train-mode forward passes of the method's loss, in the
  order the reference runs them (each method documents its passes), and never in frozen layers.
* ``batches = {"forget": Batch, "retain": Batch}`` (or ``{"train": Batch}``, ...) with the
  DESIGN.md batch layout; a method reads only the sets named in ``Method.uses``. Epoch-dependent
  methods read ``state.epoch`` (:class:`MethodState`, set by the loop) and, for a cycled set,
  :func:`first_pass`.
* ``metrics`` is a dict of scalars, always with ``"loss"``.
* Data-dependent inputs (teacher variables, saliency mask, Fisher diagonal, ...) are computed
  beforehand by library functions and given to the factory; ``init`` moves every array into the
  state, so that a jitted ``update`` receives them as arguments (never as closed-over constants).

**Weights** (seed 004 §4.4; DESIGN.md "per-sample weights everywhere"). Every per-example loss is
reduced with :func:`jaxunlearn.losses.weighted_mean`, with the batch's ``weight``:

* a **retain** sample's weight ``w_r`` multiplies its loss in the method's retain term: 1 for the
  hard method, ``1 + eps_i`` for the soft one (the reweighted risk of seed 004 eq. (1));
* a **forget** sample's weight is the signed seed-004 perturbation ``eps_f``: -1 for the hard
  method (removal), the solver's ``eps_i`` for the soft one. The method's *forgetting objective*
  on that sample is multiplied by ``-eps_f``, so ``eps_f = -1`` is the published method and
  ``eps_f = 0`` drops the sample. For gradient ascent the forgetting objective is ``-CE``, so its
  forget term is ``weighted_mean(CE, eps_f)``: eq. (9), ``theta <- theta - eta eps_f grad l``.

:func:`jaxunlearn.weights.unlearning_sets` turns an ``eps`` vector over the training set into the
two sets (both the whole training set, with weights ``eps`` and ``1 + eps``), so that a hard ``eps``
in {-1, 0} gives exactly ``D_f`` (weight -1) and ``D_r`` (weight 1), and a soft one the SW- method,
with the same code.
A sample of weight 0 is never scheduled and, as padding, changes nothing.

**Trainable subsets.** Every factory takes ``trainable``: None (all parameters) or a bool pytree
with the structure of ``variables["params"]`` whose leaves are Python bools or bool arrays (per
element: SalUn's saliency mask). Gradients are taken only w.r.t. leaves with some True element
(frozen lower layers cost no backward pass and no optimizer state); the optimizer is chained with
:func:`jaxunlearn.subsets.masked`, which zeroes the whole update (weight decay and momentum
included) outside the mask; and unchanged elements stay bit-identical (:mod:`jaxunlearn.subsets`). BatchNorm
statistics of layers whose parameters are all frozen are not updated either.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import losses, subsets
from jaxunlearn.subsets import Subset, put, take
from jaxunlearn.models.api import as_apply

__all__ = [
    "Method",
    "MethodState",
    "first_pass",
    "gradient_step",
    "forward",
    "eval_logits",
    "require",
    "split_model_state",
    "init_state",
    "sgd",
]

SETS = ("forget", "retain")


class Method(NamedTuple):
    """An unlearning method (module docstring).

    Attributes:
      init: ``init(variables) -> state``.
      update: ``update(variables, state, batches, key) -> (variables, state, metrics)``.
      uses: the names of the sets the update reads, e.g. ``("forget", "retain")`` or
        ``("train",)`` (the loop builds only those; see :func:`jaxunlearn.loop.primary_set`).
      one_shot: the method is a single ``update`` on whole sets (IF, Fisher, NTK).
      name: a short label for reports.
      apply_fn: the model's ``apply`` when the method has one: :func:`jaxunlearn.loop.run` checks
        the sets' labels against the model's number of outputs with it before any compute.
    """

    init: Callable[[Any], Any]
    update: Callable[..., Any]
    uses: tuple[str, ...] = SETS
    one_shot: bool = False
    name: str = "method"
    apply_fn: Callable | None = None


class MethodState(NamedTuple):
    """The state of every method (the loop reads and sets only ``epoch``).

    Attributes:
      step: int32 number of ``update`` calls so far (as optax's ``count``); the loop derives each
        update's key from it.
      epoch: int32 0-based epoch the loop is in (set by :func:`jaxunlearn.loop.run` before each
        epoch; epoch-dependent methods such as SCRUB, L1-sparse and MIU read it).
      opt_state: the optax state over the trainable leaves (``()`` for one-shot methods).
      extra: dict of arrays the method carries (anchor, teachers, Fisher diagonal, ...).
    """

    step: jax.Array
    epoch: jax.Array
    opt_state: Any
    extra: dict


def require(batches: dict, name: str, method: str):
    """``batches[name]``, or a ValueError naming the method that needs it."""
    if not isinstance(batches, dict) or batches.get(name) is None:
        raise ValueError(f"{method} needs a {name!r} batch")
    return batches[name]


def first_pass(batch: dict) -> jax.Array:
    """True if a cycled batch belongs to the first pass over its set in this epoch.

    :func:`jaxunlearn.loop.run` marks each batch of a cycled set with ``"pass"`` [B]; a batch
    without it (a caller's own loop) counts as a first pass.
    """
    if "pass" not in batch:
        return jnp.asarray(True)
    return batch["pass"][0] == 0


def split_model_state(variables) -> tuple[Any, dict]:
    """``variables -> (params, model_state)``; a clear error if there are no params."""
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("methods take the model's full variables dict {'params': ..., ...}; "
                         f"got {type(variables).__name__} without a 'params' entry")
    params = variables["params"]
    return params, {k: v for k, v in variables.items() if k != "params"}


def _keep_frozen_state(new_state: dict, old_state: dict, subset: Subset | None) -> dict:
    """The model state after a step: ``new_state`` except in layers whose params are all frozen."""
    if not new_state:
        return old_state
    if subset is None or not subset.frozen_modules:
        return new_state

    def pick(path, new, old):
        return old if subsets.state_module(path) in subset.frozen_modules else new

    return jax.tree_util.tree_map_with_path(pick, dict(new_state), dict(old_state))


def forward(apply_fn, params, model_state: dict, x, weight, *, train: bool = True):
    """One forward pass: ``(logits, model_state)``; samples of weight 0 are masked out of BatchNorm."""
    logits, aux = as_apply(apply_fn)({"params": params, **model_state}, x, train=train, mask=weight != 0)
    new_state = aux.get("model_state") or {}
    return logits, (new_state if (train and new_state) else model_state)


def eval_logits(apply_fn, variables, x):
    """Logits of a frozen model in eval mode (teachers, the original model), gradient-stopped."""
    logits, _ = as_apply(apply_fn)(jax.lax.stop_gradient(variables), x, train=False)
    return jax.lax.stop_gradient(logits)


LossFn = Callable[[Any, dict], tuple[jax.Array, tuple[dict, dict]]]


def gradient_step(loss_fn: LossFn, variables, opt_state, optimizer: optax.GradientTransformation,
                  subset: Subset | None):
    """One optimizer step on the trainable subset.

    Args:
      loss_fn: ``loss_fn(params, model_state) -> (loss, (new_model_state, metrics))``.
      variables: the model variables.
      opt_state: state of ``subsets.masked(optimizer, subset)`` over ``take(params, subset)``
        (over the params pytree itself when ``subset`` is None).
      optimizer: that optimizer (already wrapped with :func:`jaxunlearn.subsets.masked`).
      subset: the trainable subset or None.

    Returns:
      ``(variables, opt_state, loss, metrics)``.
    """
    params, model_state = split_model_state(variables)
    # all parameters: the optimizer sees the params pytree itself (so optax masks over it work)
    leaves = params if subset is None else take(params, subset)

    def objective(train_leaves):
        return loss_fn(train_leaves if subset is None else put(params, subset, train_leaves),
                       model_state)

    (loss, (new_state, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(leaves)
    updates, opt_state = optimizer.update(grads, opt_state, leaves)
    if subset is None:
        params = jax.tree.map(lambda p, u: subsets.apply_updates([p], [u])[0], params, updates)
    else:
        params = put(params, subset, subsets.apply_updates(leaves, updates))
    new_state = _keep_frozen_state(new_state, model_state, subset)
    return {"params": params, **new_state}, opt_state, loss, metrics


def init_state(variables, optimizer: optax.GradientTransformation | None, subset: Subset | None,
               extra: dict | None = None) -> MethodState:
    """The initial :class:`MethodState` (optimizer state over the trainable leaves)."""
    params, _ = split_model_state(variables)
    opt_state = () if optimizer is None else optimizer.init(params if subset is None else take(params, subset))
    return MethodState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), opt_state, dict(extra or {}))


def optimizer_for(method: str, optimizer, trainable, *, default=None):
    """``(subset, tx)``: the method's optimizer (``default`` when None) on its trainable subset.

    Args:
      method: the method's name, for error messages.
      optimizer: the user's optax optimizer, or None for ``default``.
      trainable: the bool mask (:func:`jaxunlearn.subsets.resolve`).
      default: the method's default optimizer; None means the user must pass one.

    Returns:
      The resolved :class:`~jaxunlearn.subsets.Subset` (or None) and the masked optimizer.
    """
    optimizer = default if optimizer is None and default is not None else check_optimizer(optimizer, method)
    subset = subsets.resolve(trainable)
    return subset, subsets.masked(optimizer, subset)


def check_optimizer(optimizer, method: str) -> optax.GradientTransformation:
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"{method}: optimizer must be an optax.GradientTransformation, "
                         f"got {type(optimizer).__name__}")
    return optimizer


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def sgd(learning_rate: float, *, momentum: float | None = None,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
    """PyTorch-style SGD: L2 weight decay added to the gradient before momentum (the references)."""
    tx = optax.sgd(learning_rate, momentum=momentum)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


def correct(logits, y):
    """[B] float 1/0: argmax prediction equals the label."""
    return (jnp.argmax(losses.class_logits(logits), -1) == y).astype(jnp.float32)
