"""Use a Flax NNX module as a :class:`~jaxunlearn.models.api.Model`.

NNX modules are stateful objects; the rest of jaxunlearn wants pure ``init``/``apply`` over plain
dicts. :func:`from_nnx` splits the module into a static graph and pure-dict collections
(``nnx.Param -> "params"``, ``nnx.BatchStat -> "batch_stats"``, any other state ->
``"nnx_state"``) and merges them back on every ``apply``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from jaxunlearn.models.api import (
    Model, _accepted_keywords, check_input, full_contract, normalise_output)

__all__ = ["from_nnx", "NNX_NORM_TYPES"]

NNX_NORM_TYPES = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)


def _split(module) -> dict:
    _, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    out = {"params": nnx.to_pure_dict(params)}
    for name, state in (("batch_stats", stats), ("nnx_state", rest)):
        pure = nnx.to_pure_dict(state)
        if pure:
            out[name] = pure
    return out


_SINKS: list[dict] = []  # {id(layer): output} of the norm layers in the call being traced
_RECORDING: dict[type, type] = {}


def _recording(cls: type) -> type:
    """A subclass of the norm layer ``cls`` that also records its output in the innermost sink."""
    if cls not in _RECORDING:
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            if _SINKS:
                _SINKS[-1][id(self)] = out
            return out

        _RECORDING[cls] = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
    return _RECORDING[cls]


def from_nnx(make_module: Callable[[nnx.Rngs], nnx.Module], input_shape: tuple[int, ...] | None = None,
             num_outputs: int | None = None, *, uses_mask: bool | None = None) -> Model:
    """Wrap an NNX module whose ``__call__(x[, mask])`` returns ``logits`` or ``(logits, features)``.

    Train/eval mode is set with ``set_attributes(use_running_average=not train,
    deterministic=not train)`` on the module merged for each call. With ``capture_norm=True`` the
    outputs of every ``BatchNorm``/``LayerNorm``/``GroupNorm``/``RMSNorm`` are returned under
    their attribute paths (e.g. ``"blocks/0/ln1"``), in call order.

    Args:
      make_module: constructor ``rngs -> module`` (e.g. ``lambda rngs: Net(rngs=rngs)``), called by
        ``init`` with ``nnx.Rngs(key)``.
      input_shape: per-example input shape (for a clear error on misshaped inputs), or None.
      num_outputs: number of logits.
      uses_mask: whether ``__call__`` takes ``mask=`` ([B] bool, forwarded to its BatchNorms as
        ``mask[:, None, ...]`` by the module itself); default: read from its signature.

    Raises:
      ValueError: if ``make_module`` is a module instance rather than a constructor.
    """
    if isinstance(make_module, nnx.Module):
        raise ValueError("from_nnx needs a constructor rngs -> module (so that init can use its "
                         "key), e.g. `lambda rngs: Net(rngs=rngs)`, not a module instance")
    abstract = nnx.eval_shape(lambda: make_module(nnx.Rngs(0)))
    graphdef = nnx.split(abstract)[0]
    name = f"nnx model {type(abstract).__name__}"
    if uses_mask is None:
        uses_mask = "mask" in _accepted_keywords(type(abstract).__call__)

    def init(key: jax.Array, x: jax.Array):
        check_input(x, input_shape, name)
        return _split(make_module(nnx.Rngs(key)))

    @full_contract
    def apply(variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
        check_input(x, input_shape, name)
        module = nnx.merge(graphdef, *variables.values())  # a fresh object: safe to mutate
        module.set_attributes(use_running_average=not train, deterministic=not train,
                              raise_if_not_found=False)

        def call(m, x):
            return m(x, mask=mask if train else None) if uses_mask else m(x)

        aux: dict[str, Any] = {}
        if capture_norm:  # the merged module is ours: its norm layers may record their outputs
            names = {}
            for path, sub in nnx.iter_graph(module):
                if isinstance(sub, NNX_NORM_TYPES):
                    names[id(sub)] = "/".join(map(str, path))
                    object.__setattr__(sub, "__class__", _recording(type(sub)))
            _SINKS.append({})
            try:
                out = call(module, x)
                aux["norm"] = {names[i]: v for i, v in _SINKS[-1].items()}
            finally:
                _SINKS.pop()
        else:
            out = call(module, x)
        logits, out_aux = normalise_output(out, name)
        aux.update(out_aux)
        state = _split(module)
        aux["model_state"] = {k: v for k, v in state.items() if k != "params"} if train else {}
        return logits, aux

    return Model(init=init, apply=apply, input_shape=input_shape, num_outputs=num_outputs,
                 module=graphdef)
