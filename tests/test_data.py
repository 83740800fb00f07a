"""Datasets, splits, standardisation and forget-set builders (jaxunlearn.data).

Oracles: the raw files parsed independently here, scikit-learn's OneHotEncoder/StandardScaler,
records read straight from (mocked) TFDS, hand-made image fixtures, and numpy set/sort logic.
"""

import csv
import gzip
import hashlib
import importlib.resources
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxunlearn.weights import group_weights, removal_eps
from jaxunlearn import data
from jaxunlearn.data import (ChecksumError, DataError, Dataset, ForgetSetError, MissingDataError,
                             forget, images, splits, tabular, tfds_loaders)

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
GERMAN_DIR = SHARED_DATA / "german"

ADULT_COLS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
              "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
              "hours-per-week", "native-country", "income"]
ADULT_NUMERIC = ["age", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
ADULT_CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship",
                     "race", "sex", "native-country"]


def _embedded_adult(fname):
    res = importlib.resources.files("jaxunlearn.data") / "_files" / f"{fname}.gz"
    return gzip.decompress(res.read_bytes())


def _adult_rows(fname):
    """Complete rows of a raw Adult file, parsed with the csv module (independent of the loader)."""
    text = _embedded_adult(fname).decode()
    rows = []
    for r in csv.reader(text.splitlines(), skipinitialspace=True):
        if len(r) != 15:
            continue  # the '|1x3 Cross validator' line and blank lines
        if any(v == "?" for v in r):
            continue
        rows.append(r)
    return rows


@pytest.fixture(scope="module")
def adult():
    return tabular.load_adult()


@pytest.fixture()
def adult_dir(tmp_path):
    for f in ("adult.data", "adult.test"):
        (tmp_path / f).write_bytes(_embedded_adult(f))
    return tmp_path


# ----------------------------------------------------------------------------- Adult

def test_adult_row_counts_shapes_and_ranges(adult):
    n = {s: adult[s]["x"].shape[0] for s in ("train", "val", "test")}
    assert n["train"] == 30162 and n["val"] + n["test"] == 15060
    assert sum(n.values()) == 45222
    assert abs(n["val"] - n["test"]) <= 1
    assert adult.info["dropped_rows"] == {"adult.data": 2399, "adult.test": 1221}
    assert adult.input_shape == (102,) and len(adult.feature_names) == 102
    assert "fnlwgt" not in " ".join(adult.feature_names)
    for s in adult.splits.values():
        assert s["x"].dtype == np.float32 and s["y"].dtype == np.int32
        assert s["group"].dtype == np.int32 and s["index"].dtype == np.int32
        assert set(np.unique(s["y"])) == {0, 1} and set(np.unique(s["group"])) == {0, 1}
    assert adult.num_classes == 2 and adult.group_names == ("Female", "Male")
    # val and test partition the cleaned official test rows.
    both = np.concatenate([adult.val["index"], adult.test["index"]])
    np.testing.assert_array_equal(np.sort(both), np.arange(15060))
    np.testing.assert_array_equal(adult.train["index"], np.arange(30162))


def test_adult_matches_sklearn_pipeline(adult):
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    train, test = _adult_rows("adult.data"), _adult_rows("adult.test")
    assert len(train) + len(test) == 45222

    tr_table, te_table = np.array(train), np.array(test)

    def cols(table, names):
        return table[:, [ADULT_COLS.index(c) for c in names]]

    enc = OneHotEncoder(drop="if_binary", handle_unknown="ignore", sparse_output=False)
    cat_tr = enc.fit_transform(cols(tr_table, ADULT_CATEGORICAL))
    cat_te = enc.transform(cols(te_table, ADULT_CATEGORICAL))
    names = list(ADULT_NUMERIC)
    for c, cats, drop in zip(ADULT_CATEGORICAL, enc.categories_, enc.drop_idx_):
        names += [f"{c}={v}" for j, v in enumerate(cats) if drop is None or j != drop]
    x_tr = np.hstack([cols(tr_table, ADULT_NUMERIC).astype(float), cat_tr])
    x_te = np.hstack([cols(te_table, ADULT_NUMERIC).astype(float), cat_te])
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    assert sorted(names) == sorted(adult.feature_names)
    order = [names.index(f) for f in adult.feature_names]
    np.testing.assert_allclose(adult.train["x"], x_tr[:, order], atol=2e-5)
    y_te = np.char.rstrip(te_table[:, -1], ".") == ">50K"
    male_te = te_table[:, 9] == "Male"
    for s in ("val", "test"):
        idx = adult[s]["index"]
        np.testing.assert_allclose(adult[s]["x"], x_te[idx][:, order], atol=2e-5)
        np.testing.assert_array_equal(adult[s]["y"], y_te[idx])
        np.testing.assert_array_equal(adult[s]["group"], male_te[idx])
    np.testing.assert_array_equal(adult.train["y"], tr_table[:, -1] == ">50K")
    # The sensitive attribute stays a feature: the standardised sex=Male indicator.
    col = adult.train["x"][:, adult.info["sensitive_feature_index"]]
    assert adult.feature_names[adult.info["sensitive_feature_index"]] == "sex=Male"
    np.testing.assert_array_equal(col > 0, adult.train["group"] == 1)


def test_adult_standardised_on_train_only(adult):
    x = adult.train["x"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-3)  # no constant column in Adult's train
    assert np.abs(adult.test["x"].mean(0)).max() > 1e-3  # test uses train's statistics


def test_adult_user_directory_and_seed(adult, adult_dir):
    # One file plain, the other gzip-compressed: both ways of reading a user's copy.
    test_file = adult_dir / "adult.test"
    (adult_dir / "adult.test.gz").write_bytes(gzip.compress(test_file.read_bytes()))
    (adult_dir / "adult.test").unlink()
    d = tabular.load_adult(adult_dir)
    for s in ("train", "val", "test"):  # same seed, same data: identical splits
        np.testing.assert_array_equal(d[s]["x"], adult[s]["x"])
        np.testing.assert_array_equal(d[s]["index"], adult[s]["index"])
    other = tabular.load_adult(adult_dir, seed=1)
    assert not np.array_equal(other.val["index"], adult.val["index"])
    np.testing.assert_array_equal(other.train["x"], adult.train["x"])


def test_adult_checksum_mismatch(adult_dir):
    raw = (adult_dir / "adult.data").read_bytes()
    assert raw.startswith(b"39, State-gov")
    (adult_dir / "adult.data").write_bytes(b"38" + raw[2:])  # one changed age
    with pytest.raises(ChecksumError, match="adult.data"):
        tabular.load_adult(adult_dir)
    d = tabular.load_adult(adult_dir, verify=False)  # a deliberately modified copy
    assert d.train["x"].shape == (30162, 102)


def test_adult_embedded_copy_is_verified(monkeypatch):
    monkeypatch.setitem(tabular.ADULT_SHA256, "adult.test", "0" * 64)
    with pytest.raises(ChecksumError, match="embedded adult.test"):
        tabular.load_adult()


def test_adult_missing_files(tmp_path):
    with pytest.raises(MissingDataError, match="adult.data"):
        tabular.load_adult(tmp_path)
    with pytest.raises(MissingDataError, match="does not exist") as e:
        tabular.load_adult(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------- German credit

@pytest.mark.skipif(not (GERMAN_DIR / "german.data").is_file(),
                    reason=f"German credit data not found in {GERMAN_DIR}")
def test_german_credit(tmp_path):
    raw = [line.split() for line in (GERMAN_DIR / "german.data").read_text().splitlines() if line]
    good = np.array([r[20] == "1" for r in raw])
    male = np.array([r[8] in ("A91", "A93", "A94") for r in raw])
    older = np.array([int(r[12]) > 25 for r in raw])
    d = tabular.load_german(GERMAN_DIR)
    assert [d[s]["x"].shape[0] for s in ("train", "val", "test")] == [600, 200, 200]
    all_idx = np.concatenate([d[s]["index"] for s in ("train", "val", "test")])
    np.testing.assert_array_equal(np.sort(all_idx), np.arange(1000))
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(d[s]["y"], good[d[s]["index"]])
        np.testing.assert_array_equal(d[s]["group"], male[d[s]["index"]])
    np.testing.assert_allclose(d.train["x"].mean(0), 0.0, atol=1e-5)
    assert d.group_names == ("female", "male") and d.class_names == ("bad", "good")
    a = tabular.load_german(GERMAN_DIR, sensitive="age")
    np.testing.assert_array_equal(a.test["group"], older[a.test["index"]])
    assert a.feature_names[a.info["sensitive_feature_index"]] == "age"
    bad = tmp_path / "german.data"
    bad.write_bytes((GERMAN_DIR / "german.data").read_bytes().replace(b"A11 6 ", b"A11 7 ", 1))
    with pytest.raises(ChecksumError, match="german.data"):
        tabular.load_german(tmp_path)
    assert tabular.load_german(tmp_path, verify=False).train["x"].shape == d.train["x"].shape
    with pytest.raises(DataError, match="sensitive"):
        tabular.load_german(GERMAN_DIR, sensitive="race")
    with pytest.raises(MissingDataError, match="german.data"):
        tabular.load_german(tmp_path / "empty")


# ----------------------------------------------------------------------------- Bank

BANK_HEADER = ["age", "job", "marital", "education", "default", "housing", "loan", "contact",
               "month", "day_of_week", "duration", "campaign", "pdays", "previous", "poutcome",
               "emp.var.rate", "cons.price.idx", "cons.conf.idx", "euribor3m", "nr.employed", "y"]


def _write_bank(path, n=50, *, label=None, drop_col=None):
    rng = np.random.default_rng(0)
    header = [c for c in BANK_HEADER if c != drop_col]
    lines = [";".join(f'"{c}"' for c in header)]
    rows = []
    for i in range(n):
        r = {"age": str(rng.integers(18, 70)), "job": rng.choice(["admin.", "services", "unknown"]),
             "marital": rng.choice(["married", "single", "divorced"]),
             "education": rng.choice(["basic.4y", "high.school"]), "default": "no",
             "housing": rng.choice(["yes", "no"]), "loan": "no",
             "contact": rng.choice(["cellular", "telephone"]), "month": rng.choice(["may", "jun"]),
             "day_of_week": rng.choice(["mon", "tue", "wed"]),
             "duration": str(rng.integers(0, 900)),
             "campaign": str(rng.integers(1, 5)), "pdays": "999", "previous": "0",
             "poutcome": "nonexistent", "emp.var.rate": "1.1", "cons.price.idx": "93.994",
             "cons.conf.idx": f"{rng.normal(-40, 3):.1f}", "euribor3m": f"{rng.uniform(1, 5):.3f}",
             "nr.employed": "5191", "y": label or ("yes" if i % 3 == 0 else "no")}
        rows.append(r)
        quoted = {"job", "marital", "education", "default", "housing", "loan", "contact", "month",
                  "day_of_week", "poutcome", "y"}
        lines.append(";".join(f'"{r[c]}"' if c in quoted else r[c] for c in header))
    path.write_text("\n".join(lines) + "\n")
    return rows


def test_bank_synthetic_csv(tmp_path):
    rows = _write_bank(tmp_path / "bank-additional-full.csv")
    d = tabular.load_bank(tmp_path)
    assert [d[s]["x"].shape[0] for s in ("train", "val", "test")] == [30, 10, 10]
    y = np.array([r["y"] == "yes" for r in rows])
    age = np.array([int(r["age"]) for r in rows])
    for s in ("train", "val", "test"):
        idx = d[s]["index"]
        np.testing.assert_array_equal(d[s]["y"], y[idx])
        np.testing.assert_array_equal(d[s]["group"], age[idx] >= 25)
    assert "duration" not in d.feature_names
    # 9 numeric columns plus the categories present in the training part.
    train_rows = [rows[i] for i in d.train["index"]]
    expect = 9
    for c in ("job", "marital", "education", "default", "housing", "loan", "contact", "month",
              "day_of_week", "poutcome"):
        k = len({r[c] for r in train_rows})
        expect += 1 if k == 2 else k
    assert d.input_shape == (expect,)
    assert d.feature_names[d.info["sensitive_feature_index"]] == "age"
    np.testing.assert_allclose(d.train["x"].mean(0), 0.0, atol=1e-5)
    m = tabular.load_bank(tmp_path, sensitive="marital", drop_duration=False)
    assert "duration" in m.feature_names
    married = np.array([r["marital"] == "married" for r in rows])
    np.testing.assert_array_equal(m.val["group"], married[m.val["index"]])


def test_bank_bad_input(tmp_path):
    _write_bank(tmp_path / "bank-additional-full.csv", drop_col="euribor3m")
    with pytest.raises(DataError, match="euribor3m"):
        tabular.load_bank(tmp_path)
    _write_bank(tmp_path / "bank-additional-full.csv", label="maybe")
    with pytest.raises(DataError, match="maybe"):
        tabular.load_bank(tmp_path)
    with pytest.raises(MissingDataError, match="bank-additional-full.csv"):
        tabular.load_bank(tmp_path / "missing")
    with pytest.raises(DataError, match="sensitive"):
        tabular.load_bank(tmp_path, sensitive="job")


# ----------------------------------------------------------------------------- digits

def test_digits():
    from sklearn.datasets import load_digits as sk_digits

    sk = sk_digits()
    d = images.load_digits()
    assert sum(d[s]["x"].shape[0] for s in ("train", "val", "test")) == 1797
    for s in ("train", "val", "test"):
        x = d[s]["x"]
        assert x.shape[1:] == (8, 8, 1) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        np.testing.assert_allclose(x[..., 0], sk.images[d[s]["index"]] / 16.0, rtol=1e-6)
        np.testing.assert_array_equal(d[s]["y"], sk.target[d[s]["index"]])
        assert np.all(d[s]["group"] == 0)
    assert d.num_classes == 10 and d.num_groups == 1


def test_digits_spurious():
    from sklearn.datasets import load_digits as sk_digits

    sk = sk_digits()
    ring = np.ones((8, 8), bool)
    ring[1:-1, 1:-1] = False
    d = images.load_digits_spurious(correlation=0.9, test_correlation=0.5)
    for s in ("train", "val", "test"):
        x, g, idx = d[s]["x"][..., 0], d[s]["group"], d[s]["index"]
        orig = sk.images[idx] / 16.0
        np.testing.assert_allclose(x[g == 1][:, ring], 1.0)
        np.testing.assert_allclose(x[g == 1][:, ~ring], orig[g == 1][:, ~ring], rtol=1e-6)
        np.testing.assert_allclose(x[g == 0], orig[g == 0], rtol=1e-6)
    agree = lambda s: np.mean(d[s]["group"] == d[s]["y"] % 2)  # noqa: E731
    assert abs(agree("train") - 0.9) < 0.05
    assert abs(agree("test") - 0.5) < 0.1
    exact = images.load_digits_spurious(correlation=1.0)
    np.testing.assert_array_equal(exact.train["group"], exact.train["y"] % 2)
    with pytest.raises(DataError, match="correlation"):
        images.load_digits_spurious(correlation=1.5)


# ----------------------------------------------------------------------------- image folders

def _png(path, color, size=(10, 6)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(int(c) for c in color)).save(path)


def test_resize_image_crop():
    img = np.zeros((4, 8, 3), np.uint8)
    img[:, 2:6] = 200  # the centred 4x4 square
    out = images.resize_image(img, 4, crop_fraction=1.0)
    assert out.shape == (4, 4, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 200 / 255, rtol=1e-6)
    squashed = images.resize_image(img, 4)
    assert squashed.min() < 0.5 < squashed.max()  # the dark sides survive without cropping
    with pytest.raises(DataError):
        images.resize_image(img, 4, crop_fraction=0.0)


def _waterbirds_fixture(root):
    meta = []  # (file, y, split, place)
    for i in range(9):
        y, split, place = i % 2, i % 3, (i // 2) % 2
        f = f"{i:03d}.Bird/img_{i}.png"
        _png(root / f, (10 * i, 100 + y, 50 + place * 20), size=(12 + i, 9))
        meta.append((f, y, split, place))
    with open(root / "metadata.csv", "w", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, (f, y, split, place) in enumerate(meta):
            w.writerow([i + 1, f, y, split, place, f"/x/{i}.jpg"])
    return meta


def test_waterbirds_fixture(tmp_path):
    meta = _waterbirds_fixture(tmp_path / "waterbird_complete95_forest2water2")
    d = images.load_waterbirds(tmp_path, size=4, crop_fraction=None, progress=False)
    for s, name in enumerate(("train", "val", "test")):
        rows = [m for m in meta if m[2] == s]
        split = d[name]
        assert split["x"].shape == (len(rows), 4, 4, 3)
        np.testing.assert_array_equal(split["y"], [m[1] for m in rows])
        np.testing.assert_array_equal(split["group"], [m[3] for m in rows])
        np.testing.assert_array_equal(split["index"], np.arange(len(rows)))
        for j, m in enumerate(rows):  # solid colours survive resizing exactly
            i = meta.index(m)
            np.testing.assert_allclose(split["x"][j], np.broadcast_to(
                np.array([10 * i, 100 + m[1], 50 + m[3] * 20]) / 255, (4, 4, 3)), atol=1e-6)
    assert d.group_names == ("land", "water")
    sub = images.load_waterbirds(tmp_path, size=4, max_examples=2, progress=False)
    assert sub.train["x"].shape[0] == 2


def test_waterbirds_bad_input(tmp_path):
    with pytest.raises(MissingDataError, match="metadata.csv"):
        images.load_waterbirds(tmp_path, size=4)
    meta = _waterbirds_fixture(tmp_path)
    (tmp_path / meta[0][0]).unlink()
    with pytest.raises(MissingDataError, match="img_0.png"):
        images.load_waterbirds(tmp_path, size=4, progress=False)
    text = (tmp_path / "metadata.csv").read_text().replace(",1,2,", ",1,7,")
    (tmp_path / "metadata.csv").write_text(text)
    with pytest.raises(DataError, match="split"):
        images.load_waterbirds(tmp_path, size=4, progress=False)


def _fairface_fixture(root, n_train=20, n_val=6):
    ages, races = images.FAIRFACE_AGE_BINS, images.FAIRFACE_RACES
    tables = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(n):
            f = f"{split}/{i + 1}.jpg"
            _png(root / f, (i * 10 % 256, 30, 40))
            rows.append((f, ages[i % 9], "Male" if i % 2 else "Female", races[i % 7],
                         "False" if i % 5 == 4 else "True"))
        with open(root / f"fairface_label_{split}.csv", "w", newline="") as fp:
            w = csv.writer(fp)
            w.writerow(["file", "age", "gender", "race", "service_test"])
            w.writerows(rows)
        tables[split] = rows
    return tables


def test_fairface_fixture(tmp_path):
    tables = _fairface_fixture(tmp_path / "fairface")
    d = images.load_fairface(tmp_path, size=5, val_fraction=0.25, progress=False)
    kept = {s: [r for r in rows if r[4] == "True"] for s, rows in tables.items()}
    assert d.train["x"].shape == (12, 5, 5, 3) and d.val["x"].shape == (4, 5, 5, 3)
    assert d.test["x"].shape[0] == len(kept["val"]) == 5
    np.testing.assert_array_equal(np.sort(np.r_[d.train["index"], d.val["index"]]), np.arange(16))
    for s, source in (("train", "train"), ("val", "train"), ("test", "val")):
        rows = [kept[source][i] for i in d[s]["index"]]
        ages = [images.FAIRFACE_AGE_BINS.index(r[1]) for r in rows]
        races = [images.FAIRFACE_RACES.index(r[3]) for r in rows]
        np.testing.assert_array_equal(d[s]["y"], ages)
        np.testing.assert_array_equal(d[s]["group"], races)
    assert d.num_classes == 9 and d.num_groups == 7
    everything = images.load_fairface(tmp_path, size=5, service_test_only=False, progress=False)
    assert everything.test["x"].shape[0] == 6


def test_fairface_bad_input(tmp_path):
    _fairface_fixture(tmp_path)
    (tmp_path / "fairface_label_val.csv").unlink()
    with pytest.raises(MissingDataError, match="fairface_label_val.csv"):
        images.load_fairface(tmp_path, size=4)
    _fairface_fixture(tmp_path)
    text = (tmp_path / "fairface_label_train.csv").read_text().replace(",20-29,", ",twenty,", 1)
    (tmp_path / "fairface_label_train.csv").write_text(text)
    with pytest.raises(DataError, match="twenty"):
        images.load_fairface(tmp_path, size=4, progress=False)


# ----------------------------------------------------------------------------- TFDS (mocked)

@pytest.fixture()
def mock_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        yield tfds


def test_cifar_mock(mock_tfds):
    d = tfds_loaders.load_cifar10(progress=False, chunk_size=3)
    src = mock_tfds.data_source("cifar10", split="train")
    assert d.train["x"].shape == (10, 32, 32, 3) and d.train["x"].dtype == np.float32
    assert d.val["x"].shape[0] == d.test["x"].shape[0] == 5
    np.testing.assert_array_equal(np.sort(np.r_[d.val["index"], d.test["index"]]), np.arange(10))
    for i in (0, 7):
        np.testing.assert_allclose(d.train["x"][i], src[i]["image"] / 255.0, rtol=1e-6)
        assert d.train["y"][i] == src[i]["label"]
    assert d.train["x"].min() >= 0 and d.train["x"].max() <= 1
    assert d.train["y"].max() < 10 and np.all(d.train["group"] == 0) and d.num_groups == 1
    sub = tfds_loaders.load_cifar10(max_examples=4, progress=False)
    assert sub.train["x"].shape[0] == 4 and len(set(sub.train["index"])) == 4
    np.testing.assert_allclose(sub.train["x"][1], src[int(sub.train["index"][1])]["image"] / 255.0,
                               rtol=1e-6)
    with pytest.raises(DataError, match="validation"):
        tfds_loaders.load_cifar10(validation="official")
    c = tfds_loaders.load_cifar100(label="coarse", progress=False)
    src100 = mock_tfds.data_source("cifar100", split="test")
    assert c.num_classes == 20 and c.val["y"].max() < 20
    np.testing.assert_array_equal(c.val["y"], [src100[int(i)]["coarse_label"]
                                               for i in c.val["index"]])
    assert tfds_loaders.load_cifar100(progress=False).num_classes == 100


def test_celeb_a_mock(mock_tfds):
    d = tfds_loaders.load_celeb_a(size=8, target="Blond_Hair", sensitive="Male", progress=False)
    src = mock_tfds.data_source("celeb_a", split="validation")
    assert d.val["x"].shape == (10, 8, 8, 3)
    attrs = [src[i]["attributes"] for i in range(10)]
    np.testing.assert_array_equal(d.val["y"], [a["Blond_Hair"] for a in attrs])
    np.testing.assert_array_equal(d.val["group"], [a["Male"] for a in attrs])
    np.testing.assert_allclose(d.val["x"][3], images.resize_image(src[3]["image"], 8), rtol=1e-6)
    assert d.group_names == ("not Male", "Male")
    other = tfds_loaders.load_celeb_a(size=4, target="Attractive", sensitive="Young",
                                      progress=False)
    train_src = mock_tfds.data_source("celeb_a", split="train")
    np.testing.assert_array_equal(other.train["group"],
                                  [train_src[i]["attributes"]["Young"] for i in range(10)])
    np.testing.assert_array_equal(other.train["y"],
                                  [train_src[i]["attributes"]["Attractive"] for i in range(10)])
    with pytest.raises(DataError, match="Blonde"):
        tfds_loaders.load_celeb_a(size=4, target="Blonde")


def test_civil_comments_mock(mock_tfds):
    ids = ("black", "white")
    d = tfds_loaders.load_civil_comments(identities=ids, num_features=32, progress=False,
                                         validation="half_test", seed=3)
    src = mock_tfds.data_source("civil_comments/CivilCommentsIdentities", split="test")
    assert d.val["x"].shape == (5, 32) and d.num_groups == 3
    for j, i in enumerate(d.val["index"]):
        ex = src[int(i)]
        assert d.val["y"][j] == (ex["toxicity"] >= 0.5)
        expect = 1 if ex["black"] >= 0.5 else (2 if ex["white"] >= 0.5 else 0)
        assert d.val["group"][j] == expect
        np.testing.assert_allclose(d.val["x"][j], tfds_loaders.hash_text_features(
            [ex["text"]], num_features=32)[0], rtol=1e-6)
    assert set(np.unique(d.train["y"])) <= {0, 1}
    plain = tfds_loaders.load_civil_comments(identities=(), num_features=16, progress=False)
    assert plain.num_groups == 1 and plain.info["config"] == "CivilComments"
    with pytest.raises(DataError, match="martian"):
        tfds_loaders.load_civil_comments(identities=("martian",))


def test_hash_text_features():
    def oracle(text, d):
        v = np.zeros(d)
        toks = text.lower().split()
        for g in toks + [" ".join(p) for p in zip(toks, toks[1:])]:
            h = zlib.crc32(g.encode())
            v[h % d] += 1 if h < 2 ** 31 else -1
        return v / np.linalg.norm(v)

    x = tfds_loaders.hash_text_features(["The cat saw the cat", b"dogs bark", ""],
                                        num_features=64)
    assert x.shape == (3, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], oracle("the cat saw the cat", 64), rtol=1e-6)
    np.testing.assert_allclose(x[1], oracle("dogs bark", 64), rtol=1e-6)
    assert np.all(x[2] == 0)


def test_tfds_missing_data(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(MissingDataError, match="array_record"):
        tfds_loaders.load_cifar10(data_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- contract, splits

def _toy(n=12, k=3, groups=2, seed=0):
    rng = np.random.default_rng(seed)
    return data.make_split(rng.normal(size=(n, 4)), np.arange(n) % k, (np.arange(n) // k) % groups)


def test_split_contract_errors():
    s = _toy()
    data.validate_split(s, num_classes=3, num_groups=2)
    with pytest.raises(DataError, match="num_classes"):
        data.validate_split(s, num_classes=2)
    with pytest.raises(DataError, match="num_groups"):
        data.validate_split(s, num_groups=1)
    x = s["x"].copy()
    x[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        data.make_split(x, s["y"])
    x[3, 1] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        data.make_split(x, s["y"])
    with pytest.raises(DataError, match="negative"):
        data.make_split(s["x"], s["y"] - 1)
    with pytest.raises(DataError, match="non-integer"):
        data.make_split(s["x"], s["y"] + 0.5)
    with pytest.raises(DataError, match="shape"):
        data.make_split(s["x"], s["y"][:-1])
    with pytest.raises(DataError, match="duplicate"):
        data.make_split(s["x"], s["y"], index=np.zeros(12))
    with pytest.raises(DataError, match="missing keys"):
        data.validate_split({"x": s["x"], "y": s["y"]})
    with pytest.raises(DataError, match="y has values up to 2"):
        Dataset(name="toy", train=s, val=s, test=s, num_classes=2, num_groups=2,
                class_names=("a", "b"), group_names=("g0", "g1"))
    with pytest.raises(DataError, match="class names"):
        Dataset(name="toy", train=s, val=s, test=s, num_classes=3, num_groups=2,
                class_names=("a", "b"), group_names=("g0", "g1"))
    ok = Dataset(name="toy", train=s, val=s, test=s, num_classes=3, num_groups=2,
                 class_names=("a", "b", "c"), group_names=("g0", "g1"))
    assert ok["val"] is s and ok.input_shape == (4,)


def test_split_rows_and_random_split():
    key = jax.random.key(0)
    a, b, c = splits.split_rows(101, (0.6, 0.2, 0.2), key=key)
    assert (a.size, b.size, c.size) == (60, 20, 21)
    np.testing.assert_array_equal(np.sort(np.r_[a, b, c]), np.arange(101))
    assert all(np.all(np.diff(p) > 0) for p in (a, b, c))
    a2, _, _ = splits.split_rows(101, (0.6, 0.2, 0.2), key=key)
    np.testing.assert_array_equal(a, a2)
    s = _toy(20)
    tr, te = splits.random_split(s, (0.5, 0.5), key=jax.random.key(1))
    np.testing.assert_array_equal(np.sort(np.r_[tr["index"], te["index"]]), np.arange(20))
    np.testing.assert_array_equal(tr["x"], s["x"][tr["index"]])
    with pytest.raises(DataError, match="sum to 1"):
        splits.split_rows(10, (0.5, 0.4), key=key)
    with pytest.raises(DataError, match="empty"):
        splits.split_rows(3, (0.9, 0.05, 0.05), key=key)


def test_host_rng_keys():
    k = jax.random.key(7)
    np.testing.assert_array_equal(splits.host_rng(k).permutation(20),
                                  splits.host_rng(jax.random.key(7)).permutation(20))
    assert not np.array_equal(splits.host_rng(k).permutation(20),
                              splits.host_rng(jax.random.fold_in(k, 1)).permutation(20))
    np.testing.assert_array_equal(splits.host_rng(jax.random.PRNGKey(7)).permutation(20),
                                  splits.host_rng(k).permutation(20))  # raw and typed keys agree
    np.testing.assert_array_equal(splits.host_rng((3, 1)).permutation(9),
                                  np.random.default_rng([3, 1]).permutation(9))
    with pytest.raises(DataError, match="key"):
        splits.host_rng("seed")
    with pytest.raises(DataError, match="seed"):
        splits.host_rng(-1)


def test_standardizer_matches_sklearn():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    tr = rng.normal(3.0, 2.0, size=(50, 5))
    tr[:, 2] = 7.0  # constant column
    va = rng.normal(3.0, 2.0, size=(20, 5))
    std = splits.fit_standardizer(tr)
    sk = StandardScaler().fit(tr)
    np.testing.assert_allclose(splits.standardize(va, std), sk.transform(va), rtol=1e-5, atol=1e-6)
    s_tr = data.make_split(tr, np.zeros(50))
    s_va = data.make_split(tr[:20] + 1.0, np.zeros(20))
    fitted, out_tr, out_va = splits.standardize_splits(s_tr, s_va)
    np.testing.assert_allclose(out_tr["x"].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out_va["x"] - splits.standardize(tr[:20], fitted),
                               np.broadcast_to(1.0 / fitted.scale, (20, 5)), rtol=1e-4)
    with pytest.raises(DataError, match="NaN"):
        splits.fit_standardizer(np.array([[1.0], [np.nan]]))


# ----------------------------------------------------------------------------- forget sets

def test_forget_class():
    s = _toy(30, k=3)
    rows = forget.forget_class(s, 1)
    np.testing.assert_array_equal(rows, np.flatnonzero(s["y"] == 1))
    with pytest.raises(ForgetSetError, match="class 5"):
        forget.forget_class(s, 5)
    one = data.make_split(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ForgetSetError, match="all 4"):
        forget.forget_class(one, 0)


def test_forget_random():
    s = _toy(40)
    rows = forget.forget_random(s, 0.25, key=jax.random.key(0))
    assert rows.size == 10 and np.unique(rows).size == 10 and np.all(np.diff(rows) > 0)
    assert rows.dtype == np.int32 and rows.min() >= 0 and rows.max() < 40
    np.testing.assert_array_equal(rows, forget.forget_random(s, 0.25, key=jax.random.key(0)))
    assert not np.array_equal(rows, forget.forget_random(s, 0.25, key=jax.random.key(1)))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ForgetSetError, match=r"\(0, 1\]"):
            forget.forget_random(s, bad, key=jax.random.key(0))
    with pytest.raises(ForgetSetError, match="all 40"):
        forget.forget_random(s, 1.0, key=jax.random.key(0))
    with pytest.raises(ForgetSetError, match="no sample"):
        forget.forget_random(s, 0.01, key=jax.random.key(0))


def test_forget_group():
    y = np.array([0, 1] * 20)
    g = np.array([0] * 10 + [1] * 30)
    s = data.make_split(np.zeros((40, 1)), y, g)
    cell = np.flatnonzero((y == 1) & (g == 1))  # 15 samples
    for r, expect in ((0.1, 1), (0.5, 7), (0.9, 13), (1.0, 15)):
        rows = forget.forget_group(s, target=1, group=1, fraction=r, key=jax.random.key(2))
        assert rows.size == expect and np.all(np.isin(rows, cell))
    with pytest.raises(ForgetSetError, match=r"\(0, 1\]"):
        forget.forget_group(s, target=1, group=1, fraction=1.1, key=jax.random.key(0))
    with pytest.raises(ForgetSetError, match=r"\(0, 1\]"):
        forget.forget_group(s, target=1, group=1, fraction=0.0, key=jax.random.key(0))
    with pytest.raises(ForgetSetError, match="group 2"):
        forget.forget_group(s, target=1, group=2, fraction=0.5, key=jax.random.key(0))
    with pytest.raises(ForgetSetError, match="class 3"):
        forget.forget_group(s, target=3, group=1, fraction=0.5, key=jax.random.key(0))
    s2 = data.make_split(np.zeros((4, 1)), [0, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ForgetSetError, match="no training sample"):
        forget.forget_group(s2, target=0, group=1, fraction=0.5, key=jax.random.key(0))
    with pytest.raises(ForgetSetError, match="no sample"):
        forget.forget_group(s, target=1, group=1, fraction=0.05, key=jax.random.key(0))


def test_forget_indices_errors():
    s = _toy(10)
    np.testing.assert_array_equal(forget.forget_indices(s, [7, 2, 5]), [2, 5, 7])
    with pytest.raises(ForgetSetError, match="empty"):
        forget.forget_indices(s, [])
    with pytest.raises(ForgetSetError, match="out of range"):
        forget.forget_indices(s, [3, 10])
    with pytest.raises(ForgetSetError, match="out of range"):
        forget.forget_indices(s, [-1, 3])
    with pytest.raises(ForgetSetError, match="duplicates"):
        forget.forget_indices(s, [3, 4, 3])
    with pytest.raises(ForgetSetError, match="all 10"):
        forget.forget_indices(s, np.arange(10))
    with pytest.raises(ForgetSetError, match="integers"):
        forget.forget_indices(s, [1.0, 2.0])


def test_forget_top_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50)
    low = forget.forget_top_k(scores, 5, largest=False)
    np.testing.assert_array_equal(low, np.sort(np.argsort(scores)[:5]))
    high = forget.forget_top_fraction(scores, 0.1, largest=True)
    np.testing.assert_array_equal(high, np.sort(np.argsort(scores)[-5:]))
    assert np.all(scores[high].min() > np.delete(scores, high))
    ties = forget.forget_top_k(np.array([1.0, 0.0, 0.0, 0.0]), 2, largest=False)
    np.testing.assert_array_equal(ties, [1, 2])
    with pytest.raises(ForgetSetError, match="NaN"):
        forget.forget_top_k(np.array([0.0, np.nan, 1.0]), 1, largest=True)
    for k in (0, 50):
        with pytest.raises(ForgetSetError, match="1 <= k"):
            forget.forget_top_k(scores, k, largest=True)
    with pytest.raises(ForgetSetError, match="no sample"):
        forget.forget_top_fraction(scores, 0.01, largest=True)


def test_forget_retain_and_weights():
    s = _toy(12, k=3, groups=2)
    rows = np.array([0, 4, 5])
    f, r = forget.forget_retain_splits(s, rows)
    np.testing.assert_array_equal(f["index"], rows)
    np.testing.assert_array_equal(np.sort(np.r_[f["index"], r["index"]]), np.arange(12))
    np.testing.assert_array_equal(r["x"], s["x"][r["index"]])
    eps = removal_eps(12, rows)
    assert eps.dtype == np.float32
    np.testing.assert_array_equal(eps, np.where(np.isin(np.arange(12), rows), -1.0, 0.0))
    np.testing.assert_array_equal(removal_eps(12, forget.forget_mask(12, rows)), eps)
    cells = forget.group_cells(s, 2)
    np.testing.assert_array_equal(cells, s["group"] + 2 * s["y"])
    retain = ~forget.forget_mask(12, rows)
    bw = group_weights(s["y"], s["group"], retain, num_sensitive=2)
    np.testing.assert_allclose(np.bincount(cells, weights=bw, minlength=6),
                               np.bincount(cells, minlength=6), rtol=1e-6)
    assert np.all(bw[rows] == 0)
    with pytest.raises(ValueError, match="forget rows must lie in"):
        removal_eps(12, [12])


def test_adult_group_forget_end_to_end(adult):
    """De Min's protocol on real data: half of the (>50K, Female) cell, then reweighting."""
    rows = data.forget_group(adult.train, target=1, group=0, fraction=0.5, key=jax.random.key(0))
    cell = (adult.train["y"] == 1) & (adult.train["group"] == 0)
    assert rows.size == cell.sum() // 2 and np.all(cell[rows])
    w = group_weights(adult.train["y"], adult.train["group"], ~data.forget_mask(len(cell), rows),
                      num_sensitive=2)
    cells = data.group_cells(adult.train, 2)
    np.testing.assert_allclose(np.bincount(cells, weights=w), np.bincount(cells), rtol=1e-5)


def test_package_exports_and_files():
    files = importlib.resources.files("jaxunlearn.data") / "_files"
    assert (files / "README").is_file()
    assert "Becker" in (files / "README").read_text()
    for f, h in tabular.ADULT_SHA256.items():
        assert hashlib.sha256(_embedded_adult(f)).hexdigest() == h
    if (SHARED_DATA / "SHA256SUMS").is_file():  # the shared copy's published sums agree
        sums = dict(reversed(line.split()) for line in (SHARED_DATA / "SHA256SUMS").read_text()
                    .splitlines() if line.strip())
        assert sums["adult/adult.data"] == tabular.ADULT_SHA256["adult.data"]
        assert sums["german/german.data"] == tabular.GERMAN_SHA256["german.data"]
    for name in ("load_adult", "load_german", "load_bank", "load_digits", "load_digits_spurious",
                 "load_waterbirds", "load_fairface", "load_cifar10", "load_cifar100",
                 "load_celeb_a", "load_civil_comments", "forget_group", "batch_plan"):
        assert callable(getattr(data, name))
