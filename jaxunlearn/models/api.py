"""The one model contract the rest of jaxunlearn sees, and the adapters that satisfy it.

Every training loop, unlearning method, metric and influence function calls a model through::

    apply(variables, x, *, train=False, mask=None, capture_norm=False) -> (logits, aux)

* ``variables``: ``{"params": ..., <other collections, e.g. "batch_stats">}``.
* ``x``: [B, ...] a batch of inputs.
* ``train``: train mode (BatchNorm uses and updates batch statistics, dropout is on).
* ``mask``: optional [B] bool; samples with ``mask=False`` (padding, weight 0) are ignored by
  BatchNorm's batch statistics. Models without batch statistics ignore it.
* ``capture_norm``: also return the outputs of the normalisation layers (fairness-gap metrics).
* ``logits``: [B, K] (or [B, 1] for a single binary logit, see :mod:`jaxunlearn.losses`).
* ``aux["features"]``: [B, F] penultimate features (the input of the head); needed only by
  :func:`jaxunlearn.train.predict` and last-layer influence, absent if the model does not expose
  them.
* ``aux["model_state"]``: updated non-parameter collections (BatchNorm statistics) when
  ``train=True``; always present, ``{}`` for models without state or when ``train=False``.
* ``aux["norm"]``: ``{layer_name: output}`` of every normalisation layer, only when
  ``capture_norm=True`` (``{}`` for a model without normalisation layers).

No other keyword argument is ever passed. One constructor per kind of model returns a
:class:`Model` whose ``apply`` has this full contract:

* :func:`from_function`: a plain function ``fn(params, x) -> logits`` (or ``(logits,
  features)``) with its parameters.
* :func:`from_linen`: a Flax Linen module (``__call__(x[, train][, mask])``).
* :func:`~jaxunlearn.models.nnx_adapter.from_nnx`: a Flax NNX module.
* :func:`~jaxunlearn.models.equinox_adapter.from_equinox`: an Equinox module (``pip install
  jaxunlearn[equinox]``).

A hand-written ``apply`` that takes fewer keywords or returns only logits is brought to the full
contract by :func:`as_apply`, which the library applies to every ``apply_fn`` it is given.

Example (a plain function)::

    def fn(params, x):
        return x @ params["w"] + params["b"]          # [B, K] logits

    model = models.from_function(fn, {"w": jnp.zeros((d, K)), "b": jnp.zeros(K)})
    state = train.create_train_state(model, optax.adam(1e-3), key, x[:1])
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Model", "as_apply", "from_function", "from_linen", "check_input", "split_variables",
           "NORM_LAYER_TYPES"]

NORM_LAYER_TYPES = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)

# Functions whose signature already is the full contract carry this attribute (set by the
# adapters below); ``as_apply`` returns them unchanged.
_FULL_CONTRACT = "_jaxunlearn_full_contract"
_KEYWORDS = ("train", "mask", "capture_norm")


class Model(NamedTuple):
    """A pair of pure functions plus the static facts drivers need.

    Attributes:
      init: ``init(key, x) -> variables`` for an example batch ``x``.
      apply: see the module docstring.
      input_shape: per-example input shape the model expects (without batch), or None if any.
      num_outputs: number of logits (None if the constructor could not tell).
      module: the underlying Linen module, NNX graph definition or Equinox static part (None
        for plain functions).
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]
    input_shape: tuple[int, ...] | None
    num_outputs: int | None
    module: Any = None


def full_contract(apply: Callable) -> Callable:
    """Mark ``apply`` as implementing the full contract (so :func:`as_apply` passes it through)."""
    setattr(apply, _FULL_CONTRACT, True)
    return apply


def _is_array(v) -> bool:
    return isinstance(v, jax.Array) or (hasattr(v, "shape") and hasattr(v, "dtype"))


def normalise_output(out, name: str = "model") -> tuple[jax.Array, dict]:
    """``logits``, ``(logits, features)``, ``(logits, aux)`` or ``(logits, None)`` -> ``(logits, aux)``.

    The returned ``aux`` is a new dict that always holds ``"model_state"`` (``{}`` if missing).

    Raises:
      ValueError: if the output is none of these, or the logits are not [B, K].
    """
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"{name} returned a {type(out).__name__} of {len(out)} elements; the "
                             "model contract needs logits, (logits, features) or (logits, aux)")
        logits, second = out
        if second is None:
            aux = {}
        elif isinstance(second, dict):
            aux = dict(second)
        elif _is_array(second):
            aux = {"features": second}
        else:
            raise ValueError(f"{name} returned (logits, {type(second).__name__}); the second "
                             "element must be the features [B, F] or an aux dict")
    elif _is_array(out):
        logits, aux = out, {}
    else:
        raise ValueError(f"{name} returned {type(out).__name__}; the model contract needs "
                         "logits [B, K], (logits, features) or (logits, aux)")
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"{name} returned logits of shape {getattr(logits, 'shape', None)}; "
                         "expected [B, K] (for a single binary logit return [B, 1], e.g. "
                         "logits[:, None])")
    aux.setdefault("model_state", {})
    return logits, aux


def _accepted_keywords(fn: Callable) -> frozenset[str]:
    """Which of ``train``/``mask``/``capture_norm`` ``fn`` takes (all of them for ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: assume the full contract
        return frozenset(_KEYWORDS)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset(_KEYWORDS)
    names = {p.name for p in params
             if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return frozenset(k for k in _KEYWORDS if k in names)


class _Apply:
    """:func:`as_apply`'s wrapper; equal (and hashing equal) for the same ``fn``, so that jit's
    static arguments and compilation caches see one function however often it is wrapped."""

    __slots__ = ("fn", "accepts", "name", "__weakref__")

    def __init__(self, fn: Callable):
        self.fn = fn
        self.accepts = _accepted_keywords(fn)
        self.name = getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
        kwargs = {}
        if "train" in self.accepts:
            kwargs["train"] = train
        if "mask" in self.accepts:
            kwargs["mask"] = mask
        if capture_norm:
            if "capture_norm" not in self.accepts:
                raise ValueError(
                    f"apply function {self.name} does not take capture_norm=, which the "
                    "fairness-gap metrics and penalty need; wrap the model with "
                    "models.from_linen / from_nnx / from_equinox, or add a capture_norm keyword "
                    "that returns aux['norm'] = {layer_name: output}")
            kwargs["capture_norm"] = True
        logits, aux = normalise_output(self.fn(variables, x, **kwargs), f"apply function {self.name}")
        if capture_norm and "norm" not in aux:
            raise ValueError(f"apply function {self.name} was called with capture_norm=True but "
                             "returned no aux['norm']")
        return logits, aux

    def __eq__(self, other):
        return type(other) is _Apply and other.fn == self.fn

    def __hash__(self):
        return hash((_Apply, self.fn))

    def __repr__(self):
        return f"as_apply({self.fn!r})"


def as_apply(fn: Callable) -> Callable:
    """Bring a user's ``apply`` function to the full model contract (module docstring).

    ``fn(variables, x, **kw)`` may take any subset of the keywords ``train``, ``mask`` and
    ``capture_norm`` (only those it declares are passed; ``**kwargs`` takes all), and may return
    ``logits``, ``(logits, features)`` or ``(logits, aux)``; a missing ``aux["model_state"]``
    becomes ``{}``. Functions built by this package's adapters, and functions already wrapped, are
    returned unchanged, and wrapping the same ``fn`` twice gives equal (same-hash) wrappers, so
    calling this on every use costs no recompilation.

    A function without ``mask`` is only correct for models without batch statistics (padding
    would enter them); one without ``train`` runs the same in train and eval mode.

    Args:
      fn: ``fn(variables, x, [train=], [mask=], [capture_norm=])``.

    Returns:
      ``apply(variables, x, *, train=False, mask=None, capture_norm=False) -> (logits, aux)``.

    Raises:
      TypeError: if ``fn`` is not callable.
    """
    if isinstance(fn, _Apply) or getattr(fn, _FULL_CONTRACT, False):
        return fn
    if not callable(fn):
        raise TypeError(f"apply_fn must be callable, got {type(fn).__name__}")
    return _Apply(fn)


def from_function(fn: Callable, params=None, *, init: Callable | None = None,
                  input_shape: tuple[int, ...] | None = None,
                  num_outputs: int | None = None) -> Model:
    """Wrap a plain function ``fn(params, x) -> logits`` (or ``(logits, features)``).

    The model has no state, ignores ``train`` and ``mask`` and has no normalisation layers
    (``capture_norm=True`` gives ``aux["norm"] = {}``).

    Args:
      fn: ``fn(params, x [B, ...]) -> logits [B, K]`` or ``(logits, features [B, F])``.
      params: the initial parameters (a pytree); ``init`` returns a copy whatever its key.
      init: instead of ``params``, ``init(key, x) -> params``.
      input_shape: per-example input shape (for a clear error on misshaped inputs), or None.
      num_outputs: K; inferred with ``jax.eval_shape`` when ``params`` and ``input_shape`` are
        given.

    Raises:
      ValueError: unless exactly one of ``params`` and ``init`` is given.
    """
    if (params is None) == (init is None):
        raise ValueError("from_function needs exactly one of params= (the initial parameters) "
                         "and init= (init(key, x) -> params)")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    name = getattr(fn, "__qualname__", "model function")
    input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)

    def init_fn(key: jax.Array, x: jax.Array):
        check_input(x, input_shape, name)
        p = init(key, x) if init is not None else params
        return {"params": jax.tree.map(jnp.array, p)}

    @full_contract
    def apply(variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
        del train, mask
        check_input(x, input_shape, name)
        logits, aux = normalise_output(fn(variables["params"], x), name)
        if capture_norm:
            aux["norm"] = {}
        return logits, aux

    if num_outputs is None and params is not None and input_shape is not None:
        x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
        num_outputs = int(jax.eval_shape(apply, {"params": params}, x)[0].shape[-1])
    return Model(init=init_fn, apply=apply, input_shape=input_shape, num_outputs=num_outputs)


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


def from_linen(module: nn.Module, input_shape: tuple[int, ...] | None = None,
               num_outputs: int | None = None, *, uses_mask: bool | None = None) -> Model:
    """Wrap a Linen module whose ``__call__(x[, train][, mask])`` returns ``logits`` or
    ``(logits, features)``.

    ``train`` and ``mask`` are passed only if ``__call__`` declares them. Normalisation-layer
    outputs for ``capture_norm=True`` come from ``capture_intermediates``.

    Args:
      module: the Linen module.
      input_shape: per-example input shape, used to give a clear error on misshaped inputs.
      num_outputs: number of logits the module emits.
      uses_mask: whether ``__call__`` takes a ``mask=`` keyword (BatchNorm models); default:
        read from its signature.
    """
    name = type(module).__name__
    accepts = _accepted_keywords(type(module).__call__)
    uses_train = "train" in accepts
    uses_mask = "mask" in accepts if uses_mask is None else uses_mask

    def kwargs_for(train, mask):
        kwargs = {"train": train} if uses_train else {}
        if uses_mask:
            kwargs["mask"] = mask
        return kwargs

    def init(key: jax.Array, x: jax.Array):
        check_input(x, input_shape, name)
        return module.init(key, x, **kwargs_for(False, None))

    @full_contract
    def apply(variables, x, *, train: bool = False, mask=None, capture_norm: bool = False):
        check_input(x, input_shape, name)
        kwargs = kwargs_for(train, mask)
        mutable = [k for k in variables if k != "params"] if train else []
        capture = _is_norm_call if capture_norm else False
        if capture_norm:
            mutable = list(mutable) + ["intermediates"]
        if mutable:
            out, new_state = module.apply(
                variables, x, mutable=mutable, capture_intermediates=capture, **kwargs)
            new_state = dict(new_state)
        else:
            out = module.apply(variables, x, **kwargs)
            new_state = {}
        logits, aux = normalise_output(out, name)
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
