"""Progress bars for long loops (tqdm when installed and enabled, else the bare iterable)."""

from __future__ import annotations

from typing import Iterable

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable, *, desc: str, enabled: bool = True, total: int | None = None,
                 **kwargs):
    """``iterable`` wrapped in a transient tqdm bar; tqdm is an optional (experiments) dependency."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, **kwargs)
