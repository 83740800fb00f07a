"""The data contract: splits as dicts of arrays, the :class:`Dataset` record, checks and errors.

A *split* is a dict of numpy arrays with the same first dimension ``n``::

    {"x": [n, ...] float32, "y": [n] int32, "group": [n] int32, "index": [n] int32}

* ``x``: features (tabular rows, images [n, H, W, C] in [0, 1], hashed text features).
* ``y``: class labels in ``[0, num_classes)``; binary tasks use 1 for the positive outcome.
* ``group``: the sensitive attribute in ``[0, num_groups)``. Always present: a dataset without a
  sensitive attribute has ``group = 0`` everywhere and ``num_groups = 1`` (so ``np.bincount`` and
  group metrics never see a sentinel value).
* ``index``: the sample's position in the source split it was read from. For ``train`` this is the
  position in the full training set (equal to the row number unless the loader subsampled it, e.g.
  with ``max_examples``); for ``val``/``test`` it is the position in the official split they were
  cut from (each loader documents which). Row numbers, not ``index`` values, are what forget-set
  builders and weight vectors refer to.

Every loader returns a :class:`Dataset`, which validates its three splits on construction.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "DataError",
    "ChecksumError",
    "MissingDataError",
    "Dataset",
    "SPLIT_KEYS",
    "make_split",
    "validate_split",
    "split_len",
    "sha256_hex",
    "verify_sha256",
    "require_files",
]

SPLIT_KEYS = ("x", "y", "group", "index")
_FINITE_CHUNK = 4096


class DataError(ValueError):
    """Bad data or bad arguments to a data function (labels out of range, NaN features, ...)."""


class ChecksumError(DataError):
    """A data file's SHA256 differs from the published one (corrupt or modified copy)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data directory or file is missing; the message names what is expected where."""


def split_len(split: Mapping[str, Any]) -> int:
    """Number of samples in a split."""
    return int(np.shape(split["y"])[0])


def make_split(x, y, group=None, index=None, *, name: str = "split") -> dict:
    """Build a contract-conforming split, casting dtypes (float32 x, int32 y/group/index).

    Args:
      x: [n, ...] features.
      y: [n] integer labels (float arrays must hold whole numbers).
      group: [n] sensitive attribute; None gives zeros (a dataset without groups).
      index: [n] positions in the source split; None gives ``arange(n)``.
      name: used in error messages.

    Returns:
      The split dict (validated for dtypes, shapes, finiteness; ranges are checked by
      :class:`Dataset` or :func:`validate_split` with ``num_classes``/``num_groups``).
    """
    x = np.asarray(x)
    n = x.shape[0] if x.ndim else 0
    split = {
        "x": np.asarray(x, np.float32),
        "y": _as_int32(y, f"{name}.y"),
        "group": np.zeros(n, np.int32) if group is None else _as_int32(group, f"{name}.group"),
        "index": (np.arange(n, dtype=np.int32) if index is None
                  else _as_int32(index, f"{name}.index")),
    }
    validate_split(split, name=name)
    return split


def _as_int32(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.int32)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{what}: expected integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise DataError(f"{what} contains NaN or inf")
        if not np.all(a == np.round(a)):
            raise DataError(f"{what} holds non-integer values")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise DataError(f"{what} does not fit in int32")
    return a.astype(np.int32)


def validate_split(split: Mapping[str, Any], *, num_classes: int | None = None,
                   num_groups: int | None = None, name: str = "split") -> None:
    """Check a split against the contract; raise :class:`DataError` naming the first problem.

    Checks: the four keys; dtypes (float32 x, int32 y/group/index); 1-D y/group/index of the
    same length as x; at least one sample; finite x; ``0 <= y < num_classes``;
    ``0 <= group < num_groups``; non-negative, unique ``index``.
    """
    missing = [k for k in SPLIT_KEYS if k not in split]
    if missing:
        raise DataError(f"{name}: missing keys {missing}; a split needs {list(SPLIT_KEYS)}")
    from jaxunlearn.data.streaming import SourceArray  # lazy: streaming imports this module

    x = split["x"]
    streamed = isinstance(x, SourceArray)  # inputs on disk: checked batch by batch when read
    if not streamed and (not isinstance(x, np.ndarray) or x.dtype != np.float32):
        raise DataError(f"{name}.x must be a float32 numpy array, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{name}: empty split (x has shape {x.shape})")
    n = x.shape[0]
    for key in ("y", "group", "index"):
        a = split[key]
        if not isinstance(a, np.ndarray) or a.dtype != np.int32:
            raise DataError(f"{name}.{key} must be an int32 numpy array, got "
                            f"{type(a).__name__} {getattr(a, 'dtype', '')}")
        if a.shape != (n,):
            raise DataError(f"{name}.{key} has shape {a.shape}, expected ({n},) to match x "
                            f"{x.shape}")
    bad = 0
    flat = None if streamed else x.reshape(n, -1)
    for s in range(0, 0 if streamed else n, _FINITE_CHUNK):  # chunked: no full-size temporary
        block = flat[s:s + _FINITE_CHUNK]
        bad += block.shape[0] - int(np.isfinite(block).all(axis=1).sum())
    if bad:
        raise DataError(f"{name}.x contains NaN or inf ({bad} of {n} samples affected)")
    _check_range(split["y"], num_classes, f"{name}.y", "num_classes")
    _check_range(split["group"], num_groups, f"{name}.group", "num_groups")
    index = split["index"]
    if index.min() < 0:
        raise DataError(f"{name}.index has negative entries")
    if np.unique(index).size != n:
        raise DataError(f"{name}.index has duplicate entries")


def _check_range(a: np.ndarray, upper: int | None, what: str, upper_name: str) -> None:
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        raise DataError(f"{what} has negative values (min {lo})")
    if upper is not None and hi >= upper:
        raise DataError(f"{what} has values up to {hi}, outside [0, {upper_name}={upper})")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Three validated splits plus the facts models, metrics and reports need.

    Attributes:
      name: short dataset name (e.g. ``"adult"``).
      train, val, test: splits (see the module docstring).
      num_classes: K; labels lie in ``[0, K)``.
      num_groups: number of values of the sensitive attribute (1 when there is none).
      class_names: K names, ``class_names[y]``.
      group_names: ``num_groups`` names, ``group_names[group]``.
      feature_names: names of the columns of a tabular ``x`` (None for images and hashed text).
      info: loader-specific facts (preprocessing, sources, the sensitive feature's column, ...).
    """

    name: str
    train: dict
    val: dict
    test: dict
    num_classes: int
    num_groups: int
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.num_classes < 1 or self.num_groups < 1:
            raise DataError(f"{self.name}: num_classes ({self.num_classes}) and num_groups "
                            f"({self.num_groups}) must be positive")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for "
                            f"{self.num_classes} classes")
        if len(self.group_names) != self.num_groups:
            raise DataError(f"{self.name}: {len(self.group_names)} group names for "
                            f"{self.num_groups} groups")
        for split_name, split in self.splits.items():
            validate_split(split, num_classes=self.num_classes, num_groups=self.num_groups,
                           name=f"{self.name}.{split_name}")
        shapes = {k: s["x"].shape[1:] for k, s in self.splits.items()}
        if len(set(shapes.values())) != 1:
            raise DataError(f"{self.name}: splits disagree on the feature shape {shapes}")
        if self.feature_names is not None and (len(shapes["train"]) != 1
                                               or len(self.feature_names) != shapes["train"][0]):
            raise DataError(f"{self.name}: {len(self.feature_names)} feature names for x of "
                            f"shape {shapes['train']}")

    @property
    def splits(self) -> dict:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example shape of ``x``."""
        return tuple(self.train["x"].shape[1:])

    def __getitem__(self, split_name: str) -> dict:
        if split_name not in ("train", "val", "test"):
            raise KeyError(f"no split {split_name!r}; use 'train', 'val' or 'test'")
        return getattr(self, split_name)


def sha256_hex(data: bytes) -> str:
    """SHA256 of a byte string, as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str, *, what: str) -> None:
    """Raise :class:`ChecksumError` if ``sha256(data) != expected``.

    Args:
      data: the uncompressed file content.
      expected: the published SHA256 (hex).
      what: the file's description for the message (e.g. its path).
    """
    actual = sha256_hex(data)
    if actual != expected.lower():
        raise ChecksumError(
            f"checksum mismatch for {what}: SHA256 {actual}, expected {expected}. The file is "
            "corrupt or not the published version; replace it with an unmodified copy (or pass "
            "verify=False to load a deliberately modified file).")


def require_files(data_dir, names: Iterable[str], *, dataset: str,
                  describe: str = "") -> Path:
    """Check that ``data_dir`` is a directory holding every file in ``names``.

    Args:
      data_dir: the directory (str or Path).
      names: file names (relative paths) that must exist inside it.
      dataset: dataset name for the message.
      describe: an extra sentence on the expected layout.

    Returns:
      ``Path(data_dir)``.

    Raises:
      MissingDataError: naming the directory, the missing files and every expected file.
    """
    names = list(names)
    expected = ", ".join(names)
    hint = f" {describe}" if describe else ""
    if data_dir is None:
        raise MissingDataError(f"{dataset}: no data directory given; expected a directory "
                               f"holding {expected}.{hint}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingDataError(f"{dataset}: data directory {root} does not exist (or is not a "
                               f"directory); expected it to hold {expected}.{hint}")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise MissingDataError(f"{dataset}: {', '.join(missing)} not found in {root}; expected "
                               f"files: {expected}.{hint}")
    return root
