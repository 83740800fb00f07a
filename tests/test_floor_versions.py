"""Dependency floors: pyproject's floors are the versions the floor-versions CI job pins, and the
core package imports without its optional extras (TFDS, Equinox, the experiment tools)."""

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("jax", "flax", "optax", "orbax-checkpoint", "numpy")


def _floors() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", d.replace(" ", ""))
        assert m, f"dependency {d!r} in pyproject.toml is not of the form name>=floor"
        out[m.group(1).lower()] = m.group(2)
    return out


def _pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".ci" / "floor-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_floors_equal_the_ci_pins():
    floors, pins = _floors(), _pins()
    for name in CORE:
        assert name in floors, f"{name} has no floor in pyproject.toml"
        assert pins.get(name) == floors[name], (
            f"{name}: pyproject floor {floors[name]} but .ci/floor-constraints.txt pins "
            f"{pins.get(name)}; keep them equal")
    assert pins["jaxlib"] == pins["jax"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["equinox"] == [f"equinox>={pins['equinox']}"], extras["equinox"]
    assert "tensorflow-datasets" not in floors, "TFDS must stay an optional extra ([tfds])"


@pytest.mark.skipif(os.environ.get("JAXUNLEARN_FLOOR_CI") != "1",
                    reason="only in the floor-versions CI job")
def test_running_on_the_floor_versions():
    for name, version in _pins().items():
        assert metadata.version(name) == version, f"{name} {metadata.version(name)} != {version}"


_BLOCKED = """
import sys
class Block:
    BLOCKED = ("tensorflow_datasets", "tensorflow", "equinox", "sklearn", "matplotlib")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import jaxunlearn, jaxunlearn.influence, jaxunlearn.methods, jaxunlearn.models, jaxunlearn.loop
import jaxunlearn.data, jaxunlearn.metrics, jaxunlearn.checkpoint, jaxunlearn.evaluation
assert not any(m.split(".")[0] in Block.BLOCKED for m in sys.modules), sorted(sys.modules)
from jaxunlearn.data import tfds_loaders
try:
    tfds_loaders._open("mnist", "train", None, False)
except ImportError as e:
    assert "jaxunlearn[tfds]" in str(e), e
else:
    raise AssertionError("no ImportError without tensorflow_datasets")
try:
    jaxunlearn.models.from_equinox(lambda key: None)
except ImportError as e:
    assert "jaxunlearn[equinox]" in str(e), e
else:
    raise AssertionError("no ImportError without equinox")
print("ok")
"""


def test_core_imports_without_optional_extras():
    """jax, flax, optax, orbax and numpy suffice for the library; extras fail with a remedy."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
