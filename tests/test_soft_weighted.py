"""The soft-weighted study driver: task checks, the improvement arithmetic, an end-to-end smoke run."""

import json

import numpy as np
import pytest

from experiments import soft_weighted as sw
from jaxunlearn import data


def _tiny_dataset(y_test, g_test):
    rng = np.random.default_rng(0)
    split = lambda n, y=None, g=None: data.make_split(
        rng.normal(size=(n, 3)).astype(np.float32),
        rng.integers(0, 2, n) if y is None else np.asarray(y),
        rng.integers(0, 2, n) if g is None else np.asarray(g))
    return data.Dataset("tiny", split(20), split(20), split(len(y_test), y_test, g_test), 2, 2,
                        ("no", "yes"), ("a", "b"))


def test_task_checks_name_the_problem():
    ok = _tiny_dataset([0, 1, 1, 0], [0, 0, 1, 1])
    sw.check_task("eop", ok)
    no_pos = _tiny_dataset([0, 0, 1, 0], [0, 0, 1, 1])  # group "a" has no positive label in test
    with pytest.raises(ValueError, match="group 'a' has no positive samples in the test split"):
        sw.check_task("eop", no_pos)
    sw.check_task("dp", no_pos)  # DP needs no positives
    with pytest.raises(ValueError, match="unknown task"):
        sw.check_task("accuracy", ok)


def test_improvement_arithmetic():
    rows = [
        {"dataset": "d", "model": "lr", "task": "dp", "algorithm": "IF", "scheme": "hard", "dp": 0.2, "accuracy": 0.80},
        {"dataset": "d", "model": "lr", "task": "dp", "algorithm": "IF", "scheme": "hard", "dp": 0.1, "accuracy": 0.90},
        {"dataset": "d", "model": "lr", "task": "dp", "algorithm": "IF", "scheme": "soft", "dp": 0.03, "accuracy": 0.85},
        {"dataset": "d", "model": "lr", "task": "dp", "algorithm": "IF", "scheme": "soft", "dp": 0.03, "accuracy": 0.87},
    ]
    (imp,) = sw.improvement_tables(rows)
    # seed means: hard |DP| 0.15, soft 0.03 -> 80 %; hard acc 0.85, soft 0.86 -> 1.176 %
    assert imp["target_improvement_%"] == pytest.approx(80.0)
    assert imp["utility_improvement_%"] == pytest.approx(100 * 0.01 / 0.85)
    assert imp["seeds"] == 2


def test_smoke_run_writes_report(tmp_path):
    out = tmp_path / "sw"
    res = sw.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    assert res["complete"]
    for f in ("results.json", "report.md", "runs.csv", "scatter_adult.png"):
        assert (out / f).exists(), f
    rows = json.loads((out / "results.json").read_text())["rows"]
    runs = [r for r in rows if r["scheme"] in ("hard", "soft")]
    assert {(r["algorithm"], r["scheme"]) for r in runs} == {
        ("GA_FT", "hard"), ("GA_FT", "soft"), ("IF", "hard"), ("IF", "soft")}
    for r in runs:
        assert 0.5 < r["accuracy"] <= 1.0 and np.isfinite(r["dp"])
    soft = next(r for r in runs if r["scheme"] == "soft")
    # the minimum-norm soft weights predict a metric change of -|f0| and a utility change of 0
    sweep = next(r for r in rows if r["scheme"] == "sweep")
    assert soft["predicted_metric_change"] == pytest.approx(-abs(sweep["original_val_metric"]), rel=1e-3)
    assert abs(soft["predicted_utility_change"]) < 1e-4
    assert "Table 1" in (out / "report.md").read_text()
