"""Parameter subsets: one boolean-mask pytree, resolved once, used by methods, influence and models.

A **mask** is a pytree with the structure of ``variables["params"]`` whose leaves are Python bools
(a whole leaf in or out) or bool arrays of the leaf's shape (per element: SalUn's saliency mask).
:func:`mask_of` builds one from a layer-name prefix, a list of prefixes or a predicate (e.g.
``"head"``); :func:`jaxunlearn.models.last_k_mask` from the model's block structure.

* :func:`resolve` turns a mask into a static :class:`Subset` (which leaves are selected, which need
  per-element masks, which layers are wholly frozen);
* :func:`take` / :func:`put` extract and re-insert the selected leaves, so gradients are taken only
  w.r.t. them (frozen lower layers cost no backward pass and no optimizer state);
* :func:`masked` is the one masked optax transform: the optimizer on the selected leaves, with
  every update (weight decay and momentum included) zeroed outside the per-element masks, and
  :func:`apply_updates` leaves every zero-update element bit-identical;
* :func:`select` / :func:`combine` / :func:`partition_params` split a pytree by a mask of Python
  bools (None at the unselected leaves), e.g. for ``ravel_pytree`` over a subset.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Subset", "mask_of", "resolve", "combine_masks", "take", "put", "masked",
           "apply_updates", "select", "combine", "partition_params", "state_module", "path_name"]


def path_name(path) -> str:
    """``"layer/sub/leaf"`` of a pytree key path."""
    return "/".join(_key_name(p) for p in path)


def mask_of(params, select) -> Any:
    """A mask (module docstring) over ``params`` from a selection.

    Args:
      params: the pytree to select from.
      select: None (everything), a mask pytree (returned as is), a path prefix such as ``"head"``
        (paths join keys with ``/``: ``"head/kernel"``), a sequence of prefixes, or
        ``select(path, leaf) -> bool``.

    Raises:
      ValueError: nothing is selected, or a mask with another structure.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if select is None:
        return jax.tree_util.tree_unflatten(treedef, [True] * len(leaves))
    if not (isinstance(select, str) or callable(select)) and not (
            isinstance(select, (list, tuple)) and all(isinstance(q, str) for q in select)):
        if jax.tree.structure(select) != treedef:
            raise ValueError("the mask does not have the structure of the parameters: "
                             f"{jax.tree.structure(select)} vs {treedef}")
        return select
    if callable(select):
        pred = select
    else:
        prefixes = (select,) if isinstance(select, str) else tuple(select)

        def pred(path, _):
            return any(path == q or path.startswith(q.rstrip("/") + "/") for q in prefixes)

    mask = [bool(pred(path_name(path), leaf)) for path, leaf in leaves]
    if not any(mask):
        raise ValueError(f"{select!r} selects no parameter; paths are "
                         f"{[path_name(p) for p, _ in leaves]}")
    return jax.tree_util.tree_unflatten(treedef, mask)


class Subset(NamedTuple):
    """A trainable subset resolved from a bool mask (static, hashable parts only).

    Attributes:
      treedef: the structure of ``variables["params"]`` the mask was given for (None: any).
      selected: indices (in ``tree_flatten`` order) of leaves with some True element.
      elementwise: for each selected leaf, None (all elements trainable) or the index into
        ``masks`` of its per-element mask.
      masks: the per-element bool masks (numpy), moved into the optimizer state by ``init``.
      frozen_modules: module paths (tuples of keys) whose parameters are all frozen.
    """

    treedef: Any
    selected: tuple[int, ...]
    elementwise: tuple[int | None, ...]
    masks: tuple[np.ndarray, ...]
    frozen_modules: frozenset


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def state_module(path) -> tuple[str, ...]:
    """The layer (module path) of a model-state leaf at ``path`` (collection and leaf name dropped)."""
    return tuple(_key_name(p) for p in path)[1:-1]


def resolve(trainable) -> Subset | None:
    """Resolve a trainable mask (module docstring) into a :class:`Subset`; None stays None.

    Raises:
      ValueError: a leaf that is not boolean, or a mask that selects nothing.
    """
    if trainable is None:
        return None
    flat, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    if not flat:
        raise ValueError("trainable mask is empty")
    selected, elementwise, masks, leaf_frozen = [], [], [], {}
    for i, (path, leaf) in enumerate(flat):
        arr = np.asarray(leaf)
        if arr.dtype != np.bool_:
            raise ValueError(f"trainable mask leaf {'/'.join(map(_key_name, path))} has dtype "
                             f"{arr.dtype}; expected bool")
        names = tuple(_key_name(p) for p in path)
        leaf_frozen[names] = not arr.any()
        if not arr.any():
            continue
        selected.append(i)
        if arr.all():
            elementwise.append(None)
        else:
            elementwise.append(len(masks))
            masks.append(arr)
    if not selected:
        raise ValueError("trainable mask selects no parameter")
    modules: dict[tuple, bool] = {}
    for names, frozen in leaf_frozen.items():
        for depth in range(len(names)):
            mod = names[:depth]
            modules[mod] = modules.get(mod, True) and frozen
    frozen_modules = frozenset(m for m, f in modules.items() if f)
    return Subset(treedef, tuple(selected), tuple(elementwise), tuple(masks), frozen_modules)


def combine_masks(*masks):
    """Element-wise AND of bool mask pytrees of one structure (None entries are skipped).

    E.g. SalUn restricted to the last k blocks: ``combine_masks(saliency, last_k_mask(params, k))``.
    """
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        if jax.tree.structure(m) != jax.tree.structure(out):
            raise ValueError("masks to combine have different structures")
        out = jax.tree.map(lambda a, b: np.logical_and(np.asarray(a), np.asarray(b)), out, m)
    return out


def _check_structure(params, subset: Subset | None):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if subset is not None and treedef != subset.treedef:
        raise ValueError("the trainable mask does not have the structure of variables['params']: "
                         f"{subset.treedef} vs {treedef}")
    return leaves, treedef


def take(params, subset: Subset | None) -> list:
    """The trainable leaves of ``params`` (a list, ``tree_flatten`` order)."""
    leaves, _ = _check_structure(params, subset)
    return leaves if subset is None else [leaves[i] for i in subset.selected]


def put(params, subset: Subset | None, new_leaves: Sequence) -> Any:
    """``params`` with its trainable leaves replaced by ``new_leaves`` (inverse of :func:`take`)."""
    leaves, treedef = _check_structure(params, subset)
    if subset is None:
        return jax.tree_util.tree_unflatten(treedef, list(new_leaves))
    leaves = list(leaves)
    for i, leaf in zip(subset.selected, new_leaves):
        leaves[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


class FreezeState(NamedTuple):
    """State of the per-element freeze in :func:`masked`: the per-element masks, as traced arrays."""

    masks: tuple


def _freeze_outside(subset: Subset) -> optax.GradientTransformation:
    """An optax transform that zeroes updates outside the per-element masks of ``subset``.

    Chained *after* the optimizer (weight decay and momentum included), so masked-out elements
    never move. Acts on the list of trainable leaves of :func:`take`; fully trainable leaves pass.
    The masks live in the transform's state (jit arguments, not constants).
    """

    def init(params):
        del params
        return FreezeState(tuple(jnp.asarray(m) for m in subset.masks))

    def update(updates, state, params=None):
        del params
        out = [u if e is None else jnp.where(state.masks[e], u, jnp.zeros_like(u))
               for u, e in zip(updates, subset.elementwise)]
        return out, state

    return optax.GradientTransformation(init, update)


def masked(optimizer: optax.GradientTransformation,
           subset: Subset | None) -> optax.GradientTransformation:
    """The one masked optimizer: ``optimizer`` on :func:`take`'s leaves, followed (when the subset has
    per-element masks) by a transform that zeroes every update outside them, so masked-out
    elements never move (weight decay and momentum included)."""
    if subset is None or not subset.masks:
        return optimizer
    return optax.chain(optimizer, _freeze_outside(subset))


def apply_updates(leaves: Sequence, updates: Sequence) -> list:
    """``p + u`` per leaf, keeping ``p`` bit-identical where ``u == 0`` (even a ``-0.0`` weight)."""
    return [jnp.where(u == 0, p, p + u.astype(p.dtype)) for p, u in zip(leaves, updates)]


def _check_mask(tree, mask) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(mask):
        raise ValueError("mask must have exactly the structure of the tree it selects from: "
                         f"{jax.tree.structure(mask)} vs {jax.tree.structure(tree)}")
    if not all(isinstance(m, (bool, np.bool_)) for m in jax.tree.leaves(mask)):
        raise ValueError("mask leaves must be Python bools (a static mask)")


def select(tree, mask):
    """The leaves where ``mask`` is True; the others become None (an empty subtree)."""
    _check_mask(tree, mask)
    return jax.tree.map(lambda m, x: x if m else None, mask, tree)


def combine(selected, tree, mask):
    """Put the leaves of ``selected`` (from :func:`select`) back into ``tree`` where ``mask``."""
    _check_mask(tree, mask)
    return jax.tree.map(lambda m, s, x: s if m else x, mask, selected, tree)


def partition_params(params, mask) -> tuple[Any, Callable[[Any], Any]]:
    """``params -> (subset, rebuild)`` with ``rebuild(subset) == params``.

    Differentiate w.r.t. the selected parameters only: ``jax.grad(lambda s: f(rebuild(s)))(subset)``
    returns a tree with None at the frozen leaves (``ravel_pytree`` drops them). ``rebuild`` holds
    the frozen leaves; build it inside the jitted function so that they stay traced arguments.
    """
    subset = select(params, mask)
    return subset, lambda s: combine(s, params, mask)
