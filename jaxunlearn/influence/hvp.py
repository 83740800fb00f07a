"""Hessian-vector products of a scalar objective over a parameter pytree.

``objective(params, *args) -> scalar`` is typically the mean training loss plus its regulariser
(:func:`jaxunlearn.influence.grads.make_mean_objective`), whose Hessian H is the influence Hessian
(DESIGN.md). Three autodiff compositions give H v:

* ``"fwd_rev"`` (forward-over-reverse, ``jvp(grad f)``): the default.
* ``"rev_rev"`` (reverse-over-reverse, ``grad(<grad f, v>)``).
* ``"rev_fwd"`` (reverse-over-forward, ``grad(jvp f)``).

All three agree to rounding (H is symmetric). :func:`make_flat_hvp` wraps one for the solvers on
flat vectors (optionally linearising the gradient once with ``jax.linearize``).

Measured on the 2-core CPU (float32, jit, 10 products inside one ``fori_loop`` as in CG, median
CPU time per product; the machine was shared, wall times were 2-3x these):

===========================================  =========  =========  =========  ==============
workload                                      fwd_rev    rev_rev    rev_fwd    fwd_rev + lin.
===========================================  =========  =========  =========  ==============
softmax head d=256 K=10, n=50,000, q=1        36.5 ms    35.5 ms    34.8 ms    36.1 ms
  same, q=10 columns (vmapped)                95.2 ms    92.6 ms    120.8 ms   97.9 ms
MLP 784-128-64-10, n=5,000, q=1               35.7 ms    36.6 ms    37.3 ms    36.5 ms
  same, q=10 columns                          460 ms     418 ms     456 ms     462 ms
===========================================  =========  =========  =========  ==============

Forward-over-reverse and reverse-over-reverse are within the run-to-run noise (about 10 %) of
each other (reverse-over-reverse 3-9 % ahead with 10 batched columns, level with one);
reverse-over-forward is slower for batched columns. The default is forward-over-reverse: level
with the best, and it keeps no second reverse tape, so it needs the least memory. Linearising
once did not pay off (XLA fuses the primal pass into the product).

Known XLA:CPU bug (jax 0.10.2, DESIGN.md): inside jit, a product whose tangent is a
compile-time-constant zero, through ``jax.nn.softmax(X @ W.T)`` with X of >= 4096 rows, returns NaN
or garbage (reproduced here for all three modes with a softmax-probability loss; losses written
with ``log_softmax``, like :func:`jaxunlearn.losses.cross_entropy`, were not affected). Never
apply these products to a literal ``jnp.zeros`` inside jit; the solvers in
:mod:`jaxunlearn.influence.solvers` never do.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxunlearn.influence.grads import check_flat, check_like, flatten_params

__all__ = ["MODES", "DEFAULT_MODE", "hvp", "make_flat_hvp", "dense_hessian"]

MODES = ("fwd_rev", "rev_rev", "rev_fwd")
DEFAULT_MODE = "fwd_rev"  # see the measurements in the module docstring


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown HVP mode {mode!r}; choose one of {MODES}")


def hvp(objective: Callable, params, v, *args, mode: str = DEFAULT_MODE):
    """Hessian-vector product ``H v`` with ``H = d^2 objective(params, *args) / d params^2``.

    Args:
      objective: ``objective(params, *args) -> scalar``.
      params: the point theta (any pytree).
      v: a pytree with ``params``' structure and shapes (cast to their dtypes).
      *args: further arguments of ``objective`` (e.g. the batch); pass data here rather than
        closing over it.
      mode: ``"fwd_rev"`` (default), ``"rev_rev"`` or ``"rev_fwd"``.

    Returns:
      ``H v`` as a pytree like ``params``.

    Raises:
      ValueError: unknown mode, or ``v`` does not match ``params``.
    """
    _check_mode(mode)
    v = check_like(v, params, "v")
    grad_fn = jax.grad(objective)
    if mode == "fwd_rev":
        return jax.jvp(lambda p: grad_fn(p, *args), (params,), (v,))[1]
    if mode == "rev_rev":
        return jax.grad(lambda p: _tree_vdot(grad_fn(p, *args), v))(params)
    return jax.grad(lambda p: jax.jvp(lambda q: objective(q, *args), (p,), (v,))[1])(params)


def make_flat_hvp(objective: Callable, params, *args, damping: float = 0.0,
                  mode: str = DEFAULT_MODE, linearize: bool = False) -> Callable[[jax.Array], jax.Array]:
    """A matvec ``v [p] or [p, q] -> (H + damping I) v`` on flat vectors, for the solvers.

    Build it inside the function you jit, with ``params`` and the data as traced arguments (a
    closure over concrete arrays would be constant-folded by XLA).

    Args:
      objective: ``objective(params, *args) -> scalar``.
      params: the point theta; flat vectors follow :func:`~jaxunlearn.influence.grads.flatten_params`.
      *args: further arguments of ``objective``.
      damping: lambda added to the diagonal. The solvers also take ``damping``: add it once.
      mode: the HVP composition (see :func:`hvp`).
      linearize: with ``mode="fwd_rev"``, linearise ``grad objective`` once (``jax.linearize``) and
        reuse its primal pass in every product (memory: the residuals of one backward pass). Off by
        default: it was not faster on the benchmark workloads.

    Returns:
      ``matvec``; a [p, q] input is treated as q columns (vmapped).
    """
    _check_mode(mode)
    flat, unflatten = flatten_params(params)
    p = flat.shape[0]

    if mode == "fwd_rev" and linearize:
        _, lin = jax.linearize(lambda q: flatten_params(jax.grad(objective)(unflatten(q), *args))[0], flat)

        def one(v):
            return lin(v.astype(flat.dtype))
    else:
        def one(v):
            return flatten_params(hvp(objective, params, unflatten(v), *args, mode=mode))[0]

    def matvec(v):
        v = check_flat(v, p, "vector")
        hv = one(v) if v.ndim == 1 else jax.vmap(one, in_axes=1, out_axes=1)(v)
        return hv + damping * v if damping else hv

    return matvec


def dense_hessian(objective: Callable, params, *args, chunk_size: int | None = None) -> jax.Array:
    """The dense Hessian [p, p] of ``objective`` at ``params`` (flat order of ``flatten_params``).

    Args:
      objective: ``objective(params, *args) -> scalar``.
      params: the point theta.
      *args: further arguments of ``objective``.
      chunk_size: None uses ``jax.hessian`` (forward-over-reverse on all p basis vectors at once);
        otherwise the columns are formed ``chunk_size`` at a time (``jax.lax.map``), bounding the
        memory of the tangents to ``chunk_size`` copies of the activations.

    Returns:
      H [p, p], symmetric up to rounding.
    """
    flat, unflatten = flatten_params(params)

    def f(q):
        return objective(unflatten(q), *args)

    if chunk_size is None:
        return jax.hessian(f)(flat)
    p = flat.shape[0]
    _, lin = jax.linearize(jax.grad(f), flat)
    eye = jnp.eye(p, dtype=flat.dtype)
    return jax.lax.map(lin, eye, batch_size=int(chunk_size))
