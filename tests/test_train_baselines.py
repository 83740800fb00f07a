"""experiments.train_baselines end to end on a tiny config: results, report and the plot."""

import json
import os

from experiments import train_baselines

CONFIG = '''
def get_config():
    return dict(recipes={
        "adult_lr": dict(dataset="adult", model="lr", lr=1e-2, epochs=2, batch_size=1024, l2=1e-5),
        "adult_mlp": dict(dataset="adult", model="mlp", hidden=(8,), lr=1e-2, epochs=2,
                          batch_size=1024, l2=1e-5),
    })
'''


def test_train_baselines_writes_report_and_png(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    res = train_baselines.main(["--config", str(cfg), "--out", str(out), "--no-progress"])
    assert [r["model"] for r in res["rows"]] == ["adult_lr", "adult_mlp"]
    for r in res["rows"]:
        assert 0.75 < r["test_accuracy"] <= 1.0 and len(r["history"]) == 2
    png = out / "baselines.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    assert "](baselines.png)" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["rows"][1]["model"] == "adult_mlp"
