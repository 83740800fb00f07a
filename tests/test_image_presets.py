"""The image presets of the three studies, end to end through the streaming path on a device mesh.

Each preset's own config (TFDS dataset, loader, architecture, ``input="stream"``) runs through its
driver's ``main`` with ``--mesh all`` (the 8 simulated CPU devices of conftest.py) on the tiny
TFDS array_record fixtures of ``tfds_fixtures.py``: the images are read batch by batch with grain
(:func:`jaxunlearn.data.streaming.streamed_split`) by ``loop.run`` (training, unlearning) and
the evaluator (features, accuracies, MIA, fairness-gap statistics). Only sizes are cut down
(width, depth, epochs, image size, methods), with ``--set`` for flat configs and a config file
that imports the preset's own for nested ones.

The tests draw keys with the ``rbg`` PRNG: XLA's CPU compiler spends ~36 s on the threefry
initialisers of a ResNet's ``init`` and ~5 s with rbg (measured, BUILD_NOTES); the code paths under
test do not depend on the PRNG.
"""

import json
import math
import textwrap

import pytest

from experiments import common

pytest.importorskip("grain")
pytest.importorskip("tensorflow_datasets")


@pytest.fixture(autouse=True)
def streamed_batches(monkeypatch):
    """Counts the batches read through the streaming path (grain), by set size."""
    from jaxunlearn.data.streaming import StreamingSource

    calls, real = [], StreamingSource.batches

    def spy(self, index, weight, **kw):
        calls.append(len(self))
        return real(self, index, weight, **kw)

    monkeypatch.setattr(StreamingSource, "batches", spy)
    return calls


@pytest.fixture(autouse=True)
def _rbg_keys_and_no_mesh_left_behind(rbg_keys):
    try:
        yield
    finally:
        common.MESH = None


def _finite_numbers(obj, path="") -> int:
    """Count the numbers in a JSON tree, asserting each is finite (NaN is written as null)."""
    if isinstance(obj, dict):
        return sum(_finite_numbers(v, f"{path}.{k}") for k, v in obj.items())
    if isinstance(obj, list):
        return sum(_finite_numbers(v, f"{path}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return 0
    assert math.isfinite(obj), path
    return 1


def _check_outputs(out, streamed, *keys):
    assert common.MESH is not None and common.MESH.size == 8  # --mesh all
    assert streamed, "no batch was read through the streaming path"
    res = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().strip()
    for k in keys:
        assert _finite_numbers(res["rows"] if k == "rows" else res[k]) > 0, k
    return res


def _config_file(tmp_path, driver, preset, body):
    """A config file that loads ``preset``'s own config and shrinks it with ``body``."""
    path = tmp_path / f"{driver}_tiny_{preset}.py"
    path.write_text(textwrap.dedent(f"""
        from experiments import common
        from experiments.configs import {driver}_{preset} as preset


        def get_config():
            cfg = preset.get_config()
    """) + textwrap.indent(textwrap.dedent(body), "    ") + "    return cfg\n")
    return str(path)


MESH = ["--mesh", "all", "--no-progress", "--fresh"]


# One preset per study runs here (ResNet-18 and ViT, CelebA and CIFAR-10, every driver's streaming
# path and MIU's streamed tuning set): a ResNet preset costs about a minute of CPU even this small
# (mostly XLA compiling the model), and the suite's CI budget is spent. The other image presets,
# soft_weighted cifar100-resnet50 and fairness_gap quick_cifar10 / cifar10_resnet50, take the same
# code paths with another loader or architecture; add them to these lists to run them (each ran
# once this way; BUILD_NOTES has the record).
@pytest.mark.parametrize("preset, extra", [
    ("celeba-resnet18", ["tasks=dp", "image_size=8"]),
])
def test_soft_weighted_presets_stream(tmp_path, tiny_tfds_dir, streamed_batches, preset, extra):
    from experiments import soft_weighted as sw

    assert sw.preset(preset).input == "stream"
    sets = ["seeds=1", "nn_epochs=1", "unlearn_epochs=1", "batch_size=16", "algorithms=IF",
            "hard_fractions=0.1", "backbone_width=2", *extra]
    out = tmp_path / "out"
    sw.main(["--preset", preset, "--data-dir", tiny_tfds_dir, "--out", str(out), *MESH,
             *[a for s in sets for a in ("--set", s)]])
    res = _check_outputs(out, streamed_batches, "rows")
    runs = [r for r in res["rows"] if r["scheme"] in (sw.PAPER_HARD, sw.PAPER_SOFT)]
    assert {r["algorithm"] for r in runs} == {"IF"} and len(runs) == 2


FAIRNESS_GAP_TINY = """
cfg.update(methods=("GA",), penalty_methods=(), unlearn_epochs=1, unlearn_batch_size=16,
           pgd_steps=1, eval_batch_size=16, memory_analysis=MEMORY)
tiny = dict(resnet18=dict(width=2), resnet50=dict(width=2),
            vit=dict(depth=1, width=16, heads=2, mlp_dim=32))
cfg["recipes"] = {name: dict(r, **tiny[name], last_k=1,
                             train=dict(r["train"], epochs=1, batch_size=16))
                  for name, r in cfg["recipes"].items() if name in MODELS}
"""


@pytest.mark.parametrize("preset, models, memory", [
    ("cifar10_vit", ("vit",), ("GA",)),
])
def test_fairness_gap_presets_stream(tmp_path, tiny_tfds_dir, streamed_batches, preset, models,
                                     memory):
    from experiments import fairness_gap as fg

    body = f"MODELS, MEMORY = {models!r}, {memory!r}\n" + FAIRNESS_GAP_TINY
    config = _config_file(tmp_path, "fairness_gap", preset, body)
    assert common.load_config(config, fg.Config).input == "stream"
    out = tmp_path / "out"
    fg.main(["--config", config, "--data-dir", tiny_tfds_dir, "--out", str(out), *MESH])
    res = _check_outputs(out, streamed_batches, "rows")
    assert [(r["model"], r["method"], r["scope"]) for r in res["rows"]] == [
        (models[0], "Original", "full"), (models[0], "GA", "full"), (models[0], "GA", "last1")]
    for r in res["rows"]:
        for k in ("forget_acc", "retain_acc", "test_acc", "mia", "gap_mean", "fgsm_acc", "pgd_acc"):
            assert math.isfinite(r[k]), (r["method"], k)
    if memory:
        assert res["rows"][1]["step_total_bytes"] > 0


def test_group_robust_celeba_streams(tmp_path, tiny_tfds_dir, streamed_batches):
    from experiments import group_robust as gr

    config = _config_file(tmp_path, "group_robust", "celeba", """
        (d,) = cfg["datasets"]
        d = dict(d, size=8, model=dict(d["model"], width=2),
                 train=dict(d["train"], epochs=1, batch_size=16), unlearn=dict(epochs=1, batch_size=16),
                 miu=dict(d["miu"], forget_epochs=1, tune_steps_first=2, tune_steps_epoch=1,
                          mine_hidden=8, tune_subset=32))
        cfg.update(datasets=(d,), ratios=(0.5,), methods=("rw_retrain", "miu"))
    """)
    assert common.load_config(config, gr.Config).datasets[0]["input"] == "stream"
    out = tmp_path / "out"
    gr.main(["--config", config, "--data-dir", tiny_tfds_dir, "--out", str(out), *MESH,
             "--no-compile-cache"])
    res = _check_outputs(out, streamed_batches, "rows")
    (cell,) = res["rows"]
    assert set(cell["rows"]) >= {"rw_retrain", "miu"}
    for name in ("rw_retrain", "miu"):
        row = cell["rows"][name]
        assert "error" not in row, row
        for k in ("test_accuracy", "forget_accuracy", "worst_group_accuracy"):
            assert math.isfinite(row[k]), (name, k)
