"""Summaries of an unlearned model against the retrained one (De Min et al., seeds 002/003).

* Avg. Gap = mean over m in {retain acc, forget acc, test acc, MIA, EO, group acc} of
  ``|m(unlearned) - m(retrained)|`` (reference ``compute_gap``; lower is better). The reference
  compares against the retrained or the reweighted-retrained model, in percent.
* ToW (tug-of-war, Zhao et al. 2024, as computed by De Min's reference ``compute_tow``):
  ``ToW = prod over S in {retain, forget, test} of (1 - |acc_S(unlearned) - acc_S(retrained)|)``
  with accuracies as fractions (the reference uses percent and ``1 - |a - r| / 100``, then reports
  ``100 * ToW``). 1 means identical to retraining; higher is better.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["GAP_KEYS", "TOW_KEYS", "avg_gap", "tow"]

GAP_KEYS = ("retain_accuracy", "forget_accuracy", "test_accuracy", "mia", "eo", "group_accuracy")
TOW_KEYS = ("retain_accuracy", "forget_accuracy", "test_accuracy")


def _value(metrics: Mapping, key: str, which: str) -> float:
    if key not in metrics:
        raise ValueError(f"{which} metrics lack {key!r} (have {sorted(metrics)})")
    v = float(metrics[key])
    if not math.isfinite(v):
        raise ValueError(f"{which} metric {key!r} is {v}")
    return v


def avg_gap(unlearned: Mapping, retrained: Mapping, *, keys: Sequence[str] = GAP_KEYS) -> float:
    """Mean absolute difference to the retrained model over ``keys`` (in the metrics' own units).

    Args:
      unlearned: ``{metric name: value}`` of the unlearned model.
      retrained: the same metrics of the (reweighted) retrained model.
      keys: the metrics to average; default :data:`GAP_KEYS` (MIA = the forget non-member rate).
    """
    if not keys:
        raise ValueError("avg_gap needs at least one metric key")
    gaps = [abs(_value(unlearned, k, "unlearned") - _value(retrained, k, "retrained")) for k in keys]
    return sum(gaps) / len(gaps)


def tow(unlearned: Mapping, retrained: Mapping, *, keys: Sequence[str] = TOW_KEYS,
        scale: float = 1.0) -> float:
    """Tug-of-war score in [0, 1]: ``prod_k (1 - |a_k - r_k| / scale)``.

    Args:
      unlearned: accuracies of the unlearned model (default keys :data:`TOW_KEYS`).
      retrained: the same for the retrained model.
      keys: which accuracies enter the product.
      scale: 1 for accuracies in [0, 1], 100 for percent.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    out = 1.0
    for k in keys:
        a, r = _value(unlearned, k, "unlearned"), _value(retrained, k, "retrained")
        for which, v in (("unlearned", a), ("retrained", r)):
            if not 0.0 <= v <= scale:
                raise ValueError(f"{which} {k!r} = {v} is outside [0, {scale}]; pass scale=100 for percent")
        out *= 1.0 - abs(a - r) / scale
    return out
