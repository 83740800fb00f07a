"""Named structure of a model's parameters: head/body split, blocks, subsets, frozen training.

Pure pytree functions; they rely only on naming conventions, not on Flax:

* The **head** is the top-level parameter subtree ``"head"`` (the last, linear layer whose input
  is ``aux["features"]``); every built-in model names it so.
* A **block** is a top-level parameter subtree, except that ``"head"`` and subtrees named
  ``"head_*"`` (e.g. SmallViT's final LayerNorm ``"head_norm"``) form one block, ``"head"``.
  Blocks are ordered input to output: ``stem``/``embed`` first, ``head`` last, the rest in natural
  order of their names (``stage1_block2 < stage2_block1``, ``block2 < block10``,
  ``dense_0 < dense_1``). So ResNet: stem, each residual block, head; SmallViT: embed, each
  transformer block, head (final norm + classifier); MLP: each hidden layer, head.
* A **mask** is a pytree of Python bools with the structure of the tree it selects from (static,
  so that it can shape a jitted computation).

Typical uses::

    mask = last_k_mask(params, k)                      # CF-k / EU-k (SCRUB's baselines)
    method = methods.finetune(apply, trainable=mask)   # frozen leaves stay bit-identical
    params = reinit_masked(params, fresh_params, mask) # EU-k

Taking, putting and optimising a subset is :mod:`jaxunlearn.subsets`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np

from jaxunlearn.subsets import combine, select

__all__ = [
    "HEAD",
    "split_head",
    "merge_head",
    "block_of",
    "block_names",
    "last_k_mask",
    "reinit_masked",
    "norm_layer_names",
]

HEAD = "head"
_FIRST = ("stem", "embed")


def _keys(tree) -> list[str]:
    if not hasattr(tree, "keys"):
        raise ValueError(f"expected a dict of named layers, got {type(tree).__name__}")
    return list(tree.keys())


def split_head(params) -> tuple[Any, dict]:
    """``params -> (head, body)``: the ``"head"`` subtree and a dict of everything else."""
    keys = _keys(params)
    if HEAD not in keys:
        raise ValueError(f"params have no {HEAD!r} layer (top-level keys: {keys})")
    return params[HEAD], {k: params[k] for k in keys if k != HEAD}


def merge_head(head, body) -> dict:
    """Inverse of :func:`split_head`."""
    if HEAD in _keys(body):
        raise ValueError(f"body already contains a {HEAD!r} layer")
    return {**body, HEAD: head}


def block_of(key: str) -> str:
    """The block a top-level parameter name belongs to (``"head_norm" -> "head"``)."""
    return HEAD if key == HEAD or key.startswith(HEAD + "_") else key


def _order(name: str):
    rank = 0 if name in _FIRST else 2 if name == HEAD else 1
    natural = tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                    for t in re.split(r"(\d+)", name) if t)
    return rank, natural


def block_names(tree) -> list[str]:
    """Ordered block names (module docstring) of a params-like dict."""
    return sorted({block_of(k) for k in _keys(tree)}, key=_order)


def last_k_mask(tree, k: int, *, blocks: Sequence[str] | None = None):
    """Bool pytree selecting every leaf of the last ``k`` blocks (the head counts as one).

    Args:
      tree: params, or another collection laid out like them (e.g. ``batch_stats``).
      k: number of trailing blocks, ``1 <= k <= len(blocks)``.
      blocks: the ordered blocks to count from (default ``block_names(tree)``). Pass
        ``block_names(params)`` when masking a collection that lacks some blocks, e.g. the
        ``batch_stats`` of a ResNet have no ``head``.

    Raises:
      ValueError: if ``k`` is out of range or ``tree`` has a block missing from ``blocks``.
    """
    blocks = list(block_names(tree) if blocks is None else blocks)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(blocks):
        raise ValueError(f"k must be an integer in [1, {len(blocks)}] (the number of blocks: "
                         f"{blocks}), got {k!r}")
    unknown = sorted({block_of(key) for key in _keys(tree)} - set(blocks))
    if unknown:
        raise ValueError(f"blocks {unknown} of the tree are not in the block list {blocks}")
    chosen = set(blocks[len(blocks) - int(k):])

    def leaf(path, _):
        return block_of(str(getattr(path[0], "key", path[0]))) in chosen

    return jax.tree_util.tree_map_with_path(leaf, tree)


def reinit_masked(params, fresh_params, mask):
    """The leaves of ``fresh_params`` where ``mask``, ``params`` elsewhere (EU-k re-initialisation).

    Apply it to ``batch_stats`` too, with ``last_k_mask(batch_stats, k, blocks=block_names(params))``.
    """
    if jax.tree.structure(params) != jax.tree.structure(fresh_params):
        raise ValueError("fresh_params must have the structure of params")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fresh_params)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"fresh_params leaf of shape {np.shape(b)} replaces one of {np.shape(a)}")
    return combine(select(fresh_params, mask), params, mask)


def norm_layer_names(model, variables, sample_x) -> list[str]:
    """Names of the model's normalisation layers, ordered by when they run (input to output).

    The keys of ``aux["norm"]`` come back from ``jax.jit`` sorted alphabetically
    (``block10`` before ``block2``); this recovers the call order by tracing ``model.apply``
    once with ``capture_norm=True`` (``jax.eval_shape``: nothing is computed).

    Args:
      model: a :class:`~jaxunlearn.models.api.Model`.
      variables: its variables (or their ``jax.ShapeDtypeStruct`` s).
      sample_x: an example batch [B, ...] (only its shape and dtype are used).
    """
    names: list[str] = []

    def trace(v, x):
        _, aux = model.apply(v, x, train=False, capture_norm=True)
        names.extend(aux["norm"].keys())
        return None

    x = jax.ShapeDtypeStruct(np.shape(sample_x), getattr(sample_x, "dtype", np.float32))
    jax.eval_shape(trace, variables, x)
    return names
