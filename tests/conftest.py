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
