"""Tabular fairness datasets: UCI Adult (embedded), German credit and Bank marketing.

Shared preprocessing (the protocol of Chhabra et al. 2024, which seed 004 follows; REFERENCE.md):

* categorical columns are one-hot encoded with the categories seen in the training split (sorted;
  a category unseen in training encodes as all zeros); a categorical column with exactly two
  training categories becomes one 0/1 indicator column ``"col=level"`` (for the sensitive attribute
  the privileged level, e.g. ``sex=Male``; otherwise the second level in sorted order);
* numeric columns are kept as numbers;
* every resulting column (numeric, one-hot and the sensitive attribute, which stays a feature) is
  standardised with the mean and population standard deviation of the training split only
  (constant columns map to 0).

Feature columns keep the file's column order; ``Dataset.feature_names`` names them and
``Dataset.info["sensitive_feature_index"]`` is the column of the sensitive attribute.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
from typing import Mapping, Sequence

import numpy as np

from jaxunlearn.data.dataset import (DataError, Dataset, MissingDataError, make_split,
                                     require_files, verify_sha256)
from jaxunlearn.data.splits import fit_standardizer, split_rows, standardize

__all__ = [
    "ADULT_SHA256",
    "GERMAN_SHA256",
    "load_adult",
    "load_german",
    "load_bank",
    "encode_tabular",
]

ADULT_SHA256 = {
    "adult.data": "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
    "adult.test": "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
}
GERMAN_SHA256 = {
    "german.data": "b21f3d81db8071257d5ff1deaeba1fd4303b62712e6fcc9715c7a86202cb5871",
}

NUMERIC, CATEGORICAL = "numeric", "categorical"


# ----------------------------------------------------------------------------- encoding

def encode_tabular(tables: Sequence[Mapping[str, np.ndarray]],
                   columns: Sequence[tuple[str, str]], *,
                   positive: Mapping[str, str] | None = None,
                   dataset: str = "table") -> tuple[list[np.ndarray], tuple[str, ...]]:
    """One-hot/indicator-encode categorical and parse numeric columns (fitted on ``tables[0]``).

    Args:
      tables: column dicts ``{name: [n_t] str array}``; the first is the training table.
      columns: ``(name, NUMERIC | CATEGORICAL)`` in output order.
      positive: for two-category columns, the level encoded as 1 (default: the second level).
      dataset: name for error messages.

    Returns:
      ``(matrices, feature_names)``: one float64 [n_t, d] matrix per table (not standardised).
    """
    positive = dict(positive or {})
    blocks = [[] for _ in tables]
    names: list[str] = []
    for col, kind in columns:
        if kind == NUMERIC:
            for t, table in enumerate(tables):
                try:
                    blocks[t].append(np.asarray(table[col], dtype=np.float64)[:, None])
                except ValueError as e:
                    raise DataError(f"{dataset}: column {col!r} holds a non-numeric value "
                                    f"({e})") from None
            names.append(col)
        elif kind == CATEGORICAL:
            cats = np.unique(np.asarray(tables[0][col]))
            if cats.size == 2:
                level = positive.get(col, str(cats[1]))
                if level not in cats:
                    raise DataError(f"{dataset}: level {level!r} of column {col!r} is absent "
                                    f"from the training split (levels {cats.tolist()})")
                for t, table in enumerate(tables):
                    blocks[t].append((np.asarray(table[col]) == level)[:, None].astype(np.float64))
                names.append(f"{col}={level}")
            else:
                for t, table in enumerate(tables):
                    blocks[t].append(_one_hot(np.asarray(table[col]), cats))
                names.extend(f"{col}={c}" for c in cats.tolist())
        else:
            raise DataError(f"{dataset}: unknown column kind {kind!r} for {col!r}")
    return [np.concatenate(b, axis=1) for b in blocks], tuple(names)


def _one_hot(values: np.ndarray, cats: np.ndarray) -> np.ndarray:
    """[n, len(cats)] one-hot of ``values`` over sorted ``cats``; unseen values give zero rows."""
    pos = np.clip(np.searchsorted(cats, values), 0, cats.size - 1)
    hit = cats[pos] == values
    out = np.zeros((values.shape[0], cats.size), np.float64)
    out[np.flatnonzero(hit), pos[hit]] = 1.0
    return out


def _standardized_dataset(name: str, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray,
                                                           np.ndarray]],
                          feature_names: tuple[str, ...], *, sensitive_feature: str | None,
                          class_names, group_names, info: dict) -> Dataset:
    """Standardise on the train part and wrap (train, val, test) parts ``(x, y, group, index)``."""
    std = fit_standardizer(parts[0][0])
    splits = [make_split(standardize(x, std), y, g, i, name=f"{name}.{s}")
              for (x, y, g, i), s in zip(parts, ("train", "val", "test"))]
    info = dict(info)
    info["standardizer"] = std
    if sensitive_feature is not None:
        info["sensitive_feature"] = sensitive_feature
        info["sensitive_feature_index"] = feature_names.index(sensitive_feature)
    return Dataset(name=name, train=splits[0], val=splits[1], test=splits[2],
                   num_classes=len(class_names), num_groups=len(group_names),
                   class_names=tuple(class_names), group_names=tuple(group_names),
                   feature_names=feature_names, info=info)


def _columns_of(rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: rows[:, j] for j, n in enumerate(names)}


# ----------------------------------------------------------------------------- Adult

_ADULT_COLUMNS = (
    ("age", NUMERIC), ("workclass", CATEGORICAL), ("fnlwgt", NUMERIC),
    ("education", CATEGORICAL), ("education-num", NUMERIC), ("marital-status", CATEGORICAL),
    ("occupation", CATEGORICAL), ("relationship", CATEGORICAL), ("race", CATEGORICAL),
    ("sex", CATEGORICAL), ("capital-gain", NUMERIC), ("capital-loss", NUMERIC),
    ("hours-per-week", NUMERIC), ("native-country", CATEGORICAL),
)
_ADULT_LABELS = {"<=50K": 0, ">50K": 1}


def _gunzip(data: bytes, path, remedy: str) -> bytes:
    """The decompressed bytes of a gzip file, or a DataError naming the file and ``remedy``."""
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is corrupt (truncated or not gzip: {e}); {remedy}") from None


def _read_adult_files(data_dir, verify: bool) -> dict[str, bytes]:
    """Uncompressed bytes of adult.data and adult.test (embedded copy when data_dir is None)."""
    out = {}
    if data_dir is None:
        root = importlib.resources.files("jaxunlearn.data") / "_files"
        for fname in ADULT_SHA256:
            res = root / f"{fname}.gz"
            if not res.is_file():
                raise MissingDataError(f"adult: the embedded file {fname}.gz is missing from the "
                                       f"installed package ({root}); reinstall jaxunlearn or pass "
                                       "data_dir= a directory holding adult.data and adult.test")
            out[fname] = _gunzip(res.read_bytes(), res, "reinstall jaxunlearn (pip install "
                                 "--force-reinstall) or pass data_dir= a directory holding "
                                 "adult.data and adult.test")
            what = f"embedded {fname}.gz"
            if verify:
                verify_sha256(out[fname], ADULT_SHA256[fname], what=what)
        return out
    describe = ("These are the UCI Adult files (each may be gzip-compressed as adult.data.gz, "
                "adult.test.gz); data_dir=None uses the copy embedded in jaxunlearn.")
    root = require_files(data_dir, [], dataset="adult", describe=describe)
    for fname in ADULT_SHA256:
        path, gz = root / fname, root / f"{fname}.gz"
        if path.is_file():
            out[fname] = path.read_bytes()
        elif gz.is_file():
            path = gz
            out[fname] = _gunzip(gz.read_bytes(), gz, f"download {fname} again (UCI Adult) or "
                                 f"put the uncompressed {fname} in {root}")
        else:
            require_files(root, list(ADULT_SHA256), dataset="adult", describe=describe)
        if verify:
            verify_sha256(out[fname], ADULT_SHA256[fname], what=str(path))
    return out


def _parse_adult(text: str, *, what: str) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Rows without '?' of an Adult file: (columns, labels [n], number of rows dropped)."""
    rows = []
    dropped = 0
    ncol = len(_ADULT_COLUMNS) + 1
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("|"):
            continue  # blank lines; adult.test's first line is a '|1x3 Cross validator' comment
        fields = line.replace(" ", "").split(",")  # Adult values hold no inner spaces
        if len(fields) != ncol:
            raise DataError(f"adult: {what} line {lineno} has {len(fields)} fields, "
                            f"expected {ncol}")
        if "?" in fields:
            dropped += 1
            continue
        rows.append(fields)
    if not rows:
        raise DataError(f"adult: {what} holds no complete data rows")
    table = np.asarray(rows)
    labels = np.char.rstrip(table[:, -1], ".")  # test labels end with '.'
    bad = sorted(set(labels.tolist()) - set(_ADULT_LABELS))
    if bad:
        raise DataError(f"adult: {what} has unknown income labels {bad}; expected "
                        f"{sorted(_ADULT_LABELS)} (optionally ending with '.')")
    y = np.where(labels == ">50K", 1, 0).astype(np.int32)
    return _columns_of(table, [c for c, _ in _ADULT_COLUMNS]), y, dropped


def load_adult(data_dir=None, *, seed: int = 0, verify: bool = True) -> Dataset:
    """UCI Adult (Becker & Kohavi 1996) with the Chhabra et al. / seed-004 preprocessing.

    Label: income > 50K (1) vs <= 50K (0). Sensitive attribute: sex, ``group = 1`` for Male. The
    ``fnlwgt`` column is dropped; rows with a missing value ('?') are dropped (30,162 training +
    15,060 test rows remain, 45,222 in all); categoricals are one-hot encoded (``sex`` becomes the
    single indicator ``sex=Male``, kept as a feature); all features are standardised with training
    statistics (module docstring).

    Splits: ``train`` = adult.data; the official test file is cut 50/50 at random (``seed``) into
    ``val`` and ``test``. ``index`` is the row position among the kept rows of adult.data (train)
    or of adult.test (val/test).

    Args:
      data_dir: None for the copy embedded in the package (works offline), or a directory holding
        ``adult.data`` and ``adult.test`` (or their ``.gz``).
      seed: seed of the validation/test cut.
      verify: check the SHA256 of the uncompressed files (raises :class:`ChecksumError`).

    Returns:
      A :class:`Dataset` with 102 features; ``info`` holds the standardiser, the sensitive
      feature's column and the number of dropped rows.
    """
    raw = _read_adult_files(data_dir, verify)
    train_cols, y_train, drop_train = _parse_adult(raw["adult.data"].decode("utf-8"),
                                                   what="adult.data")
    test_cols, y_test, drop_test = _parse_adult(raw["adult.test"].decode("utf-8"),
                                                what="adult.test")
    columns = [(c, k) for c, k in _ADULT_COLUMNS if c != "fnlwgt"]
    (x_train, x_test), names = encode_tabular([train_cols, test_cols], columns,
                                              positive={"sex": "Male"}, dataset="adult")
    g_train = (train_cols["sex"] == "Male").astype(np.int32)
    g_test = (test_cols["sex"] == "Male").astype(np.int32)
    val_rows, test_rows = split_rows(len(y_test), (0.5, 0.5), key=seed)
    parts = [(x_train, y_train, g_train, np.arange(len(y_train)))]
    parts += [(x_test[r], y_test[r], g_test[r], r) for r in (val_rows, test_rows)]
    return _standardized_dataset(
        "adult", parts, names, sensitive_feature="sex=Male",
        class_names=("<=50K", ">50K"), group_names=("Female", "Male"),
        info={"source": "embedded" if data_dir is None else str(data_dir),
              "dropped_rows": {"adult.data": drop_train, "adult.test": drop_test},
              "seed": seed})


# ----------------------------------------------------------------------------- German credit

_GERMAN_COLUMNS = (
    ("checking_status", CATEGORICAL), ("duration", NUMERIC), ("credit_history", CATEGORICAL),
    ("purpose", CATEGORICAL), ("credit_amount", NUMERIC), ("savings", CATEGORICAL),
    ("employment_since", CATEGORICAL), ("installment_rate", NUMERIC),
    ("personal_status_sex", CATEGORICAL), ("other_debtors", CATEGORICAL),
    ("residence_since", NUMERIC), ("property", CATEGORICAL), ("age", NUMERIC),
    ("other_installment_plans", CATEGORICAL), ("housing", CATEGORICAL),
    ("existing_credits", NUMERIC), ("job", CATEGORICAL), ("people_liable", NUMERIC),
    ("telephone", CATEGORICAL), ("foreign_worker", CATEGORICAL),
)
# Attribute 9 "personal status and sex": A91 male divorced/separated, A92 female
# divorced/separated/married, A93 male single, A94 male married/widowed, A95 female single.
_GERMAN_MALE = ("A91", "A93", "A94")
_GERMAN_FEMALE = ("A92", "A95")


def load_german(data_dir, *, sensitive: str = "sex", seed: int = 0,
                fractions: Sequence[float] = (0.6, 0.2, 0.2), verify: bool = True) -> Dataset:
    """UCI Statlog German credit (``german.data``: 20 coded attributes + label, 1,000 rows).

    Label: good credit (file label 1) -> ``y = 1``, bad (2) -> 0. Sensitive attribute:

    * ``"sex"`` (default): from attribute 9 "personal status and sex"; ``group = 1`` for male
      (A91, A93, A94), 0 for female (A92, A95). The attribute stays a (one-hot) feature.
    * ``"age"``: ``group = 1`` if age > 25 (Kamiran & Calders' convention), else 0.

    Splits: a seeded random cut with ``fractions`` (train/val/test; default 60/20/20, the
    proportions of Chhabra et al.'s 60/40 split with the held-out part halved). ``index`` is the
    row number in german.data. Preprocessing as in the module docstring.

    Args:
      data_dir: directory holding ``german.data``.
      sensitive: ``"sex"`` or ``"age"``.
      seed: seed of the split.
      fractions: train/val/test fractions.
      verify: check the file's SHA256 against the UCI file (:class:`ChecksumError` on mismatch;
        pass False for a deliberately modified copy).
    """
    if sensitive not in ("sex", "age"):
        raise DataError(f"german: sensitive must be 'sex' or 'age', got {sensitive!r}")
    root = require_files(data_dir, ["german.data"], dataset="german",
                         describe="german.data is the UCI Statlog German credit file with 20 "
                                  "space-separated coded attributes and the label (1 good, 2 bad).")
    data = (root / "german.data").read_bytes()
    if verify:
        verify_sha256(data, GERMAN_SHA256["german.data"], what=str(root / "german.data"))
    rows = [line.split() for line in data.decode("utf-8").splitlines() if line.strip()]
    ncol = len(_GERMAN_COLUMNS) + 1
    for lineno, r in enumerate(rows, 1):
        if len(r) != ncol:
            raise DataError(f"german: german.data row {lineno} has {len(r)} fields, "
                            f"expected {ncol}")
    table = np.asarray(rows)
    labels = table[:, -1]
    bad = sorted(set(labels.tolist()) - {"1", "2"})
    if bad:
        raise DataError(f"german: unknown labels {bad}; expected 1 (good) or 2 (bad)")
    y = (labels == "1").astype(np.int32)
    cols = _columns_of(table, [c for c, _ in _GERMAN_COLUMNS])
    status = cols["personal_status_sex"]
    unknown = sorted(set(status.tolist()) - set(_GERMAN_MALE) - set(_GERMAN_FEMALE))
    if unknown:
        raise DataError(f"german: unknown personal status codes {unknown}")
    try:
        age = cols["age"].astype(np.float64)
    except ValueError:
        raise DataError("german: column 'age' holds a non-numeric value") from None
    if sensitive == "sex":
        group = np.isin(status, _GERMAN_MALE).astype(np.int32)
        group_names = ("female", "male")
    else:
        group = (age > 25).astype(np.int32)
        group_names = ("age<=25", "age>25")
    parts_rows = split_rows(len(y), fractions, key=seed)
    tables = [{c: v[r] for c, v in cols.items()} for r in parts_rows]
    xs, names = encode_tabular(tables, _GERMAN_COLUMNS, dataset="german")
    parts = [(x, y[r], group[r], r) for x, r in zip(xs, parts_rows)]
    sensitive_feature = "age" if sensitive == "age" else None
    return _standardized_dataset(
        "german", parts, names, sensitive_feature=sensitive_feature,
        class_names=("bad", "good"), group_names=group_names,
        info={"source": str(root), "sensitive": sensitive, "seed": seed,
              "sensitive_columns": [n for n in names if n.startswith(
                  "personal_status_sex" if sensitive == "sex" else "age")]})


# ----------------------------------------------------------------------------- Bank marketing

_BANK_COLUMNS = (
    ("age", NUMERIC), ("job", CATEGORICAL), ("marital", CATEGORICAL), ("education", CATEGORICAL),
    ("default", CATEGORICAL), ("housing", CATEGORICAL), ("loan", CATEGORICAL),
    ("contact", CATEGORICAL), ("month", CATEGORICAL), ("day_of_week", CATEGORICAL),
    ("duration", NUMERIC), ("campaign", NUMERIC), ("pdays", NUMERIC), ("previous", NUMERIC),
    ("poutcome", CATEGORICAL), ("emp.var.rate", NUMERIC), ("cons.price.idx", NUMERIC),
    ("cons.conf.idx", NUMERIC), ("euribor3m", NUMERIC), ("nr.employed", NUMERIC),
)


def load_bank(data_dir, *, filename: str = "bank-additional-full.csv", sensitive: str = "age",
              age_threshold: int = 25, drop_duration: bool = True, seed: int = 0,
              fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Dataset:
    """UCI Bank marketing (Moro et al. 2014), ``bank-additional-full.csv`` (41,188 rows, ';').

    Label: ``y`` yes (1) / no (0), whether the client subscribed a term deposit. Sensitive
    attribute (the fairness literature's choices; Chhabra et al.'s released arrays only say
    "binary"):

    * ``"age"`` (default): ``group = 1`` if age >= ``age_threshold`` (25, as in AIF360's
      BankDataset), else 0; age stays a numeric feature.
    * ``"marital"``: ``group = 1`` for married, 0 otherwise; marital stays a one-hot feature.

    ``duration`` (the call length, known only after the call and nearly determining the label) is
    dropped by default, as the UCI description advises for realistic models. "unknown" is kept as
    its own category. Splits: seeded random cut (default 60/20/20 as in Chhabra et al.); ``index``
    is the data row number in the file. Preprocessing as in the module docstring.

    Args:
      data_dir: directory holding ``filename``.
      filename: the CSV (semicolon-separated with a header row).
      sensitive: ``"age"`` or ``"marital"``.
      age_threshold: age cut for ``sensitive="age"``.
      drop_duration: drop the ``duration`` column.
      seed: seed of the split.
      fractions: train/val/test fractions.
    """
    if sensitive not in ("age", "marital"):
        raise DataError(f"bank: sensitive must be 'age' or 'marital', got {sensitive!r}")
    root = require_files(data_dir, [filename], dataset="bank",
                         describe="The UCI Bank marketing file is semicolon-separated with a "
                                  "header row including age, job, marital, ... and the label y.")
    text = (root / filename).read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text), delimiter=";", quotechar='"')
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"bank: {root / filename} is empty") from None
    needed = [c for c, _ in _BANK_COLUMNS] + ["y"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"bank: {root / filename} lacks columns {missing}; header is {header}")
    rows = []
    for lineno, r in enumerate(reader, 2):
        if not r:
            continue
        if len(r) != len(header):
            raise DataError(f"bank: {filename} line {lineno} has {len(r)} fields, expected "
                            f"{len(header)}")
        rows.append([f.strip() for f in r])
    if not rows:
        raise DataError(f"bank: {root / filename} holds no data rows")
    table = np.asarray(rows)
    cols = {c: table[:, header.index(c)] for c in needed}
    labels = cols.pop("y")
    bad = sorted(set(labels.tolist()) - {"yes", "no"})
    if bad:
        raise DataError(f"bank: unknown labels {bad} in column y; expected 'yes' or 'no'")
    y = (labels == "yes").astype(np.int32)
    if sensitive == "age":
        try:
            age = cols["age"].astype(np.float64)
        except ValueError:
            raise DataError("bank: column 'age' holds a non-numeric value") from None
        group = (age >= age_threshold).astype(np.int32)
        group_names = (f"age<{age_threshold}", f"age>={age_threshold}")
    else:
        group = (cols["marital"] == "married").astype(np.int32)
        group_names = ("not married", "married")
    columns = [(c, k) for c, k in _BANK_COLUMNS if not (drop_duration and c == "duration")]
    parts_rows = split_rows(len(y), fractions, key=seed)
    tables = [{c: v[r] for c, v in cols.items()} for r in parts_rows]
    xs, names = encode_tabular(tables, columns, dataset="bank")
    parts = [(x, y[r], group[r], r) for x, r in zip(xs, parts_rows)]
    return _standardized_dataset(
        "bank", parts, names, sensitive_feature="age" if sensitive == "age" else None,
        class_names=("no", "yes"), group_names=group_names,
        info={"source": str(root / filename), "sensitive": sensitive, "seed": seed,
              "age_threshold": age_threshold, "drop_duration": drop_duration})
