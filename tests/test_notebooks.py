"""The notebooks under notebooks/ run top to bottom (small sizes) in a Jupyter kernel.

Each notebook is executed with nbclient in a ``python3`` kernel started from this interpreter,
with ``JAXUNLEARN_NOTEBOOK_SMOKE=1`` (the notebooks read it to pick small sizes) and the repository
root first on ``PYTHONPATH``, so that the kernel imports this checkout of jaxunlearn. A cell that
raises fails the test. The committed files are checked too: Colab badge, guarded install cell,
no stored outputs.
"""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/jaxunlearn/jaxunlearn/blob/main/notebooks/"
PROBE = "import sys, jaxunlearn\nprint(repr((sys.executable, jaxunlearn.__file__)))"


def test_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_influence_on_your_model.ipynb",
                                           "02_soft_weighted_unlearning_adult.ipynb",
                                           "03_fairness_gap_and_robustness.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_form(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert f"]({COLAB}{path.name})" in nb.cells[0].source  # the "Open in Colab" badge
    install = next(c for c in nb.cells if c.cell_type == "code").source
    assert 'if "google.colab" in sys.modules:' in install
    assert "jaxunlearn[" in install and "@ git+https://github.com/jaxunlearn/jaxunlearn" in install
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    monkeypatch.setenv("JAXUNLEARN_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # the kernel is one process on the host's devices, not the tests' 8 simulated ones
    flags = os.environ.get("XLA_FLAGS", "").split()
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in flags
                                             if "xla_force_host_platform_device_count" not in f))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    probe = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    executable, module = eval(probe)  # noqa: S307  (our own repr)
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert pathlib.Path(module).resolve().is_relative_to(ROOT / "jaxunlearn")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no plot"
    assert any(o.output_type == "stream" and "smoke" in o.text for o in outputs), \
        "the notebook did not pick up JAXUNLEARN_NOTEBOOK_SMOKE"
