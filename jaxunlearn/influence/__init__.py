"""Influence functions for JAX: per-sample gradients, HVPs, inverse-HVP solvers, scores.

``score_i`` is the predicted change of a measurement m, in m's own units, if training sample i
were removed: ``(1/n) ∇m(θ̂)^T H^{-1} ∇ell_i(θ̂)``, H the Hessian of the mean training loss
including its L2 term (DESIGN.md; :mod:`~jaxunlearn.influence.scores` relates it to seed 004's
``I(z; -1)``). Five lines on your own model -- any ``f(params, x) -> logits``::

    import jaxunlearn.influence as infl
    loss = lambda params, b: optax.softmax_cross_entropy_with_integer_labels(f(params, b["x"]), b["y"])
    problem = infl.make_problem(loss, params, train_batch, l2=1e-4)   # select=mask: a subset
    val_loss = infl.custom(lambda params, b: loss(params, b).mean())
    res = infl.influence_scores(problem, {"val": (val_loss, val_batch)}, solver=infl.CG(tol=1e-6))
    res.scores["val"]      # [n]: change of the validation loss if each training sample is removed
    new_params = infl.influence_update(problem, infl.CG(tol=1e-6), eps)  # unlearn eps (eq. 8)

Models following the jaxunlearn contract use ``infl.model_loss(model.apply)`` and the ready-made
measurements ``infl.utility / demographic_parity / equal_opportunity`` (robustness: ``utility`` on
a fixed adversarial batch from ``infl.attack_batch`` / ``infl.linear_adversarial_batch``). Solvers
are objects: ``infl.Direct()``, ``infl.CG(tol=...)``, ``infl.LiSSA(...)``,
``infl.Arnoldi(rank=..., num_iters=..., key=...)``, each with ``.solve(operator, b)``. The fast path
for a linear head on frozen features (the convex surrogate of seed 004) is
``infl.last_layer.refit_head`` + ``infl.last_layer.make_problem`` (closed-form gradients, Hessian,
HVPs and exact self-influence); ``infl.validate_last_layer`` / ``infl.validate`` check scores
against actual leave-one-out retraining.

Modules: :mod:`grads` (per-sample gradients over any parameter subset), :mod:`hvp` (Hessian-vector
products), :mod:`solvers` (direct, CG, LiSSA, Arnoldi), :mod:`measurements`, :mod:`scores`,
:mod:`update` (influence-based unlearning, eq. (8), and the hard-fraction sweep on it),
:mod:`last_layer`, :mod:`validation`. Nothing here jits itself except host-level helpers that
run a jitted computation with the arrays as arguments (``influence_scores``, ``self_influence``,
``refit_head``, the validation refits, ``influence_update``).
"""

from jaxunlearn.influence import (grads, hvp, last_layer, measurements, scores, solvers, update,
                                  validation)
from jaxunlearn.influence.grads import (NonFiniteError, combine, flatten_params, mean_grad,
                                        partition, per_sample_grads, per_sample_grads_flat)
from jaxunlearn.influence.hvp import dense_hessian, make_flat_hvp
from jaxunlearn.influence.hvp import hvp as hessian_vector_product
from jaxunlearn.influence.measurements import (attack_batch, custom, demographic_parity,
                                               equal_opportunity, linear_adversarial_batch, utility)
from jaxunlearn.influence.scores import (InfluenceResult, NonStationaryError, NonStationaryWarning,
                                         Problem, influence_scores, make_problem,
                                         measurement_gradients, model_loss, self_influence,
                                         stationarity)
from jaxunlearn.influence.solvers import (CG, Arnoldi, DenseFactor, Direct, LinearOperator, LiSSA,
                                          SolveResult, Solver, SolverError)
from jaxunlearn.influence.update import influence_step, influence_update, sweep_influence_update
from jaxunlearn.influence.validation import ValidationResult, validate, validate_last_layer

__all__ = [
    "grads", "hvp", "solvers", "measurements", "scores", "update", "last_layer", "validation",
    "NonFiniteError", "combine", "flatten_params", "mean_grad", "partition", "per_sample_grads",
    "per_sample_grads_flat", "dense_hessian", "make_flat_hvp", "hessian_vector_product",
    "attack_batch", "custom", "demographic_parity", "equal_opportunity", "linear_adversarial_batch",
    "utility", "InfluenceResult", "NonStationaryError", "NonStationaryWarning",
    "Problem", "influence_scores", "make_problem", "measurement_gradients", "model_loss",
    "self_influence", "stationarity", "Solver", "Direct", "CG", "LiSSA", "Arnoldi", "LinearOperator",
    "DenseFactor", "SolveResult", "SolverError", "influence_step", "influence_update",
    "sweep_influence_update", "ValidationResult", "validate", "validate_last_layer",
]

from jaxunlearn.influence import ekfac  # noqa: E402  K-FAC / EK-FAC for deep networks
__all__ += ["ekfac"]
