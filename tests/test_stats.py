"""experiments.stats against hand computations (tabulated t quantiles, explicit formulas)."""

import math

import numpy as np
import pytest

from experiments import stats


def test_mean_ci_uses_the_tabulated_t_quantile():
    x = [1.0, 2.0, 4.0, 3.0, 5.0]
    ci = stats.mean_ci(x)
    # t_{0.975, 4} = 2.776445 (printed tables); sd = sqrt(2.5)
    assert ci["mean"] == pytest.approx(3.0)
    assert ci["half"] == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert ci["lo"] < 3.0 < ci["hi"] and ci["n"] == 5
    assert math.isnan(stats.mean_ci([2.0])["half"])


def test_paired_t_statistic_by_hand():
    a = np.array([0.9, 0.8, 0.85, 0.7, 0.95])
    b = np.array([0.8, 0.82, 0.7, 0.6, 0.9])
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    res = stats.paired(a, b)
    from scipy import stats as st
    assert res["p"] == pytest.approx(2 * st.t.sf(abs(t), 4), rel=1e-9)
    assert res["wins"] == 4 and res["n"] == 5
    assert stats.paired(a, b, higher_is_better=False)["wins"] == 1
    with pytest.raises(ValueError, match="seed by seed"):
        stats.paired(a, b[:3])


def test_pooled_correlation_reduces_to_one_seed_and_averages_in_z():
    one = stats.pooled_correlation([0.5], [28])
    se = 1 / 5.0
    assert one["r"] == pytest.approx(0.5)
    assert one["lo"] == pytest.approx(math.tanh(math.atanh(0.5) - 1.959964 * se), rel=1e-6)
    two = stats.pooled_correlation([0.2, 0.6], [13, 33])   # weights 10 and 30
    assert two["r"] == pytest.approx(math.tanh((10 * math.atanh(0.2) + 30 * math.atanh(0.6)) / 40))
    with pytest.raises(ValueError, match="n > 3"):
        stats.pooled_correlation([0.1], [3])


def test_verdict_and_comparison_table():
    assert stats.verdict(0.1, 0.3, expect="positive") is True
    assert stats.verdict(-0.3, -0.1, expect="positive") is False
    assert stats.verdict(-0.1, 0.3, expect="negative") == "inconclusive"
    assert stats.verdict(math.nan, math.nan, expect="negative") == "inconclusive"
    e = stats.claim("soft beats hard", "98.9 %", "20/39 | 5 seeds", True)
    table = stats.comparison_table([e])
    assert table.splitlines()[0] == "| claim | paper | ours | holds |"
    assert "20/39 \\| 5 seeds" in table and table.rstrip().endswith("| yes |")
    with pytest.raises(ValueError, match="holds"):
        stats.claim("x", "y", "z", "maybe")
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_ci([1.0, float("nan")])
