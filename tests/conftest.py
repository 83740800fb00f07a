"""Test setup: 8 simulated CPU devices (for the sharding tests) before JAX is first imported."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402


@pytest.fixture
def rbg_keys():
    """Keys of the ``rbg`` PRNG in this test: XLA:CPU compiles the threefry initialisers of a
    ResNet's or ViT's ``init`` (and every other random draw) several times slower (~36 s against
    ~5 s for a ResNet, BUILD_NOTES). Only for tests whose checks do not depend on the PRNG."""
    impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", impl)


# ----------------------------------------------------------------------------- tiny TFDS data

@pytest.fixture(scope="session", autouse=True)
def _session_tempdir(tmp_path_factory):
    """Every ``tempfile`` directory of the session under pytest's basetemp, removed at the end:
    TFDS leaves an empty ``/tmp/tmp*tfds`` per builder of a not yet prepared dataset
    (``DatasetInfo.initialize_from_bucket``: tfds_fixtures' writers, ``tfds.testing.mock_data``)."""
    import shutil
    import tempfile

    old, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tempfile"))
    try:
        yield
    finally:
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)
        tempfile.tempdir = old


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
    """A TFDS data_dir with tiny CIFAR-10- and CelebA-shaped array_record datasets (tfds_fixtures)."""
    from tfds_fixtures import write_tiny_tfds

    return write_tiny_tfds(tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------- kill and resume

@pytest.fixture
def killed_driver():
    """``run(driver, argv, after=1, patch="")``: ``experiments.<driver>.main(argv)`` in a subprocess
    that dies like ``kill -9`` right after writing its ``after``-th results.json
    (``JAXUNLEARN_KILL_AFTER_RESULTS``, :func:`experiments.common.write_json`); returns that file
    (when ``argv`` has ``--out``).

    ``patch``: Python statements the child runs before ``main``, with ``mod`` (the driver module)
    and ``common`` (:mod:`experiments.common`) imported and tests/ importable, e.g. to swap in a
    small dataset: ``"import test_resume_drivers as t; mod.load_adult = t.small_adult"``.
    """
    import json
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))

    def run(driver: str, argv: list, after: int = 1, patch: str = ""):
        code = (f"import sys; sys.path.insert(0, {tests!r}); "
                f"from experiments import common, {driver} as mod\n{patch}\nmod.main({list(argv)!r})")
        env = dict(os.environ, JAXUNLEARN_KILL_AFTER_RESULTS=str(after),
                   JAX_DEFAULT_PRNG_IMPL=jax.config.jax_default_prng_impl)  # the test's PRNG
        r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(tests), env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 137, r.stderr[-3000:]
        if "--out" in argv:
            with open(os.path.join(argv[list(argv).index("--out") + 1], "results.json")) as f:
                return json.load(f)

    return run
