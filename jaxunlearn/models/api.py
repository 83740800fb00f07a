"""The one model contract the rest of jaxunlearn sees.

``apply(variables, x, *, train=False, mask=None, capture_norm=False) -> (logits, aux)``

* ``variables``: ``{"params": ..., <other collections, e.g. "batch_stats">}``.
* ``logits``: [B, K] (or [B, 1] for a single binary logit, see :mod:`jaxunlearn.losses`).
* ``aux["features"]``: [B, F] penultimate features (the input of the head).
* ``aux["model_state"]``: updated non-parameter collections (BatchNorm statistics) when
  ``train=True``; ``{}`` for models without state.
* ``aux["norm"]``: ``{layer_name: output}`` of every normalisation layer, only when
  ``capture_norm=True``.
* ``mask``: optional [B] bool; samples with ``mask=False`` (padding) are ignored by BatchNorm's
  batch statistics. Models without batch statistics ignore it.

Only this package knows Flax. A Linen module plugs in through :func:`from_linen` if its
``__call__(x, train)`` returns ``(logits, features)`` (and takes ``mask=`` when it has BatchNorm).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Model", "from_linen", "check_input", "split_variables", "NORM_LAYER_TYPES"]

NORM_LAYER_TYPES = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)


class Model(NamedTuple):
    """A pair of pure functions plus the static facts drivers need.

    Attributes:
      init: ``init(key, x) -> variables`` for an example batch ``x``.
      apply: see the module docstring.
      input_shape: per-example input shape the model expects (without batch), or None if any.
      num_outputs: number of logits.
      module: the underlying Linen module (None for user functions).
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]
    input_shape: tuple[int, ...] | None
    num_outputs: int
    module: Any = None


def _flatten_names(tree, prefix=()) -> dict[str, jax.Array]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_names(v, prefix + (k,)))
        elif isinstance(v, tuple):  # capture_intermediates stores a tuple of call outputs
            out["/".join(prefix)] = v[0]
        else:
            out["/".join(prefix + (k,))] = v
    return out


def _is_norm_call(module: nn.Module, method_name: str) -> bool:
    return isinstance(module, NORM_LAYER_TYPES) and method_name == "__call__"


def check_input(x: jax.Array, input_shape: tuple[int, ...] | None, name: str = "model") -> None:
    """Raise a ValueError naming the mismatch if ``x`` [B, ...] does not fit ``input_shape``."""
    if input_shape is None:
        return
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"{name} expects inputs of shape [B, {', '.join(map(str, input_shape))}], "
            f"got {list(x.shape)}"
        )


def from_linen(module: nn.Module, input_shape: tuple[int, ...] | None, num_outputs: int,
               *, uses_mask: bool = False) -> Model:
    """Wrap a Linen module whose ``__call__(x, train)`` returns ``(logits, features)``.

    Args:
      module: the Linen module.
      input_shape: per-example input shape, used to give a clear error on misshaped inputs.
      num_outputs: number of logits the module emits.
      uses_mask: whether ``__call__`` takes a ``mask=`` keyword (BatchNorm models).
    """
    name = type(module).__name__

    def init(key: jax.Array, x: jax.Array):
        check_input(x, input_shape, name)
        kwargs = {"mask": None} if uses_mask else {}
        return module.init(key, x, train=False, **kwargs)

    def apply(variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
        check_input(x, input_shape, name)
        kwargs = {"mask": mask} if uses_mask else {}
        mutable = [k for k in variables if k != "params"] if train else []
        capture = _is_norm_call if capture_norm else False
        if capture_norm:
            mutable = list(mutable) + ["intermediates"]
        if mutable:
            (logits, features), new_state = module.apply(
                variables, x, train=train, mutable=mutable, capture_intermediates=capture, **kwargs)
            new_state = dict(new_state)
        else:
            logits, features = module.apply(variables, x, train=train, **kwargs)
            new_state = {}
        aux = {"features": features}
        inter = new_state.pop("intermediates", None)
        if capture_norm:
            aux["norm"] = _flatten_names(dict(inter or {}))
        aux["model_state"] = new_state if train else {}
        return logits, aux

    return Model(init=init, apply=apply, input_shape=input_shape, num_outputs=num_outputs, module=module)


def split_variables(variables) -> tuple[Any, dict]:
    """``variables -> (params, model_state)`` where model_state holds every other collection."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables
