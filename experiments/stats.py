"""Seed statistics and the paper-vs-ours comparison every study report carries.

A claim-bearing table reports each cell over several seeds as mean ± 95 % confidence half-width
(Student t), and a comparison of two arms (soft vs hard, MIU vs a baseline, ...) as a paired
t-test over seeds plus the number of seeds won. Correlations measured once per seed pool with
Fisher's z. Each driver's ``results.json`` gets a top-level ``"paper_comparison"`` list of
:func:`claim` entries, and ``report.md`` shows :func:`comparison_table` as its first table.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["mean_ci", "paired", "pooled_correlation", "verdict", "claim", "comparison_table",
           "fmt_ci"]

LEVEL = 0.95


def _scipy_stats():
    from scipy import stats  # imported on first use: scipy.stats costs ~1.5 s at driver start-up

    return stats


def _finite(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: non-finite values {x.tolist()}")
    return x


def mean_ci(values: Sequence[float], *, level: float = LEVEL) -> dict:
    """Mean and two-sided Student-t confidence interval over seeds.

    Args:
      values: [s] one number per seed.
      level: confidence level.

    Returns:
      ``{"mean", "half", "lo", "hi", "n"}``; with one seed ``half`` is ``nan`` (no interval).
    """
    x = _finite(values, "mean_ci")
    n, m = x.size, float(x.mean())
    if n < 2:
        return {"mean": m, "half": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    half = float(_scipy_stats().t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "half": half, "lo": m - half, "hi": m + half, "n": n}


def paired(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True,
           level: float = LEVEL) -> dict:
    """Paired comparison of arm ``a`` against arm ``b`` over the same seeds.

    Args:
      a, b: [s] the two arms' values, seed by seed.
      higher_is_better: whether a larger value wins a seed.
      level: confidence level of the difference's interval.

    Returns:
      ``{"diff": mean_ci(a - b), "p": two-sided paired t-test p-value (nan for < 2 seeds or zero
      variance), "wins": seeds where a beats b, "n": seeds}``.
    """
    a, b = _finite(a, "paired a"), _finite(b, "paired b")
    if a.shape != b.shape:
        raise ValueError(f"paired: arms have {a.size} and {b.size} seeds; pair them seed by seed")
    d = a - b
    p = math.nan
    if d.size >= 2 and np.std(d) > 0:
        p = float(_scipy_stats().ttest_rel(a, b).pvalue)
    wins = int(np.sum(d > 0) if higher_is_better else np.sum(d < 0))
    return {"diff": mean_ci(d, level=level), "p": p, "wins": wins, "n": int(d.size)}


def pooled_correlation(rs: Sequence[float], ns: Sequence[int], *, level: float = LEVEL) -> dict:
    """Fixed-effect pooled Pearson correlation over seeds (Fisher z, weights n - 3).

    Args:
      rs: [s] per-seed correlations.
      ns: [s] per-seed numbers of points (each > 3).

    Returns:
      ``{"r", "lo", "hi", "p", "n_seeds"}``: pooled r, its confidence interval and the two-sided
      p-value of r = 0.
    """
    r = _finite(rs, "pooled_correlation rs")
    n = np.asarray(ns, dtype=np.float64).ravel()
    if n.shape != r.shape or np.any(n <= 3):
        raise ValueError(f"pooled_correlation: need one n > 3 per r, got rs={r.tolist()} "
                         f"ns={n.tolist()}")
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    w = n - 3
    zbar, se = float(np.sum(w * z) / np.sum(w)), float(1 / math.sqrt(np.sum(w)))
    q = _scipy_stats().norm.ppf(0.5 + level / 2)
    return {"r": math.tanh(zbar), "lo": math.tanh(zbar - q * se), "hi": math.tanh(zbar + q * se),
            "p": float(2 * _scipy_stats().norm.sf(abs(zbar) / se)), "n_seeds": int(r.size)}


def verdict(lo: float, hi: float, *, expect: str) -> bool | str:
    """Whether an interval supports a directional claim.

    Args:
      lo, hi: the interval (``nan`` when there is one seed).
      expect: ``"positive"`` (claim: the quantity is > 0) or ``"negative"``.

    Returns:
      True if the interval lies on the claimed side of 0, False if it lies on the other side,
      ``"inconclusive"`` if it contains 0 (or cannot be formed).
    """
    if expect not in ("positive", "negative"):
        raise ValueError(f"verdict: expect must be 'positive' or 'negative', got {expect!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    sign = 1 if expect == "positive" else -1
    if sign * lo > 0 and sign * hi > 0:
        return True
    if sign * lo < 0 and sign * hi < 0:
        return False
    return "inconclusive"


def claim(claim: str, paper: str, ours: str, holds: bool | str) -> dict:
    """One ``paper_comparison`` entry: the paper's headline claim, its number, ours, the verdict."""
    if holds not in (True, False, "inconclusive"):
        raise ValueError(f"claim {claim!r}: holds must be true, false or 'inconclusive', "
                         f"got {holds!r}")
    return {"claim": claim, "paper": paper, "ours": ours, "holds": holds}


def comparison_table(entries: Sequence[dict]) -> str:
    """The ``paper_comparison`` entries as the Markdown table that opens ``report.md``."""
    lines = ["| claim | paper | ours | holds |", "|---|---|---|---|"]
    for e in entries:
        h = e["holds"]
        h = "yes" if h is True else "no" if h is False else str(h)
        cells = [str(e[k]).replace("|", "\\|").replace("\n", " ") for k in ("claim", "paper", "ours")]
        lines.append("| " + " | ".join(cells + [h]) + " |")
    return "\n".join(lines) + "\n"


def fmt_ci(ci: dict, digits: int = 3) -> str:
    """``mean ± half`` (``mean`` alone with one seed)."""
    if not math.isfinite(ci["half"]):
        return f"{ci['mean']:.{digits}g}"
    return f"{ci['mean']:.{digits}g} ± {ci['half']:.{digits}g}"
