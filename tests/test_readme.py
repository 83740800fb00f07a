"""The README's self-contained Python examples run as written (those that load their own data)."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "data.load_adult()" in b]


def test_the_examples_are_found():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("block", BLOCKS, ids=["train", "soft_weights"])
def test_readme_example_runs(block, capsys):
    scope = {}
    exec(compile(block, str(README), "exec"), scope)
    out = capsys.readouterr().out
    if "soft_weights" in block:
        dp = float(re.search(r"test \|DP\| ([0-9.]+)", out).group(1))
        assert dp < 0.1 < scope["res"].values["dp"]  # the soft-weighted run more than halves |DP|
        # predicted change of the DP surrogate, -eps . scores, is -|f0| (the minimum-norm variant)
        predicted = -float(np.asarray(scope["eps"]) @ np.asarray(scope["res"].scores["dp"]))
        assert np.isclose(predicted, -abs(scope["res"].values["dp"]), rtol=1e-3)
    else:
        assert "accuracy" in out
