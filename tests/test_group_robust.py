"""The group-robust driver: its metric table against numpy, bad input, its configs, and a smoke
run interrupted after its first cell and resumed (compared with an uninterrupted run)."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import group_robust as GR
from jaxunlearn import data, metrics, models
from jaxunlearn import mutual_information as mi


def _split(x, y, g):
    return {"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int32),
            "group": np.asarray(g, np.int32), "index": np.arange(len(y), dtype=np.int32)}


def _hand_problem():
    rng = np.random.default_rng(0)
    sets = {}
    for name, n in (("retain", 40), ("forget", 8), ("val", 30), ("test", 60)):
        sets[name] = _split(rng.normal(size=(n, 2)), rng.integers(0, 2, n), rng.integers(0, 2, n))
    sets["forget"]["y"][:] = 1
    sets["forget"]["group"][:] = 0
    model = models.logistic_regression(2, 1)
    variables = {"params": {"head": {"kernel": jnp.asarray([[1.0], [-0.5]]), "bias": jnp.asarray([0.2])}}}
    return model, variables, sets


def test_evaluate_matches_numpy_on_a_hand_model():
    model, variables, sets = _hand_problem()
    out = GR.evaluate(model.apply, variables, sets, target=1, sensitive=0)
    pred = {k: (s["x"] @ np.array([1.0, -0.5]) + 0.2 > 0).astype(int) for k, s in sets.items()}
    ok = {k: pred[k] == sets[k]["y"] for k in sets}
    for k in ("retain", "forget", "test"):
        assert out[f"{k}_accuracy"] == pytest.approx(ok[k].mean())
    y, g = sets["test"]["y"], sets["test"]["group"]
    assert out["group_accuracy"] == pytest.approx(ok["test"][(y == 1) & (g == 0)].mean())
    cells = [ok["test"][(y == t) & (g == s)].mean() for t in (0, 1) for s in (0, 1)]
    assert out["worst_group_accuracy"] == pytest.approx(min(cells))
    eo = np.mean([abs(ok["test"][(y == t) & (g == 0)].mean() - ok["test"][(y == t) & (g == 1)].mean())
                  for t in (0, 1)])
    assert out["eo"] == pytest.approx(eo)
    assert 0.0 <= out["mia"] <= 1.0 and 0.0 <= out["mia_auc"] <= 1.0


def test_gaps_against_the_references():
    base = {k: 0.5 for k in metrics.GAP_KEYS}
    rows = {"rw_retrain": dict(base), "retrain": {**base, "mia": 0.9},
            "miu": {**base, "test_accuracy": 0.6, "group_accuracy": 0.2}}
    GR.add_gaps(rows)
    assert rows["rw_retrain"]["avg_gap_rw_retrain"] == 0.0
    assert rows["rw_retrain"]["tow_rw_retrain"] == 1.0
    assert rows["miu"]["avg_gap_rw_retrain"] == pytest.approx((0.1 + 0.3) / 6)
    assert rows["miu"]["avg_gap_retrain"] == pytest.approx((0.1 + 0.3 + 0.4) / 6)
    assert rows["miu"]["avg_gap_nomia_rw_retrain"] == pytest.approx((0.1 + 0.3) / 5)


def _synthetic_cells():
    """Three seeds of one (dataset, ratio) cell with hand-set metrics: the group accuracy of each
    method per seed; every other metric 0.5 (so Avg. Gap = |GA - GA(RW retrain)| / 6)."""
    ga = {"original": [0.585, 0.575, 0.605], "retrain": [0.40, 0.35, 0.45],
          "rw_retrain": [0.58, 0.57, 0.60], "salun": [0.30, 0.20, 0.25],
          "miu": [0.55, 0.539, 0.568], "miu_no_rw": [0.50, 0.56, 0.40]}
    cells = []
    for s in range(3):
        rows = {m: {**{k: 0.5 for k in metrics.GAP_KEYS}, "mia_auc": 0.5, "worst_group_accuracy": 0.1,
                    "group_accuracy": v[s]} for m, v in ga.items()}
        rows["original"]["mia_attack_auc"] = 0.5 + 0.01 * s
        GR.add_gaps(rows)
        cells.append({"seed": s, "dataset": "d", "ratio": 0.5, "rows": rows})
    return ga, cells


def test_analyse_pairs_miu_with_each_baseline_over_seeds_by_hand():
    from types import SimpleNamespace
    from experiments import stats

    ga, cells = _synthetic_cells()
    a = GR.analyse(cells, [SimpleNamespace(name="d")], (0.5,), [0, 1, 2])
    pr = a["datasets"]["d"]["0.5"]
    gap = lambda m: np.abs(np.subtract(ga[m], ga["rw_retrain"])) / 6
    want = stats.paired(gap("miu"), gap("original"), higher_is_better=False)
    got = pr["miu_vs"]["original"]["avg_gap_rw_retrain"]
    assert got["diff"]["mean"] == pytest.approx(want["diff"]["mean"])
    assert got["diff"]["half"] == pytest.approx(want["diff"]["half"]) and got["wins"] == 0
    assert pr["table"]["miu"]["group_accuracy"]["mean"] == pytest.approx(np.mean(ga["miu"]))
    assert pr["table"]["original"]["mia_attack_auc"]["mean"] == pytest.approx(0.51)
    claims = {c["claim"].split(" (")[0]: c["holds"] for c in a["paper_comparison"]}
    # retrain loses GA in every seed (-0.21 +- ...), RW restores it, MIU beats SalUn clearly
    assert claims["Plain retraining lowers the forget cell's group accuracy"] is True
    assert claims["Reweighted retraining restores group accuracy over plain retraining"] is True
    assert claims["MIU has a lower Avg. Gap to the RW retrain than every baseline"] is True
    assert claims["MIU has a higher group accuracy than every baseline"] is True
    # the untouched original is closer to the RW retrain than MIU in every seed
    assert claims["MIU is closer to the RW retrain than the untouched original model"] is False
    assert claims["Reweighting helps MIU"] == "inconclusive"
    assert "| MIU |" in "\n".join(GR.seed_report(a))
    with pytest.raises(ValueError, match="seeds"):
        GR.analyse(cells[:2], [SimpleNamespace(name="d")], (0.5,), [0, 1, 2])


def test_bad_input():
    for r in ((0.0,), (1.5,), (-0.1, 0.5), ()):
        with pytest.raises(ValueError):
            GR.check_ratios(r)
    ds = data.load_digits_spurious()
    spec = dataclasses.replace(_config("tiny")[1][0], target=6, sensitive=0)
    with pytest.raises(ValueError, match="outside"):
        GR.forget_rows(ds, spec, (0.5, 1.2), seed=0)
    # Digit 6 with a frame exists; a cell of an absent group does not.
    with pytest.raises(data.ForgetSetError, match="group 2 does not occur"):
        GR.forget_rows(ds, dataclasses.replace(spec, sensitive=2), (0.5,), seed=0)
    model, variables, sets = _hand_problem()
    sets["test"] = {k: v for k, v in sets["test"].items() if k != "group"}
    with pytest.raises(ValueError, match="group labels missing"):
        GR.evaluate(model.apply, variables, sets, target=1, sensitive=0)
    # A diverging MI estimate is a reported row, never a silent number; bad input still raises.
    row = GR.guarded("miu", lambda: (_ for _ in ()).throw(mi.MIDivergenceError("MINE diverged")))
    assert "MIDivergenceError" in row["error"] and "test_accuracy" not in row
    with pytest.raises(ValueError):
        GR.guarded("miu", lambda: GR.check_ratios((2.0,)))


def _config(name):
    cfg = common.load_config(common.config_path("group_robust", name), GR.Config)
    return cfg, [GR.DatasetConfig(**d) for d in cfg.datasets]


@pytest.mark.parametrize("name", ["quick", "tiny", "celeba", "waterbirds", "fairface"])
def test_every_config_loads_with_known_methods_and_valid_ratios(name):
    cfg, specs = _config(name)
    assert specs and set(cfg.methods) <= set(GR.ALL_METHODS)
    assert GR.check_ratios(cfg.ratios) == tuple(cfg.ratios)
    assert common.presets("group_robust") == ("celeba", "fairface", "quick", "tiny", "waterbirds")


def _cells(path):
    """results.json cells without their wall times: what must not depend on interruptions."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("seconds", "cpu_seconds",
                                                                    "eval_seconds")}
        return [strip(v) for v in o] if isinstance(o, list) else o
    with open(path) as f:
        return strip(json.load(f)["rows"])


def test_smoke_run_writes_outputs_and_resumes_identically_after_an_interruption(tmp_path,
                                                                               monkeypatch,
                                                                               killed_driver):
    argv = ["--preset", "tiny", "--set", "ratios=0.5,0.9", "--no-progress", "--no-compile-cache"]
    full = str(tmp_path / "full")
    results = GR.main(argv + ["--out", full])
    for f in ("results.json", "report.md", "group_accuracy.png", "digits_spurious_r0.5.csv",
              "digits_spurious_r0.9.csv"):
        assert os.path.getsize(os.path.join(full, f)) > 0, f
    rows = GR.by_dataset(results["rows"])["digits_spurious"]["ratios"]["0.5"]
    assert set(rows) == {"original", "rw_retrain", "miu"}
    assert rows["rw_retrain"]["avg_gap_rw_retrain"] == 0.0
    assert "error" not in rows["miu"] and np.isfinite(rows["miu"]["avg_gap_rw_retrain"])
    assert rows["miu"]["estimators"]["max_abs_mi"] >= 0
    report = open(os.path.join(full, "report.md")).read()
    assert "| MIU |" in report
    # one seed: the claims are there, inconclusive (no interval), and open the report
    assert [c["holds"] for c in results["paper_comparison"]] == ["inconclusive"]
    assert report.split("\n## ")[1].startswith("Paper vs ours\n\n| claim | paper | ours | holds |")

    # The same run killed (a real kill -9 of a subprocess) right after its first (dataset, ratio)
    # cell was written, then rerun on the same --out.
    part = str(tmp_path / "part")
    killed_driver("group_robust", argv + ["--out", part], after=1)
    assert [c["ratio"] for c in _cells(os.path.join(part, "results.json"))] == [0.5]
    run_cell, calls = GR.run_cell, []
    monkeypatch.setattr(GR, "run_cell", lambda *a, **k: calls.append(a[3]) or run_cell(*a, **k))
    calls.clear()
    GR.main(argv + ["--out", part])
    assert calls == [0.9]  # the finished cell is kept, not recomputed
    assert _cells(os.path.join(part, "results.json")) == _cells(os.path.join(full, "results.json"))
    calls.clear()
    GR.main(argv + ["--out", part])  # everything finished: nothing runs
    assert calls == []
    with pytest.raises(ValueError, match="--fresh"):  # another config never mixes into the file
        GR.main(["--preset", "tiny", "--set", "methods=rw_retrain,", "--out", part, "--no-progress"])
