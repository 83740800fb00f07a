"""TFDS-backed loaders: CIFAR-10/100, CelebA and Civil Comments, without TensorFlow.

Records come from ``tfds.data_source(name, split=..., data_dir=...)`` (random access to a copy
prepared in the array_record format, e.g. ``tfds build cifar10 --file_format=array_record``) and
are read into memory in chunks of ``chunk_size`` records with a progress bar. ``max_examples``
keeps a seeded random subset of at most that many records per split (CPU-scale runs).

Validation protocols (argument ``validation``):

* ``"official"``: TFDS's ``validation`` split (CelebA, Civil Comments have one; CIFAR has not).
* ``"half_test"``: the official ``test`` split cut 50/50 at random (``seed``) into ``val`` and
  ``test`` (Chhabra et al. / seed 004's protocol).

``index`` is the record's position in the TFDS split it was read from (``train`` for train, the
official validation or test split for val/test).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from jaxunlearn.data.dataset import DataError, Dataset, MissingDataError, make_split
from jaxunlearn.data.images import resize_image
from jaxunlearn.progress import progress_bar
from jaxunlearn.data.splits import split_rows, subsample_rows

__all__ = [
    "load_cifar10",
    "load_cifar100",
    "load_celeb_a",
    "load_civil_comments",
    "hash_text_features",
    "ImageRecord",
    "cifar_record",
    "celeb_a_record",
    "CIVIL_COMMENTS_IDENTITIES",
]

CIVIL_COMMENTS_IDENTITIES = (
    "male", "female", "transgender", "other_gender", "heterosexual", "homosexual_gay_or_lesbian",
    "bisexual", "other_sexual_orientation", "christian", "jewish", "muslim", "hindu", "buddhist",
    "atheist", "other_religion", "black", "white", "asian", "latino", "other_race_or_ethnicity",
    "physical_disability", "intellectual_or_learning_disability", "psychiatric_or_mental_illness",
    "other_disability",
)


# ----------------------------------------------------------------------------- reading

def _tfds():
    """``tensorflow_datasets``, imported on first use: it is an optional extra, and slow to import."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("TFDS-backed datasets need tensorflow-datasets: pip install "
                          "'jaxunlearn[tfds]'") from e
    return tfds


def _open(name: str, split: str, data_dir, download: bool):
    """``tfds.data_source`` with a clear error when the prepared data is not there."""
    tfds = _tfds()

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:  # TFDS raises several unrelated types for "not prepared here"
        where = data_dir if data_dir is not None else "the default TFDS data_dir"
        raise MissingDataError(
            f"{name}: cannot open split {split!r} in {where}: {type(e).__name__}: {e}\n"
            f"tfds.data_source needs the dataset prepared in the array_record format there, e.g. "
            f"`tfds build {name.split('/')[0]} --file_format=array_record --data_dir=DIR`, or "
            f"pass download=True.") from e


def _records(source, rows: np.ndarray) -> list:
    keys = [int(r) for r in rows]
    try:
        return source.__getitems__(keys)  # batched (parallel) array_record reads
    except TypeError:
        # tfds.testing.mock_data installs an unbound __getitems__ (TFDS 4.9.10); read one by one.
        return [source[k] for k in keys]


def _read(source, rows: np.ndarray, convert: Callable[[dict], tuple[Any, int, int]], *,
          chunk_size: int, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert records ``rows`` of ``source`` into ``(x [n, ...] float32, y [n], group [n])``."""
    if chunk_size < 1:
        raise DataError(f"chunk_size must be positive, got {chunk_size}")
    n = rows.size
    if n == 0:
        raise DataError(f"{desc}: no records to read")
    x = None
    y = np.empty(n, np.int64)
    g = np.empty(n, np.int64)
    starts = range(0, n, chunk_size)
    for s in progress_bar(starts, total=len(starts), desc=desc, enabled=progress):
        for j, ex in enumerate(_records(source, rows[s:s + chunk_size])):
            xi, y[s + j], g[s + j] = convert(ex)
            if x is None:
                x = np.empty((n, *np.shape(xi)), np.float32)
            x[s + j] = xi
    return x, y, g


def _plan(name: str, *, validation: str, has_official_val: bool, data_dir, download: bool,
          max_examples: int | None, seed: int) -> dict[str, tuple[Any, np.ndarray]]:
    """``{split: (source, record rows)}`` for train/val/test under a validation protocol."""
    if validation not in ("official", "half_test"):
        raise DataError(f"{name}: validation must be 'official' or 'half_test', got {validation!r}")
    if validation == "official" and not has_official_val:
        raise DataError(f"{name} has no official validation split; use validation='half_test'")
    train = _open(name, "train", data_dir, download)
    test = _open(name, "test", data_dir, download)
    if validation == "official":
        val = _open(name, "validation", data_dir, download)
        plan = {"train": (train, np.arange(len(train))), "val": (val, np.arange(len(val))),
                "test": (test, np.arange(len(test)))}
    else:
        val_rows, test_rows = split_rows(len(test), (0.5, 0.5), key=seed)
        plan = {"train": (train, np.arange(len(train))), "val": (test, val_rows),
                "test": (test, test_rows)}
    return {s: (src, rows[subsample_rows(rows.size, max_examples, key=(seed, j + 1))])
            for j, (s, (src, rows)) in enumerate(plan.items())}


def _streamed(name: str, source, rows: np.ndarray, convert, chunk_size: int) -> dict:
    """A streamed split (:func:`~jaxunlearn.data.streaming.streamed_split`) of ``rows`` of
    ``source``; labels read from the same records with the image left undecoded."""
    from jaxunlearn.data.streaming import StreamingSource, streamed_split

    tfds = _tfds()
    label_records = dataclasses.replace(source, decoders={"image": tfds.decode.SkipDecoding()})
    return streamed_split(StreamingSource(source, convert, rows=rows, label_records=label_records,
                                          name=f"{name}/{source.split}"), chunk_size=chunk_size)


def _build(name: str, plan, convert, *, chunk_size: int, progress: bool, stream: bool = False,
           **meta) -> Dataset:
    splits = {}
    for s, (source, rows) in plan.items():
        if stream:
            splits[s] = _streamed(name, source, rows, convert, chunk_size)
            continue
        x, y, g = _read(source, rows, convert, chunk_size=chunk_size, progress=progress,
                        desc=f"{name}/{s}")
        splits[s] = make_split(x, y, g, rows, name=f"{name}.{s}")
    return Dataset(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                   **meta)


def _label_names(source, key: str, num: int) -> tuple[str, ...]:
    try:
        names = tuple(source.dataset_info.features[key].names)
    except (AttributeError, KeyError, TypeError):
        names = ()
    return names if len(names) == num else tuple(str(i) for i in range(num))


# ----------------------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Converts one TFDS image record into a sample ``(x, y, group)`` (shared by the in-memory
    loaders and :mod:`jaxunlearn.data.streaming`).

    Attributes:
      image: ``uint8 [H, W, C] -> float32 [H', W', C]`` in [0, 1].
      labels: ``record -> (y, group)``; reads no image, so it also works on records whose image
        was left undecoded (``tfds.decode.SkipDecoding``).
    """

    image: Callable[[np.ndarray], np.ndarray]
    labels: Callable[[dict], tuple[int, int]]

    def __call__(self, ex: dict) -> tuple[np.ndarray, int, int]:
        return (self.image(np.asarray(ex["image"])), *self.labels(ex))


def _unit_float(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float32) / 255.0


def cifar_record(label_key: str = "label") -> ImageRecord:
    """CIFAR records: ``x`` = image / 255 (float32 [32, 32, 3]), ``y = record[label_key]``, group 0."""
    return ImageRecord(image=_unit_float, labels=lambda ex: (int(ex[label_key]), 0))


def celeb_a_record(target: str, sensitive: str, *, size: int,
                   crop_fraction: float | None = None) -> ImageRecord:
    """CelebA records: ``x`` = :func:`~jaxunlearn.data.images.resize_image` (size, crop_fraction),
    ``y = attributes[target]``, ``group = attributes[sensitive]`` (see :func:`load_celeb_a`)."""
    return ImageRecord(
        image=functools.partial(resize_image, size=size, crop_fraction=crop_fraction),
        labels=lambda ex: (int(ex["attributes"][target]), int(ex["attributes"][sensitive])))


# ----------------------------------------------------------------------------- CIFAR

def _cifar(name: str, label_key: str, num_classes: int, *, data_dir, validation, max_examples,
           seed, chunk_size, progress, download, stream) -> Dataset:
    plan = _plan(name, validation=validation, has_official_val=False, data_dir=data_dir,
                 download=download, max_examples=max_examples, seed=seed)

    return _build(name, plan, cifar_record(label_key), chunk_size=chunk_size, progress=progress,
                  stream=stream, num_classes=num_classes, num_groups=1,
                  class_names=_label_names(plan["train"][0], label_key, num_classes),
                  group_names=("all",),
                  info={"validation": validation, "max_examples": max_examples, "seed": seed,
                        "data_dir": None if data_dir is None else str(data_dir)})


def load_cifar10(*, data_dir=None, validation: str = "half_test", max_examples: int | None = None,
                 seed: int = 0, chunk_size: int = 1024, progress: bool = True,
                 download: bool = False, stream: bool = False) -> Dataset:
    """CIFAR-10 from TFDS: ``x`` [n, 32, 32, 3] float32 in [0, 1], ``y`` in 0..9, no groups.

    Args:
      data_dir: TFDS data directory (None: TFDS's default).
      validation: only ``"half_test"`` (CIFAR has no official validation split; module docstring).
      max_examples: at most this many records per split (seeded random subset).
      seed: seed of the test cut and the subsets.
      chunk_size: records read per batch.
      progress: show a progress bar.
      download: let TFDS download and prepare the data if it is missing.
      stream: return streamed splits (``x`` read from the array_record files batch by batch,
        :func:`~jaxunlearn.data.streaming.streamed_split`; labels in memory) instead of arrays.
    """
    return _cifar("cifar10", "label", 10, data_dir=data_dir, validation=validation,
                  max_examples=max_examples, seed=seed, chunk_size=chunk_size, progress=progress,
                  download=download, stream=stream)


def load_cifar100(*, data_dir=None, label: str = "fine", validation: str = "half_test",
                  max_examples: int | None = None, seed: int = 0, chunk_size: int = 1024,
                  progress: bool = True, download: bool = False, stream: bool = False) -> Dataset:
    """CIFAR-100 from TFDS: 100 fine labels (``label="fine"``) or 20 superclasses (``"coarse"``).

    Other arguments as :func:`load_cifar10`.
    """
    if label not in ("fine", "coarse"):
        raise DataError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    key, k = ("label", 100) if label == "fine" else ("coarse_label", 20)
    return _cifar("cifar100", key, k, data_dir=data_dir, validation=validation,
                  max_examples=max_examples, seed=seed, chunk_size=chunk_size, progress=progress,
                  download=download, stream=stream)


# ----------------------------------------------------------------------------- CelebA

def load_celeb_a(*, size: int, target: str = "Blond_Hair", sensitive: str = "Male",
                 crop_fraction: float | None = None, data_dir=None,
                 validation: str = "official", max_examples: int | None = None, seed: int = 0,
                 chunk_size: int = 1024, progress: bool = True,
                 download: bool = False, stream: bool = False) -> Dataset:
    """CelebA from TFDS with a binary target and a binary sensitive attribute chosen by name.

    ``y = attributes[target]``, ``group = attributes[sensitive]`` (1 = attribute present; De Min
    et al.: target Blond_Hair, sensitive Male). ``x``: [n, size, size, 3] float32 in [0, 1].

    Args:
      size: output image side (De Min et al. use 224; CPU runs want e.g. 32 or 64).
      target: one of the 40 CelebA attribute names.
      sensitive: another attribute name.
      crop_fraction: None squashes the 178x218 image to size x size (De Min et al.'s
        ``Resize((224, 224))``); e.g. 1.0 takes the centred 178x178 square first.
      data_dir, validation, max_examples, seed, chunk_size, progress, download, stream: as
        :func:`load_cifar10`; ``validation`` defaults to CelebA's official split.
    """
    plan = _plan("celeb_a", validation=validation, has_official_val=True, data_dir=data_dir,
                 download=download, max_examples=max_examples, seed=seed)
    attrs = list(plan["train"][0].dataset_info.features["attributes"].keys())
    for role, a in (("target", target), ("sensitive", sensitive)):
        if a not in attrs:
            raise DataError(f"celeb_a: unknown {role} attribute {a!r}; choose one of {attrs}")
    if target == sensitive:
        raise DataError(f"celeb_a: target and sensitive attribute are both {target!r}")

    return _build("celeb_a", plan, celeb_a_record(target, sensitive, size=size,
                                                  crop_fraction=crop_fraction), chunk_size=chunk_size, progress=progress,
                  stream=stream, num_classes=2, num_groups=2, class_names=(f"not {target}", target),
                  group_names=(f"not {sensitive}", sensitive),
                  info={"target": target, "sensitive": sensitive, "size": size,
                        "crop_fraction": crop_fraction, "validation": validation,
                        "max_examples": max_examples, "seed": seed})


# ----------------------------------------------------------------------------- Civil Comments

_TOKEN = re.compile(r"\w+")


def _hash_into(row: np.ndarray, text: str, ngrams: int) -> None:
    tokens = _TOKEN.findall(text.lower())
    d = row.shape[0]
    for n in range(1, ngrams + 1):
        for i in range(len(tokens) - n + 1):
            h = zlib.crc32(" ".join(tokens[i:i + n]).encode("utf-8"))
            row[h % d] += 1.0 if h < 0x80000000 else -1.0
    norm = np.linalg.norm(row)
    if norm > 0:
        row /= norm


def hash_text_features(texts: Sequence[str | bytes], *, num_features: int = 4096,
                       ngrams: int = 2) -> np.ndarray:
    """Signed hashing bag of n-grams, L2-normalised per text (no vocabulary, no TensorFlow).

    Tokens are the lower-cased ``\\w+`` runs; every n-gram for n = 1..``ngrams`` (joined by a
    space) is hashed with CRC32: bucket ``h mod num_features``, sign + if ``h < 2**31`` else -
    (the signed hashing trick, as scikit-learn's HashingVectorizer with alternate_sign=True, but
    with CRC32 instead of MurmurHash3). Each row is then divided by its L2 norm (empty texts give
    a zero row).

    Args:
      texts: n strings (bytes are decoded as UTF-8).
      num_features: output dimension.
      ngrams: largest n-gram length.

    Returns:
      float32 [n, num_features].
    """
    if num_features < 1 or ngrams < 1:
        raise DataError(f"num_features ({num_features}) and ngrams ({ngrams}) must be positive")
    out = np.zeros((len(texts), num_features), np.float64)
    for i, t in enumerate(texts):
        _hash_into(out[i], t.decode("utf-8") if isinstance(t, bytes) else str(t), ngrams)
    return out.astype(np.float32)


def load_civil_comments(*, identities: Sequence[str] = ("black",), threshold: float = 0.5,
                        num_features: int = 4096, ngrams: int = 2, data_dir=None,
                        validation: str = "official", max_examples: int | None = None,
                        seed: int = 0, chunk_size: int = 1024, progress: bool = True,
                        download: bool = False) -> Dataset:
    """Civil Comments (Jigsaw toxicity) from TFDS, featurised by :func:`hash_text_features`.

    ``y = 1`` if ``toxicity >= 0.5`` (the crowd-rated toxic fraction). ``group``: 0 if none of
    ``identities`` is mentioned, else ``k + 1`` for the first ``identities[k]`` whose identity
    score (fraction of raters saying the comment mentions it) is ``>= threshold``. With
    identities, the ``CivilCommentsIdentities`` config is read (the ~450k comments with identity
    labels); with ``identities=()`` the full ``CivilComments`` config with ``group = 0``.

    Memory: ``x`` is dense float32, ``4 * num_features`` bytes per comment; use ``max_examples``
    on small machines.

    Args:
      identities: identity columns (see :data:`CIVIL_COMMENTS_IDENTITIES`), in priority order.
      threshold: identity score needed to count as mentioned.
      num_features, ngrams: of the hashing featuriser.
      data_dir, validation, max_examples, seed, chunk_size, progress, download: as
        :func:`load_cifar10`; ``validation`` defaults to the official split.
    """
    identities = tuple(identities)
    unknown = sorted(set(identities) - set(CIVIL_COMMENTS_IDENTITIES))
    if unknown:
        raise DataError(f"civil_comments: unknown identities {unknown}; choose from "
                        f"{list(CIVIL_COMMENTS_IDENTITIES)}")
    if len(set(identities)) != len(identities):
        raise DataError(f"civil_comments: identities repeat: {list(identities)}")
    if num_features < 1 or ngrams < 1:
        raise DataError(f"num_features ({num_features}) and ngrams ({ngrams}) must be positive")
    _tfds()
    importlib.import_module("tensorflow_datasets.text.civil_comments")  # registers the builder
    config = "CivilCommentsIdentities" if identities else "CivilComments"
    plan = _plan(f"civil_comments/{config}", validation=validation, has_official_val=True,
                 data_dir=data_dir, download=download, max_examples=max_examples, seed=seed)

    def convert(ex):
        text = ex["text"]
        row = np.zeros(num_features, np.float64)
        _hash_into(row, text.decode("utf-8") if isinstance(text, bytes) else str(text), ngrams)
        group = 0
        for k, ident in enumerate(identities):
            if float(ex[ident]) >= threshold:
                group = k + 1
                break
        return row, int(float(ex["toxicity"]) >= 0.5), group

    return _build("civil_comments", plan, convert, chunk_size=chunk_size, progress=progress,
                  num_classes=2, num_groups=len(identities) + 1,
                  class_names=("non-toxic", "toxic"), group_names=("none", *identities),
                  info={"config": config, "identities": identities, "threshold": threshold,
                        "num_features": num_features, "ngrams": ngrams,
                        "validation": validation, "max_examples": max_examples, "seed": seed,
                        "featurizer": "signed CRC32 hashing of 1..ngrams-grams, L2-normalised"})
