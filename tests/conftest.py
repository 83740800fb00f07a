"""Test setup: 8 simulated CPU devices (for the sharding tests) before JAX is first imported."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


# ----------------------------------------------------------------------------- tiny TFDS data

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
    """A TFDS data_dir with tiny CIFAR-10- and CelebA-shaped array_record datasets (tfds_fixtures)."""
    from tfds_fixtures import write_tiny_tfds

    return write_tiny_tfds(tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------- kill and resume

@pytest.fixture
def killed_driver():
    """``run(driver, argv, after)``: ``python -m experiments.<driver> argv`` in a subprocess that
    dies like ``kill -9`` right after writing its ``after``-th results.json
    (``JAXUNLEARN_KILL_AFTER_RESULTS``, :func:`experiments.common.write_json`)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(driver: str, argv: list, after: int = 1) -> None:
        env = dict(os.environ, JAXUNLEARN_KILL_AFTER_RESULTS=str(after))
        r = subprocess.run([sys.executable, "-m", f"experiments.{driver}", *argv], cwd=root,
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 137, r.stderr[-3000:]

    return run
