"""Image datasets read from local files: scikit-learn digits, Waterbirds and FairFace.

Images are float32 ``[n, H, W, C]`` in [0, 1] (no mean/std normalisation: models or drivers apply
their own). Files are decoded with Pillow and resized with :func:`resize_image`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxunlearn.data.dataset import DataError, Dataset, MissingDataError, make_split, require_files
from jaxunlearn.data.splits import host_rng, split_rows, subsample_rows
from jaxunlearn.progress import progress_bar

__all__ = [
    "resize_image",
    "load_digits",
    "load_digits_spurious",
    "load_waterbirds",
    "load_fairface",
    "FAIRFACE_AGE_BINS",
    "FAIRFACE_RACES",
]

# De Min et al.'s label orders (their FairFace forget groups are (age bin, race) index pairs).
FAIRFACE_AGE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69",
                     "more than 70")
FAIRFACE_RACES = ("Black", "Southeast Asian", "Middle Eastern", "Indian", "Latino_Hispanic",
                  "White", "East Asian")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with matplotlib (the [experiments] extra)
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    return Image


def resize_image(image, size: int, *, crop_fraction: float | None = None) -> np.ndarray:
    """Crop and resize one image to ``[size, size, C]`` float32 in [0, 1] (Pillow, bilinear).

    Args:
      image: a PIL image or a uint8 array [H, W, C] / [H, W].
      size: output side length.
      crop_fraction: None resizes the whole image to size x size (aspect not kept, like
        ``Resize((size, size))``); a value in (0, 1] first takes the centred square of side
        ``crop_fraction * min(H, W)`` (0.875 matches "resize to 256, centre-crop 224").

    Returns:
      float32 [size, size, C] (C = 3 for RGB input, 1 for greyscale).
    """
    Image = _pil()
    if size < 1:
        raise DataError(f"size must be positive, got {size}")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if crop_fraction is not None:
        if not 0 < crop_fraction <= 1:
            raise DataError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        w, h = img.size
        side = max(1, int(round(crop_fraction * min(w, h))))
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    out = np.asarray(img, dtype=np.float32) / 255.0
    return out[..., None] if out.ndim == 2 else out


def _read_rgb(path: Path, size: int, crop_fraction: float | None) -> np.ndarray:
    Image = _pil()
    try:
        with Image.open(path) as img:
            return resize_image(img.convert("RGB"), size, crop_fraction=crop_fraction)
    except FileNotFoundError:
        raise MissingDataError(f"image {path} listed in the metadata does not exist") from None
    except OSError as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


def _read_images(root: Path, files: Sequence[str], *, size: int, crop_fraction, progress: bool,
                 desc: str) -> np.ndarray:
    x = np.empty((len(files), size, size, 3), np.float32)
    for i, f in enumerate(progress_bar(files, total=len(files), desc=desc, enabled=progress)):
        x[i] = _read_rgb(root / f, size, crop_fraction)
    return x


# ----------------------------------------------------------------------------- digits

def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the digits data ships with scikit-learn: "
                          "pip install scikit-learn") from e
    d = sk_load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]  # [1797, 8, 8, 1], pixel values 0..16
    return x, d.target.astype(np.int32)


def load_digits(*, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Dataset:
    """scikit-learn's digits (1,797 real 8x8 greyscale images, 10 classes), offline.

    ``x``: [n, 8, 8, 1] float32 in [0, 1] (pixel / 16); ``y`` in 0..9; no sensitive attribute
    (``group = 0``, ``num_groups = 1``). Splits: seeded random cut with ``fractions``; ``index``
    is the position in scikit-learn's array.
    """
    x, y = _digits_arrays()
    parts = split_rows(len(y), fractions, key=seed)
    splits = [make_split(x[r], y[r], None, r, name=f"digits.{s}")
              for r, s in zip(parts, ("train", "val", "test"))]
    return Dataset(name="digits", train=splits[0], val=splits[1], test=splits[2], num_classes=10,
                   num_groups=1, class_names=tuple(str(c) for c in range(10)),
                   group_names=("all",), info={"seed": seed})


def load_digits_spurious(*, correlation: float = 0.9, test_correlation: float = 0.5,
                         seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Dataset:
    """Digits with a spurious binary group cue correlated with the label (group-robust studies).

    Each image gets a group ``g in {0, 1}`` drawn so that ``P(g = y mod 2) = correlation`` in
    train and val and ``test_correlation`` in test (default 0.5: the cue carries no label
    information there). Images with ``g = 1`` get a bright frame: their 28 outermost pixels (the
    border ring of the 8x8 image) are set to 1.0; images with ``g = 0`` are unchanged. A model can
    thus predict the label's parity from the frame on train/val, which fails on the balanced test
    split, as the water/land background does for Waterbirds. The (label, group) cells with
    ``g != y mod 2`` are the minority groups.

    Args:
      correlation: ``P(g = y mod 2)`` in train and val, in [0, 1].
      test_correlation: the same probability in test.
      seed: seed of the split and of the group draws.
      fractions: train/val/test fractions.
    """
    for name, c in (("correlation", correlation), ("test_correlation", test_correlation)):
        if not 0.0 <= c <= 1.0:
            raise DataError(f"{name} must be in [0, 1], got {c}")
    x, y = _digits_arrays()
    parts = split_rows(len(y), fractions, key=seed)
    u = host_rng((seed, 1)).uniform(size=len(y))
    rho = np.full(len(y), correlation)
    rho[parts[2]] = test_correlation
    parity = y % 2
    g = np.where(u < rho, parity, 1 - parity).astype(np.int32)
    ring = np.ones((8, 8), bool)
    ring[1:-1, 1:-1] = False
    x = x.copy()
    x[(g == 1)[:, None, None] & ring[None], 0] = 1.0
    splits = [make_split(x[r], y[r], g[r], r, name=f"digits_spurious.{s}")
              for r, s in zip(parts, ("train", "val", "test"))]
    return Dataset(name="digits_spurious", train=splits[0], val=splits[1], test=splits[2],
                   num_classes=10, num_groups=2, class_names=tuple(str(c) for c in range(10)),
                   group_names=("no_frame", "frame"),
                   info={"seed": seed, "correlation": correlation,
                         "test_correlation": test_correlation,
                         "cue": "g = 1: outer 1-pixel ring set to 1.0; "
                                "P(g = y mod 2) = correlation"})


# ----------------------------------------------------------------------------- Waterbirds

_WATERBIRDS_SUBDIR = "waterbird_complete95_forest2water2"


def _find_root(data_dir, marker: str, subdir: str, *, dataset: str, describe: str) -> Path:
    """``data_dir`` if it holds ``marker``, else ``data_dir/subdir`` if that does."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not (root / marker).is_file() and (root / subdir / marker).is_file():
            return root / subdir
    return require_files(data_dir, [marker], dataset=dataset, describe=describe)


def _read_csv(path: Path, required: Sequence[str], *, dataset: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fp:
        reader = csv.DictReader(fp)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{dataset}: {path} lacks columns {missing}; header is {header}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{dataset}: {path} holds no rows")
    return rows


def _int_column(rows, col: str, allowed: Sequence[int], *, dataset: str) -> np.ndarray:
    try:
        v = np.asarray([int(r[col]) for r in rows], np.int32)
    except ValueError:
        raise DataError(f"{dataset}: column {col!r} holds a non-integer value") from None
    bad = sorted(set(v.tolist()) - set(allowed))
    if bad:
        raise DataError(f"{dataset}: column {col!r} has values {bad}, expected {list(allowed)}")
    return v


def load_waterbirds(data_dir, *, size: int, crop_fraction: float | None = 0.875,
                    max_examples: int | None = None, seed: int = 0,
                    progress: bool = True) -> Dataset:
    """Waterbirds (Sagawa et al. 2020) from its metadata CSV and image folder.

    Layout: ``data_dir/metadata.csv`` (or ``data_dir/waterbird_complete95_forest2water2/...``)
    with columns ``img_filename`` (path relative to that folder), ``y`` (1 = waterbird),
    ``split`` (0 train, 1 val, 2 test) and ``place`` (1 = water background). Target: bird type;
    sensitive attribute: place (``group``), as in De Min et al. Splits: the official ones;
    ``index`` is the position among that split's rows of the CSV.

    Args:
      data_dir: the dataset folder.
      size: output image side (De Min et al. use 224).
      crop_fraction: centre crop before resizing (default 0.875: De Min et al.'s evaluation
        transform "resize to 256/224 * size, centre-crop size"); None squashes.
      max_examples: keep a seeded random subset of at most this many rows per split.
      seed: seed of the subsets.
      progress: show a progress bar (tqdm) while decoding.
    """
    describe = ("Waterbirds needs metadata.csv (img_filename, y, split, place) next to the image "
                "folders, e.g. the waterbird_complete95_forest2water2 release.")
    root = _find_root(data_dir, "metadata.csv", _WATERBIRDS_SUBDIR, dataset="waterbirds",
                      describe=describe)
    rows = _read_csv(root / "metadata.csv", ["img_filename", "y", "split", "place"],
                     dataset="waterbirds")
    y = _int_column(rows, "y", (0, 1), dataset="waterbirds")
    place = _int_column(rows, "place", (0, 1), dataset="waterbirds")
    split_id = _int_column(rows, "split", (0, 1, 2), dataset="waterbirds")
    files = np.asarray([r["img_filename"] for r in rows])
    splits = []
    for s, name in enumerate(("train", "val", "test")):
        members = np.flatnonzero(split_id == s)
        if members.size == 0:
            raise DataError(f"waterbirds: metadata.csv has no rows with split == {s} ({name})")
        sel = subsample_rows(members.size, max_examples, key=(seed, s))
        rows_s = members[sel]
        x = _read_images(root, files[rows_s].tolist(), size=size, crop_fraction=crop_fraction,
                         progress=progress, desc=f"waterbirds/{name}")
        splits.append(make_split(x, y[rows_s], place[rows_s], sel, name=f"waterbirds.{name}"))
    return Dataset(name="waterbirds", train=splits[0], val=splits[1], test=splits[2],
                   num_classes=2, num_groups=2, class_names=("landbird", "waterbird"),
                   group_names=("land", "water"),
                   info={"source": str(root), "size": size, "crop_fraction": crop_fraction,
                         "max_examples": max_examples, "seed": seed})


# ----------------------------------------------------------------------------- FairFace

def _fairface_table(root: Path, fname: str, service_test_only: bool):
    required = ["file", "age", "race"] + (["service_test"] if service_test_only else [])
    rows = _read_csv(root / fname, required, dataset="fairface")
    if service_test_only:
        rows = [r for r in rows if r["service_test"].strip() == "True"]
        if not rows:
            raise DataError(f"fairface: no rows of {fname} have service_test == True")
    for col, names in (("age", FAIRFACE_AGE_BINS), ("race", FAIRFACE_RACES)):
        bad = sorted({r[col] for r in rows} - set(names))
        if bad:
            raise DataError(f"fairface: {fname} column {col!r} has unknown values {bad}; "
                            f"expected {list(names)}")
    files = np.asarray([r["file"] for r in rows])
    age = np.asarray([FAIRFACE_AGE_BINS.index(r["age"]) for r in rows], np.int32)
    race = np.asarray([FAIRFACE_RACES.index(r["race"]) for r in rows], np.int32)
    return files, age, race


def load_fairface(data_dir, *, size: int, crop_fraction: float | None = 0.875,
                  val_fraction: float = 0.1, service_test_only: bool = True,
                  max_examples: int | None = None, seed: int = 0,
                  progress: bool = True) -> Dataset:
    """FairFace (Karkkainen & Joo 2021) as used by De Min et al.: age bins as target, race as group.

    Layout: ``data_dir`` (or ``data_dir/fairface``) holds ``fairface_label_train.csv`` and
    ``fairface_label_val.csv`` (columns ``file``, ``age``, ``gender``, ``race``,
    ``service_test``) and the images at the ``file`` paths relative to it. ``y``: the 9 age bins
    of :data:`FAIRFACE_AGE_BINS`; ``group``: the 7 races of :data:`FAIRFACE_RACES` (De Min et al.'s
    orders). Splits as De Min et al.: a seeded random ``val_fraction`` of the official training
    CSV is ``val``, the rest ``train``; the official validation CSV is ``test``. ``index`` is the
    row position (after the service_test filter) in the training CSV (train, val) or the
    validation CSV (test).

    Args:
      data_dir: the dataset folder.
      size: output image side (De Min et al. use 224).
      crop_fraction: centre crop before resizing (0.875 as De Min et al.'s evaluation transform).
      val_fraction: share of the official training CSV used for validation.
      service_test_only: keep only rows with ``service_test == True``, as De Min et al.'s loader.
      max_examples: keep a seeded random subset of at most this many rows per split.
      seed: seed of the validation cut and the subsets.
      progress: show a progress bar (tqdm) while decoding.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"fairface: val_fraction must be in (0, 1), got {val_fraction}")
    names = ["fairface_label_train.csv", "fairface_label_val.csv"]
    describe = ("FairFace needs fairface_label_train.csv and fairface_label_val.csv (file, age, "
                "gender, race, service_test) and the image folders they refer to.")
    root = _find_root(data_dir, names[0], "fairface", dataset="fairface", describe=describe)
    require_files(root, names, dataset="fairface", describe=describe)
    f_tr, age_tr, race_tr = _fairface_table(root, names[0], service_test_only)
    f_te, age_te, race_te = _fairface_table(root, names[1], service_test_only)
    train_rows, val_rows = split_rows(len(f_tr), (1 - val_fraction, val_fraction), key=seed)
    sources = (("train", f_tr, age_tr, race_tr, train_rows, (seed, 1)),
               ("val", f_tr, age_tr, race_tr, val_rows, (seed, 2)),
               ("test", f_te, age_te, race_te, np.arange(len(f_te)), (seed, 3)))
    splits = []
    for name, files, age, race, rows, k in sources:
        rows = rows[subsample_rows(rows.size, max_examples, key=k)]
        x = _read_images(root, files[rows].tolist(), size=size, crop_fraction=crop_fraction,
                         progress=progress, desc=f"fairface/{name}")
        splits.append(make_split(x, age[rows], race[rows], rows, name=f"fairface.{name}"))
    return Dataset(name="fairface", train=splits[0], val=splits[1], test=splits[2],
                   num_classes=len(FAIRFACE_AGE_BINS), num_groups=len(FAIRFACE_RACES),
                   class_names=FAIRFACE_AGE_BINS, group_names=FAIRFACE_RACES,
                   info={"source": str(root), "size": size, "crop_fraction": crop_fraction,
                         "val_fraction": val_fraction, "service_test_only": service_test_only,
                         "max_examples": max_examples, "seed": seed})
