"""jaxunlearn: machine unlearning for fairness and robustness, in functional JAX.

Modules: :mod:`losses` (per-example losses, weighted_mean), :mod:`train` (weighted pure training),
:mod:`models` (Flax models behind one contract), :mod:`data` (datasets, splits, forget sets),
:mod:`checkpoint` (Orbax), :mod:`influence` (influence functions), :mod:`weights` (soft/hard
weights), :mod:`methods` (unlearning methods), :mod:`attacks`, :mod:`metrics`.
"""

__version__ = "0.1.0"
