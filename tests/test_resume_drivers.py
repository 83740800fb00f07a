"""Kill-and-resume of the drivers without an interruption test of their own (train_baselines,
influence_validity; soft_weighted, fairness_gap and group_robust have theirs in their own test
files): a subprocess dies like ``kill -9`` right after its first finished unit of work
(``JAXUNLEARN_KILL_AFTER_RESULTS=1``, see :func:`experiments.common.write_json`), the rerun on the
same ``--out`` finishes it, and the rows equal an uninterrupted run's, with the finished work (its
history and timings) kept exactly as written.

To stay cheap, both processes read a small synthetic Adult-like dataset (:func:`small_adult`, patched
in for the embedded Adult) instead of the 30k-row file.
"""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import common, influence_validity, train_baselines
from jaxunlearn import data

TIMING = ("train_seconds", "seconds", "time")


def small_adult(data_dir=None, *, seed: int = 0, **kw) -> data.Dataset:
    """A 600/200/300-row binary task with two groups, shaped like Adult (12 features)."""
    del data_dir, kw
    rng = np.random.default_rng(seed)

    def split(n):
        x = rng.normal(size=(n, 12)).astype(np.float32)
        g = (rng.random(n) < 0.4).astype(np.int32)
        y = (x[:, 0] + 0.5 * x[:, 1] + 0.5 * g + 0.5 * rng.normal(size=n) > 0.3).astype(np.int32)
        return data.make_split(x, y, g)

    return data.Dataset("adult", split(600), split(200), split(300), 2, 2, ("<=50K", ">50K"),
                        ("Female", "Male"))


# run in the killed child (conftest's killed_driver) before the driver's main
PATCH = {"train_baselines": "import test_resume_drivers as t\n"
                            "common.load_dataset = lambda name, **kw: t.small_adult(**kw)",
         "influence_validity": "import test_resume_drivers as t; mod.load_adult = t.small_adult"}


def strip(o):
    """``o`` without wall times (they differ between runs), JSON-normalised."""
    o = json.loads(json.dumps(common._jsonable(o)))
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def test_a_killed_train_baselines_run_resumes(tmp_path, monkeypatch, killed_driver):
    monkeypatch.setattr(common, "load_dataset", lambda name, **kw: small_adult(**kw))
    recipe = "{'dataset': 'adult', 'model': 'lr', 'lr': %s, 'epochs': 2, 'batch_size': 128, 'l2': 1e-05}"
    argv = ["--preset", "quick", "--set", f"recipes={{'a': {recipe % 0.01}, 'b': {recipe % 0.02}}}"]
    part = str(tmp_path / "part")
    partial = killed_driver("train_baselines", argv + ["--out", part, "--no-progress"],
                            patch=PATCH["train_baselines"])
    assert [r["model"] for r in partial["rows"]] == ["a"]
    resumed = train_baselines.main(argv + ["--out", part, "--no-progress"])
    assert resumed["rows"][0] == partial["rows"][0]  # the finished model: history, timings kept
    full = train_baselines.main(argv + ["--out", str(tmp_path / "full"), "--no-progress"])
    assert [r["model"] for r in full["rows"]] == ["a", "b"]
    assert strip(resumed["rows"]) == strip(full["rows"])

    # Killed after b's training finished but before its row was written: its checkpoints hold the
    # whole history, so the rerun only evaluates it, and reports the time of all its epochs.
    saved = json.load(open(os.path.join(part, "results.json")))
    common.write_json(os.path.join(part, "results.json"),
                      {"signature": saved["signature"], "rows": saved["rows"][:1]})
    again = train_baselines.main(argv + ["--out", part, "--no-progress"])
    b = resumed["rows"][1]
    assert again["rows"][1]["history"] == b["history"]
    assert again["rows"][1]["train_seconds"] == sum(h["seconds"] for h in b["history"])


def test_a_killed_influence_validity_run_resumes(tmp_path, monkeypatch, killed_driver):
    monkeypatch.setattr(influence_validity, "load_adult", small_adult)
    argv = ["--preset", "quick", "--set", "num_points=3", "--set", "nn_epochs=1", "--set",
            "nn_hidden=8,", "--set", "batch_size=128"]
    part = str(tmp_path / "part")
    partial = killed_driver("influence_validity", argv + ["--out", part, "--no-progress"],
                            patch=PATCH["influence_validity"])
    assert [r["model"] for r in partial["rows"]] == ["LR"]
    resumed = influence_validity.main(argv + ["--out", part, "--no-progress"])
    assert resumed["rows"][0] == partial["rows"][0]  # LR kept as written, timings included
    assert [r["model"] for r in resumed["rows"]] == ["LR", "NN"]
    for f in ("report.md", "figure3.png"):
        assert os.path.getsize(os.path.join(part, f)) > 0
    monkeypatch.setattr(influence_validity, "plot", lambda results, out: None)  # drawn above
    full = influence_validity.main(argv + ["--out", str(tmp_path / "full"), "--no-progress"])
    assert strip(resumed["rows"]) == strip(full["rows"])
