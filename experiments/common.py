"""What every experiment driver shares: config files, the command line, the builders (model, data,
optimizer, training), atomic result files, resume and Markdown tables.

Every driver has the shape (big_vision style)::

    python -m experiments.<driver> --config experiments/configs/<driver>_<preset>.py \
        [--set key=value ...] [--out DIR] [--seed S] [--fresh]

``--preset NAME`` is a shortcut for ``--config experiments/configs/<driver>_<NAME>.py``. A config
file defines ``get_config()`` returning a dict of the driver's ``Config`` fields (a frozen
dataclass in the driver, which holds the defaults); ``--set`` overrides one field (a Python
literal; ``a,b`` for a tuple). Every driver writes ``DIR/results.json`` and ``DIR/report.md``
(plus CSV tables and PNG plots where useful); ``results.json`` is rewritten atomically after each
finished cell and a rerun with the same config skips the finished cells (:func:`resume_rows`;
``--fresh`` starts over); training runs keep :mod:`jaxunlearn.checkpoint` checkpoints through
:func:`jaxunlearn.loop.run`. Files are written to a temporary name and renamed, so an interrupted
run never leaves a truncated result behind.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib.util
import io
import json
import os
import platform
import time
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["CONFIG_DIR", "config_path", "presets", "load_config", "apply_overrides", "parse_args",
           "cosine_adam", "make_optimizer", "build_model", "check_input", "load_dataset", "train_model",
           "write_text", "write_json", "write_csv", "resume_rows", "markdown_table", "timer",
           "environment", "savefig", "check_out", "check_config", "check_number"]


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(driver: str, preset: str) -> str:
    """The config file of ``preset`` for ``driver``: ``configs/<driver>_<preset>.py`` ('-' -> '_')."""
    return os.path.join(CONFIG_DIR, f"{driver}_{preset.replace('-', '_')}.py")


def presets(driver: str) -> tuple:
    """The preset names that have a config file for ``driver``."""
    pre = f"{driver}_"
    return tuple(sorted(f[len(pre):-3] for f in os.listdir(CONFIG_DIR)
                        if f.startswith(pre) and f.endswith(".py")))


def load_config(path: str, config_cls):
    """``config_cls(**get_config())`` of the config file at ``path``.

    Raises:
      ValueError: no such file, no ``get_config``, or a key that ``config_cls`` does not have.
    """
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    cfg = mod.get_config()
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    known = {f.name for f in dataclasses.fields(config_cls)}
    bad = sorted(set(cfg) - known)
    if bad:
        raise ValueError(f"config file {path!r} sets unknown key(s) {bad}; known: {sorted(known)}")
    return config_cls(**cfg)


def _parse_value(text: str, default, annotation) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:  # nan, inf (refused by check_config, with a clear message)
            value = float(text) if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity") \
                else text
        except ValueError:
            value = text
    if value is None:
        return None
    if isinstance(default, tuple) or "tuple" in str(annotation):
        if isinstance(value, str):
            value = tuple(v for v in value.split(",") if v)
        elif isinstance(value, (list, tuple)):
            value = tuple(value)
        else:
            value = (value,)
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_overrides(cfg, overrides: Sequence[str]):
    """``cfg`` with ``key=value`` overrides (Python literals; ``a,b`` for a tuple field).

    Raises:
      ValueError: a malformed override or an unknown key (naming the known ones).
    """
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in fields:
            raise ValueError(f"--set {k}=...: unknown key; known: {sorted(fields)}")
        changes[k] = _parse_value(v.strip(), getattr(cfg, k), fields[k].type)
    return dataclasses.replace(cfg, **changes)


def check_out(out: str) -> str:
    """Create ``--out`` (and its parents) and prove it writable, before any compute.

    Returns:
      The absolute path.

    Raises:
      ValueError: naming ``--out`` when the directory cannot be created or written (a file's path,
        ``/proc/...``, a read-only directory).
    """
    path = os.path.abspath(os.fspath(out))
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out!r} is not a writable directory ({e.strerror or e}); pass "
                         "--out DIR with a directory that can be created and written") from None
    return path


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts: an int >= 1 (else a usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, none_ok: bool = False) -> None:
    """Raise a ValueError naming config field ``name`` unless ``value`` is a finite number in
    ``[low, high]`` (``(low, high]`` with ``low_open``), an int with ``integer``."""
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and np.isfinite(float(value)) and not (integer and float(value) != int(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) <= high
    if not ok:
        what = "an integer" if integer else "a finite number"
        if low is not None or high is not None:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            what += f" in {'(' if low_open else '['}{lo}, {hi}{']' if high is not None else ')'}"
        raise ValueError(f"config {name}={value!r} must be {what}; fix it with --set "
                         f"{name.split('[')[0].split('.')[0]}=...")


def _non_finite(value, path: str):
    """The path of the first NaN/inf number in a config value (nested dicts/tuples), or None."""
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return path
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        bad = _non_finite(v, f"{path}[{k!r}]")
        if bad:
            return bad
    return None


def check_config(cfg, validate=None) -> None:
    """The checks every driver's config gets before any compute, then the driver's ``validate``.

    Every field must have its default's kind (a number, a string, a tuple, a dict) and no number
    anywhere (nested recipes included) may be NaN or inf; ``validate(cfg)`` adds the driver's
    ranges (counts >= 1, fractions in range, known method names, ...).

    Raises:
      ValueError: naming the field, its value and the remedy.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        bad = _non_finite(value, f.name)
        if bad:
            raise ValueError(f"config {bad} is NaN or inf; fix it with --set {f.name}=...")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value is None or default is None:
            continue
        kinds = ((bool,), (int, float), (str,), (tuple, list), (dict,))
        want = next((k for k in kinds if isinstance(default, k)), None)
        if want is not None and (not isinstance(value, want) or
                                 (want != (bool,) and isinstance(value, bool))):
            raise ValueError(f"config {f.name}={value!r} should be like its default "
                             f"{default!r} ({type(default).__name__}); fix it with --set {f.name}=...")
    if validate is not None:
        validate(cfg)


def parse_args(description: str, *, driver: str, config_cls, default_out: str, extra=None,
               argv=None, validate=None):
    """The standard driver command line; returns ``(args, cfg, name)``.

    ``--config FILE`` or ``--preset NAME`` (default: the first of ``quick``/``smoke`` that exists)
    choose the config, ``--set key=value`` (repeatable) overrides fields, ``--out``, ``--seed``,
    ``--fresh`` and ``--no-progress`` do what they say. ``name`` labels the config in reports.

    Args:
      description: shown by ``--help``.
      driver: the driver's module name (config files are ``configs/<driver>_<preset>.py``).
      config_cls: the driver's frozen ``Config`` dataclass.
      default_out: output directory when ``--out`` is not given.
      extra: optional ``fn(parser)`` adding driver-specific flags.
      validate: optional ``fn(cfg)`` raising a ValueError for a bad config (:func:`check_config`).

    Bad input is refused here, before any compute, as a usage error (exit status 2) naming the
    flag or config field: the config (:func:`check_config`) and an ``--out`` that cannot be
    created or written (:func:`check_out`).
    """
    names = presets(driver)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="config file (defines get_config())")
    p.add_argument("--preset", default=None,
                   help=f"shortcut for --config configs/{driver}_<preset>.py: {', '.join(names)} "
                        "(default: quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the finished cells and checkpoints of an earlier run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--mesh", default="none", metavar="none|all|N",
                   help="data-parallel device mesh for training and unlearning: 'all' devices, the "
                        "first N, or 'none' (one device; default)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.config is not None and args.preset is not None:
        p.error("pass --config or --preset, not both")
    if args.config is None:
        args.preset = args.preset or "quick"
        args.config = config_path(driver, args.preset)
        if not os.path.isfile(args.config):
            p.error(f"unknown preset {args.preset!r}; choose from {', '.join(names)} "
                    "or pass --config FILE")
    name = args.preset or os.path.splitext(os.path.basename(args.config))[0].removeprefix(f"{driver}_")
    try:
        cfg = apply_overrides(load_config(args.config, config_cls), args.set)
        check_config(cfg, validate)
        check_out(args.out)
        set_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    return args, cfg, name


# ----------------------------------------------------------------------------- devices

MESH = None  # the drivers' data-parallel mesh (``--mesh``); None: one device


def set_mesh(spec: str):
    """Set :data:`MESH` from ``--mesh``: ``"none"``, ``"all"`` or a device count; logs the devices."""
    global MESH
    import jax

    from jaxunlearn import sharding

    spec = str(spec).strip().lower()
    if spec in ("none", "0", "1", ""):
        MESH = None
    else:
        devices = jax.devices()
        count = len(devices) if spec == "all" else int(spec) if spec.isdigit() else -1
        if not 1 <= count <= len(devices):
            raise ValueError(f"--mesh {spec!r}: expected none, all or a device count in "
                             f"[1, {len(devices)}]")
        MESH = sharding.data_mesh(devices[:count])
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} (process "
          f"{jax.process_index()} of {jax.process_count()}); data mesh: "
          f"{'none' if MESH is None else dict(MESH.shape)}", flush=True)
    return MESH


# ----------------------------------------------------------------------------- builders


def cosine_adam(lr: float, *, epochs: int, n: int, batch_size: int):
    """Adam with a cosine decay of ``lr`` to 0 over ``epochs`` passes of ``n`` samples."""
    import optax

    from jaxunlearn import data

    return optax.adam(optax.cosine_decay_schedule(lr, epochs * data.num_batches(n, batch_size)))


def make_optimizer(name: str, lr: float, *, steps: int | None = None, momentum: float | None = None,
                   weight_decay: float = 0.0):
    """``sgd`` (PyTorch style, :func:`jaxunlearn.methods.base.sgd`) or ``adam``, with L2 weight
    decay added to the gradient; ``lr`` cosine-decayed to 0 over ``steps`` updates when given,
    constant otherwise."""
    import optax

    from jaxunlearn.methods import base

    schedule = lr if steps is None else optax.cosine_decay_schedule(lr, max(int(steps), 1))
    if name == "sgd":
        return base.sgd(schedule, momentum=momentum or None, weight_decay=weight_decay)
    if name == "adam":
        tx = optax.adam(schedule)
        return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def build_model(kind: str, input_shape, num_classes: int, **kw):
    """A built-in model by name: ``lr``, ``mlp`` (``hidden``), ``resnet18``/``resnet50``
    (``width``, optional ``stem``), ``vit`` (``patch_size``, ``depth``, ``width``, ``heads``,
    ``mlp_dim``). Binary tasks get one logit."""
    from jaxunlearn import models

    shape = tuple(input_shape)
    k = 1 if num_classes == 2 else num_classes
    size = int(np.prod(shape))
    if kind == "lr":
        return models.logistic_regression(size, k)
    if kind == "mlp":
        return models.mlp(size, k, **({"hidden": tuple(kw["hidden"])} if kw.get("hidden") else {}))
    if kind in ("resnet18", "resnet50"):
        return getattr(models, kind)(shape, k, width=kw["width"],
                                     **({"stem": kw["stem"]} if "stem" in kw else {}))
    if kind == "vit":
        return models.small_vit(shape, k, patch_size=kw["patch_size"], depth=kw["depth"],
                                width=kw["width"], heads=kw["heads"], mlp_dim=kw["mlp_dim"])
    raise ValueError(f"unknown model {kind!r}; choose lr, mlp, resnet18, resnet50 or vit")


INPUTS = ("memory", "stream")
TFDS_IMAGES = ("celeb_a", "cifar10", "cifar100")  # the datasets that can be streamed


def check_input(input: str, name: str) -> bool:
    """Whether dataset ``name`` is streamed: ``input`` is ``"memory"`` (arrays, the default for
    small data) or ``"stream"`` (a TFDS array_record image dataset read batch by batch with grain;
    :func:`jaxunlearn.data.streaming.streamed_split`).

    Raises:
      ValueError: an unknown ``input``, or ``"stream"`` for a dataset that is not TFDS images.
    """
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
    if input == "stream" and name not in TFDS_IMAGES:
        raise ValueError(f"input='stream' reads TFDS array_record images ({', '.join(TFDS_IMAGES)}); "
                         f"{name!r} is loaded into memory: set input='memory'")
    return input == "stream"


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0, image_size: int = 32,
                 max_train: int | None = None, input: str = "memory", progress: bool = False):
    """A dataset by name. ``adult``, ``digits`` and ``digits_spurious`` are embedded; the others
    read ``data_dir`` (``bank``, ``german``: the UCI files; ``celeb_a``, ``civil_comments``,
    ``cifar10``, ``cifar100``: TFDS; ``waterbirds``, ``fairface``: metadata CSV + images at
    ``image_size``). ``max_train`` subsamples Adult's training split and caps the TFDS datasets'
    examples. ``input="stream"`` (:func:`check_input`) returns the TFDS image datasets with
    streamed splits: labels in memory, images read from the array_record files batch by batch by
    :func:`jaxunlearn.loop.run` and :mod:`jaxunlearn.evaluation` (on the ``--mesh``, each process
    reading its slice of every batch)."""
    import jax

    from jaxunlearn import data

    stream = check_input(input, name)
    if name == "adult":
        ds = data.load_adult(data_dir, seed=seed)
        if max_train is not None:
            rows = data.subsample_rows(len(ds.train["y"]), max_train, key=jax.random.key(seed))
            ds = dataclasses.replace(ds, train=data.take(ds.train, rows))
        return ds
    if name == "digits":
        return data.load_digits()
    if name == "digits_spurious":
        return data.load_digits_spurious()
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from a directory: pass --data-dir")
    if name == "bank":
        return data.load_bank(data_dir, seed=seed)
    if name == "german":
        return data.load_german(data_dir, seed=seed)
    tfds_kw = dict(data_dir=data_dir, max_examples=max_train, progress=progress)
    if name == "celeb_a":
        return data.load_celeb_a(size=image_size, stream=stream, **tfds_kw)
    if name == "civil_comments":
        return data.load_civil_comments(**tfds_kw)
    if name == "cifar10":
        return data.load_cifar10(seed=seed, stream=stream, **tfds_kw)
    if name == "cifar100":
        return data.load_cifar100(stream=stream, **tfds_kw)
    if name == "waterbirds":
        return data.load_waterbirds(data_dir, size=image_size)
    if name == "fairface":
        return data.load_fairface(data_dir, size=image_size)
    raise ValueError(f"unknown dataset {name!r}")


def train_model(model, split: dict, optimizer, *, epochs: int, batch_size: int, l2: float, init_key,
                key, checkpoints=None, progress: bool = True, desc: str | None = None,
                variables=None):
    """Train ``model`` from ``model.init(init_key, x[:1])`` (or from ``variables`` when given) on
    ``split`` with :func:`jaxunlearn.methods.train` through :func:`jaxunlearn.loop.run` (shuffles
    from ``key``).

    Returns:
      ``(variables, history)`` (history: one dict per epoch, :func:`jaxunlearn.loop.run`).
    """
    from jaxunlearn import loop, methods

    trainer = methods.train(model.apply, optimizer, l2=l2)
    if variables is None:
        variables = model.init(init_key, np.asarray(split["x"][:1]))
    variables, _, history = loop.run(trainer, variables, {"train": split}, epochs=epochs,
                                     batch_size=batch_size, key=key, mesh=MESH,
                                     checkpoints=checkpoints, progress=progress, desc=desc)
    return variables, history


def _atomic_write(path: str, data: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    _atomic_write(path, text)


def _jsonable(o: Any):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "shape") and hasattr(o, "dtype"):  # jax arrays
        return np.asarray(o).tolist()
    if isinstance(o, float) and not np.isfinite(o):
        return None if np.isnan(o) else ("inf" if o > 0 else "-inf")
    return o


_KILL_ENV = "JAXUNLEARN_KILL_AFTER_RESULTS"  # tests: die like kill -9 after the N-th results.json
_results_written = 0


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy/jax values converted).

    For kill-and-resume tests, ``JAXUNLEARN_KILL_AFTER_RESULTS=N`` in the environment ends the
    process abruptly (``os._exit(137)``, no cleanup, as ``kill -9``) right after the N-th
    ``results.json`` written.
    """
    global _results_written
    _atomic_write(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    if os.path.basename(path) == "results.json" and os.environ.get(_KILL_ENV):
        _results_written += 1
        if _results_written >= int(os.environ[_KILL_ENV]):
            os._exit(137)


def resume_rows(path: str, signature: dict) -> list[dict]:
    """The rows of an interrupted run at ``path`` (a ``results.json``), if it ran ``signature``.

    Drivers write ``{"signature": ..., "rows": [...]}`` after each finished unit of work, so the
    rows found here are complete units. Returns ``[]`` when there is no file yet.

    Raises:
      ValueError: the file is unreadable, or it was written by a run with another signature
        (naming the keys that differ), so that results of two configurations never mix.
    """
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume from {path}: {e}; remove it or pass --fresh") from None
    want = json.loads(json.dumps(_jsonable(signature)))
    have = saved.get("signature")
    if have != want:
        if not isinstance(have, dict):
            raise ValueError(f"{path} has no run signature; remove it or pass --fresh")
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(diff)}); "
                         "pass --fresh to start over or choose another --out")
    rows = saved.get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds no list of rows; remove it or pass --fresh")
    return rows


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Write a list of flat dicts as CSV atomically (columns in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: _jsonable(v) for k, v in r.items()})
    _atomic_write(path, buf.getvalue())


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Iterable[str] | None = None, *,
                   digits: int = 4) -> str:
    """Render flat dicts as a GitHub Markdown table."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, ""), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


@contextmanager
def timer(store: dict, name: str):
    """Add the wall time of the block, in seconds, to ``store[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[name] = store.get(name, 0.0) + time.perf_counter() - t0


def environment() -> dict:
    """The software and hardware facts a result should carry."""
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def savefig(fig, path: str) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
