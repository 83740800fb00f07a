"""Use an Equinox module as a :class:`~jaxunlearn.models.api.Model` (``pip install jaxunlearn[equinox]``).

An Equinox module is a pytree holding its own parameters. :func:`from_equinox` partitions it into
its floating-point arrays (the trainable ``"params"``, re-keyed as a nested dict by attribute path,
e.g. ``{"layers": {"0": {"weight", "bias"}}}``, so that name-based tools such as
:func:`jaxunlearn.models.block_names` work) and a static rest, and recombines them on every
``apply``. A stateful module (``eqx.nn.BatchNorm`` with an ``eqx.nn.State``) keeps its state in the
``"eqx_state"`` collection, which ``apply(..., train=True)`` returns updated in
``aux["model_state"]``.

Equinox layers act on one example; the module is ``jax.vmap``-ed over the batch (axis name
``"batch"``, the one ``eqx.nn.BatchNorm(axis_name="batch")`` expects) unless ``batched=True``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.models.api import Model, check_input, full_contract, normalise_output

__all__ = ["from_equinox"]

_SINKS: list[dict] = []  # norm-layer outputs recorded during one traced call (capture_norm)


def _eqx():
    try:
        import equinox
    except ImportError as e:  # an optional extra
        raise ImportError("from_equinox needs Equinox: pip install 'jaxunlearn[equinox]' "
                          "(or pip install equinox)") from e
    return equinox


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_float_array(v) -> bool:
    return isinstance(v, (jax.Array, np.ndarray)) and jnp.issubdtype(v.dtype, jnp.inexact)


def _get(tree, path):
    for k in path:
        if hasattr(k, "name"):
            tree = getattr(tree, k.name)
        elif hasattr(k, "idx"):
            tree = tree[k.idx]
        else:
            tree = tree[k.key]
    return tree


def _norm_types(eqx) -> tuple:
    return tuple(getattr(eqx.nn, n) for n in ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")
                 if hasattr(eqx.nn, n))


def _recorder_class(eqx):
    class NormRecorder(eqx.Module):
        """Calls ``layer`` and records its output under ``name`` in the innermost sink."""

        layer: Any
        name: str = eqx.field(static=True)

        def __call__(self, *args, **kwargs):
            out = self.layer(*args, **kwargs)
            if _SINKS:
                _SINKS[-1][self.name] = out[0] if isinstance(out, tuple) else out
            return out

    return NormRecorder


def from_equinox(model, *, state=None, input_shape: tuple[int, ...] | None = None,
                 num_outputs: int | None = None, batched: bool = False,
                 axis_name: str = "batch") -> Model:
    """Wrap an Equinox module whose ``__call__(x)`` returns ``logits`` or ``(logits, features)``.

    A stateful module's ``__call__(x, state)`` returns ``(out, state)`` with ``out`` as above.
    Train/eval mode is ``eqx.nn.inference_mode(module, not train)``. ``mask`` is not passed to
    the module: an Equinox BatchNorm takes its batch statistics over the whole batch, padding
    included, so train such a model with a batch size that divides the data. With
    ``capture_norm=True`` the outputs of every ``BatchNorm``/``LayerNorm``/``GroupNorm``/
    ``RMSNorm`` are returned under their attribute paths (e.g. ``"blocks/0/norm"``).

    Args:
      model: an ``eqx.Module`` (``init`` then returns its parameters whatever the key), or a
        constructor ``key -> module`` or ``key -> (module, state)`` (e.g.
        ``lambda key: eqx.nn.make_with_state(Net)(key=key)``), called once here for the
        structure and by ``init`` with its key.
      state: the ``eqx.nn.State`` of a stateful module instance.
      input_shape: per-example input shape (for a clear error on misshaped inputs), or None.
      num_outputs: number of logits.
      batched: the module takes a whole batch [B, ...] itself (no ``vmap``).
      axis_name: the ``vmap`` axis name (the ``axis_name`` of the module's BatchNorms).

    Raises:
      ImportError: if Equinox is not installed.
      ValueError: if ``model`` is neither a module nor a constructor, or ``state`` is given with
        a constructor.
    """
    eqx = _eqx()
    if isinstance(model, eqx.Module):
        template, template_state = model, state
    elif callable(model):
        if state is not None:
            raise ValueError("from_equinox: pass state= only with a module instance; a "
                             "constructor returns (module, state) itself")
        template, template_state = _build(model, jax.random.key(0))
    else:
        raise ValueError(f"from_equinox needs an eqx.Module or a constructor key -> module, got "
                         f"{type(model).__name__}")
    params, static = eqx.partition(template, _is_float_array)
    leaves_with_path, params_def = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(_key_name(k) for k in p) for p, _ in leaves_with_path]
    if len(set(paths)) != len(paths):
        raise ValueError("from_equinox: two parameters share one attribute path")
    stateful = template_state is not None
    state_def = jax.tree.structure(template_state) if stateful else None
    norm_types = _norm_types(eqx)
    recorder = _recorder_class(eqx)
    name = f"equinox model {type(template).__name__}"

    def to_variables(module, st) -> dict:
        leaves = jax.tree.leaves(eqx.filter(module, _is_float_array))
        out: dict[str, Any] = {}
        for path, leaf in zip(paths, leaves, strict=True):
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        variables = {"params": out}
        if stateful:
            variables["eqx_state"] = {str(i): v for i, v in enumerate(jax.tree.leaves(st))}
        return variables

    def init(key: jax.Array, x: jax.Array):
        check_input(x, input_shape, name)
        if isinstance(model, eqx.Module):
            return jax.tree.map(jnp.array, to_variables(model, state))
        return to_variables(*_build(model, key))

    def with_recorders(m):
        found = [(p, l) for p, l in jax.tree_util.tree_flatten_with_path(
            m, is_leaf=lambda n: isinstance(n, norm_types))[0] if isinstance(l, norm_types)]
        if not found:
            return m
        return eqx.tree_at(lambda t: [_get(t, p) for p, _ in found], m,
                           [recorder(l, "/".join(_key_name(k) for k in p)) for p, l in found])

    @full_contract
    def apply(variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
        del mask  # see the docstring
        check_input(x, input_shape, name)
        p = variables["params"]
        leaves = []
        for path in paths:
            node = p
            for k in path:
                node = node[k]
            leaves.append(node)
        m = eqx.combine(jax.tree_util.tree_unflatten(params_def, leaves), static)
        m = eqx.nn.inference_mode(m, value=not train)
        if capture_norm:
            m = with_recorders(m)
        st = (jax.tree_util.tree_unflatten(state_def, [variables["eqx_state"][str(i)]
                                                        for i in range(state_def.num_leaves)])
              if stateful else None)

        def one(x, st):  # records the norm outputs of this trace level, returned as outputs
            _SINKS.append({})
            try:
                out, st = m(x, st) if stateful else (m(x), None)
                return (out, _SINKS[-1]), st
            finally:
                _SINKS.pop()

        if batched:
            (out, norm), st = one(x, st)
        else:
            (out, norm), st = jax.vmap(one, in_axes=(0, None), out_axes=(0, None),
                                       axis_name=axis_name)(x, st)
        logits, aux = normalise_output(out, name)
        if capture_norm:
            aux["norm"] = norm
        if train and stateful:
            aux["model_state"] = {"eqx_state": {str(i): v for i, v in enumerate(jax.tree.leaves(st))}}
        else:
            aux["model_state"] = {}
        return logits, aux

    return Model(init=init, apply=apply, input_shape=input_shape, num_outputs=num_outputs,
                 module=static)


def _build(make: Callable, key: jax.Array):
    built = make(key)
    if isinstance(built, tuple):
        if len(built) != 2:
            raise ValueError("from_equinox: the constructor must return a module or "
                             f"(module, state), got a tuple of {len(built)}")
        return built
    return built, None
