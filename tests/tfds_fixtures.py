"""Tiny CIFAR-10/100- and CelebA-shaped TFDS datasets written offline with TFDS's own builder.

The builders subclass ``tfds.core.GeneratorBasedBuilder`` under the registered names ``cifar10``,
``cifar100`` (version 3.0.2) and ``celeb_a`` (2.1.0) with the official features (CIFAR: ``id``,
32x32x3 PNG ``image``, ``label``, CIFAR-100 also ``coarse_label``; CelebA: 218x178x3 JPEG
``image``, 10 ``landmarks``, 40 boolean ``attributes``, ``identity``) and write array_record files, so ``tfds.data_source(name,
data_dir=DIR)`` and the loaders of :mod:`jaxunlearn.data.tfds_loaders` read them as if the real
data had been prepared there. No TensorFlow and no download: images are passed to TFDS as PIL
images, which TFDS encodes with Pillow.

Images carry a learnable signal: a CIFAR image is noise around a class-dependent colour; a CelebA
image is brighter in its top third when ``Blond_Hair`` is set and bluer when ``Male`` is set
(``Male`` is drawn negatively correlated with ``Blond_Hair``, as in CelebA).

Usable from the command line too (e.g. to smoke-run the paper-scale presets)::

    python tests/tfds_fixtures.py DIR   # writes DIR/cifar10/3.0.2, DIR/cifar100/3.0.2, DIR/celeb_a/2.1.0
"""

from __future__ import annotations

import os
import sys

import numpy as np

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")
CELEB_A_SHAPE = (218, 178, 3)


def _tfds():
    import tensorflow_datasets as tfds  # lazy: importing TFDS takes seconds
    return tfds


def _prepare(builder_cls, data_dir) -> str:
    tfds = _tfds()
    builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return os.fspath(data_dir)


def write_tiny_cifar10(data_dir, *, num_train: int = 96, num_test: int = 48, seed: int = 0) -> str:
    """Write a CIFAR-10-shaped dataset (splits ``train``, ``test``) into ``data_dir``.

    Returns:
      ``data_dir`` (as a string), to pass to ``tfds.data_source(..., data_dir=)``.
    """
    tfds = _tfds()
    from PIL import Image

    class TinyCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar10"
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(names=CIFAR10_LABELS),
                }),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", num_train, 0),
                    "test": self._generate_examples("test", num_test, 1)}

        def _generate_examples(self, split, n, part):
            rng = np.random.default_rng((seed, part))
            colours = np.random.default_rng(seed).uniform(40, 215, (10, 3))
            for i in range(n):
                label = int(rng.integers(10))
                img = colours[label] + rng.normal(0, 30, (32, 32, 3))
                yield f"{split}_{i}", {
                    "id": f"{split}_{i:05d}",
                    "image": Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)),
                    "label": label,
                }

    return _prepare(TinyCifar10, data_dir)


def write_tiny_cifar100(data_dir, *, num_train: int = 96, num_test: int = 48,
                        seed: int = 0) -> str:
    """Write a CIFAR-100-shaped dataset (100 ``label`` s, 20 ``coarse_label`` s, ``fine // 5``)."""
    tfds = _tfds()
    from PIL import Image

    class TinyCifar100(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar100"
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=100),
                    "coarse_label": tfds.features.ClassLabel(num_classes=20),
                }),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", num_train, 0),
                    "test": self._generate_examples("test", num_test, 1)}

        def _generate_examples(self, split, n, part):
            rng = np.random.default_rng((seed, 100 + part))
            colours = np.random.default_rng((seed, 100)).uniform(40, 215, (100, 3))
            for i in range(n):
                label = int(rng.integers(100))
                img = colours[label] + rng.normal(0, 30, (32, 32, 3))
                yield f"{split}_{i}", {
                    "id": f"{split}_{i:05d}",
                    "image": Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)),
                    "label": label,
                    "coarse_label": label // 5,
                }

    return _prepare(TinyCifar100, data_dir)


def write_tiny_celeb_a(data_dir, *, num_train: int = 64, num_validation: int = 32,
                       num_test: int = 32, shape: tuple[int, int, int] = CELEB_A_SHAPE,
                       seed: int = 0) -> str:
    """Write a CelebA-shaped dataset (splits ``train``, ``validation``, ``test``) into ``data_dir``.

    Args:
      shape: image shape (default CelebA's aligned 218x178x3; a smaller one makes faster tests).

    Returns:
      ``data_dir`` (as a string).
    """
    tfds = _tfds()
    from PIL import Image
    from tensorflow_datasets.datasets.celeb_a.celeb_a_dataset_builder import (
        ATTR_HEADINGS, IDENTITY_HEADINGS, LANDMARK_HEADINGS)

    h, w, _ = shape

    class TinyCelebA(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "celeb_a"
        VERSION = tfds.core.Version("2.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=tuple(shape), encoding_format="jpeg"),
                    "landmarks": {k: np.int64 for k in LANDMARK_HEADINGS},
                    "attributes": {k: np.bool_ for k in ATTR_HEADINGS},
                    "identity": {k: np.int64 for k in IDENTITY_HEADINGS},
                }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", num_train, 0),
                    "validation": self._generate_examples("validation", num_validation, 1),
                    "test": self._generate_examples("test", num_test, 2)}

        def _generate_examples(self, split, n, part):
            rng = np.random.default_rng((seed, part))
            for i in range(n):
                attrs = {k: bool(rng.random() < 0.3) for k in ATTR_HEADINGS}
                blond = bool(rng.random() < 0.4)
                male = bool(rng.random() < (0.2 if blond else 0.6))
                attrs["Blond_Hair"], attrs["Male"] = blond, male
                img = rng.normal(110, 25, (h, w, 3))
                img[: h // 3] += 70 if blond else 0
                img[..., 2] += 40 if male else 0
                yield f"{split}_{i}", {
                    "image": Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)),
                    "landmarks": {k: int(rng.integers(0, min(h, w))) for k in LANDMARK_HEADINGS},
                    "attributes": attrs,
                    "identity": {k: int(rng.integers(1, 10_000)) for k in IDENTITY_HEADINGS},
                }

    return _prepare(TinyCelebA, data_dir)


def write_tiny_tfds(data_dir, *, seed: int = 0, celeb_a_shape=CELEB_A_SHAPE) -> str:
    """All tiny datasets (cifar10, cifar100, celeb_a), default sizes, into one TFDS ``data_dir``."""
    write_tiny_cifar10(data_dir, seed=seed)
    write_tiny_cifar100(data_dir, seed=seed)
    write_tiny_celeb_a(data_dir, seed=seed, shape=celeb_a_shape)
    return os.fspath(data_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tfds_fixtures.py DATA_DIR")
    print(write_tiny_tfds(sys.argv[1]))
