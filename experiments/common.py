"""What every experiment driver shares: the command line, atomic result files, Markdown tables.

Every driver has the shape ``python -m experiments.<name> [--preset quick|paper] [--out DIR]`` and
writes ``DIR/results.json`` and ``DIR/report.md`` (plus CSV tables and PNG plots where useful).
Files are written to a temporary name and renamed, so an interrupted run never leaves a truncated
result behind.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import time
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["parse_args", "write_text", "write_json", "write_csv", "resume_rows", "markdown_table",
           "timer", "environment", "savefig"]


def parse_args(description: str, *, presets: Sequence[str] = ("quick", "paper"),
               default_out: str, extra=None, argv=None) -> argparse.Namespace:
    """The standard driver command line: ``--preset``, ``--out`` and ``--seed``.

    Args:
      description: shown by ``--help``.
      presets: allowed preset names (the first is the default).
      default_out: output directory when ``--out`` is not given.
      extra: optional ``fn(parser)`` adding driver-specific flags.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=list(presets), default=presets[0],
                   help="size of the run (default: %(default)s)")
    p.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


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


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy/jax values converted)."""
    _atomic_write(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


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
