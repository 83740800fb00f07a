"""Orbax checkpoints of any pytree (a TrainState, unlearning state, ...), restored into abstract targets.

Saves are atomic (Orbax writes to a temporary directory and renames it), so an interrupted run
never leaves a half-written checkpoint behind; :meth:`Checkpointer.restore_latest` resumes from the
newest complete one. Restoring always goes through an abstract target built from a template
(``ocp.utils.to_shape_dtype_struct``), so optax NamedTuples come back as NamedTuples, and a
checkpoint whose tree structure, shapes or dtypes differ from the template is refused with an
error that names the first mismatching leaf.

A checkpoint can also carry a JSON-able dict next to the tree (``metadata``: the loop's history so
far, the streaming input's iterator state ``{"epoch", "step"}`` of
:class:`jaxunlearn.data.streaming.StreamingLoader`, ...):
both are items of one Orbax composite checkpoint (``default``: the tree, ``data_iterator``: the
JSON), committed together, so a restored train state always comes with the iterator position it
was saved at.

A checkpoint whose files are damaged (garbled or truncated array files, a crash of the storage
rather than of the run) raises :class:`CheckpointCorruptError`; :meth:`Checkpointer.restore_latest`
then falls back to the newest readable checkpoint with a warning naming the bad step (and deletes
it, so that the resumed run can write that step again), and raises one clear error naming the
directory when none is readable.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointMismatchError", "CheckpointCorruptError", "tree_signature"]


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not match the tree it is restored into."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files cannot be read (garbled or truncated)."""


@contextlib.contextmanager
def _quiet_failures():
    """Hide the "Exception ignored in <coroutine ...>" reports of Orbax's abandoned asynchronous
    reads when a restore fails (the failure itself is raised once, as a clear error)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


def tree_signature(tree) -> dict[str, str]:
    """``{leaf path: "dtype[shape]"}`` for every array leaf of ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf) if not hasattr(leaf, "shape") else leaf
        out[jax.tree_util.keystr(path)] = f"{np.dtype(arr.dtype).name}{list(arr.shape)}"
    return out


class Checkpointer:
    """Numbered checkpoints of one pytree under a directory.

    Args:
      directory: where the checkpoints live (created if missing).
      max_to_keep: how many of the newest checkpoints to keep.
    """

    SIGNATURE = "signature.json"
    TREE = "default"  # the item name Orbax gives a single-item checkpoint (older checkpoints)
    DATA = "data_iterator"

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                enable_async_checkpointing=False),
            item_handlers={self.TREE: ocp.StandardCheckpointHandler(),
                           self.DATA: ocp.JsonCheckpointHandler()},
        )

    def save(self, step: int, tree: Any, *, metadata: dict | None = None) -> None:
        """Save ``tree`` (and ``metadata``) as checkpoint ``step``; wait until it is on disk.

        Args:
          step: checkpoint number.
          tree: the pytree (train state, method state, ...).
          metadata: optional JSON-able dict saved in the same checkpoint, e.g. a data
            iterator's state (:meth:`metadata`).
        """
        items = {self.TREE: ocp.args.StandardSave(tree)}
        if metadata is not None:
            try:
                json.dumps(metadata)
            except TypeError as e:
                raise ValueError(f"metadata must be a JSON-able dict, got {metadata!r}: {e}") from e
            items[self.DATA] = ocp.args.JsonSave(dict(metadata))
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()
        sig_path = os.path.join(self.directory, self.SIGNATURE)
        tmp = sig_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(tree_signature(tree), f, indent=1, sort_keys=True)
        os.replace(tmp, sig_path)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, template: Any) -> Any:
        """Restore checkpoint ``step`` into the structure, shapes and dtypes of ``template``.

        Raises:
          CheckpointMismatchError: the checkpoint holds another tree (another model/state).
          CheckpointCorruptError: its files cannot be read.
        """
        signed = self._check_signature(template)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        try:
            with _quiet_failures():
                restored = self._manager.restore(
                    int(step), args=ocp.args.Composite(**{self.TREE: ocp.args.StandardRestore(abstract)}))
            return restored[self.TREE]
        except (ValueError, KeyError, TypeError) as e:
            if not signed:  # no signature on disk: a structural error is most likely a mismatch
                raise CheckpointMismatchError(
                    f"checkpoint {step} in {self.directory} does not match the model/state it is "
                    f"restored into: {e}") from None
            raise self._corrupt(step, e) from None
        except Exception as e:  # noqa: BLE001 -- TensorStore reports unreadable data as Exception
            raise self._corrupt(step, e) from None

    def _corrupt(self, step, e) -> CheckpointCorruptError:
        detail = str(e).split("See full TensorStore details")[0].strip()[:300]
        return CheckpointCorruptError(
            f"checkpoint {step} in {self.directory} is unreadable (corrupt or truncated files: "
            f"{type(e).__name__}: {detail}); delete it, or rerun with --fresh to start over")

    def metadata(self, step: int) -> dict | None:
        """The ``metadata`` saved with checkpoint ``step``, or None if it was saved without.

        Raises:
          FileNotFoundError: no checkpoint ``step``.
          CheckpointCorruptError: its metadata cannot be read.
        """
        if int(step) not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory}")
        try:
            with _quiet_failures():
                restored = self._manager.restore(
                    int(step), args=ocp.args.Composite(**{self.DATA: ocp.args.JsonRestore()}))
        except KeyError:  # saved without metadata
            return None
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from None
        return dict(restored[self.DATA])

    def restore_latest(self, template: Any) -> tuple[int, Any] | None:
        """``(step, tree)`` of the newest readable checkpoint, or None if there is none.

        A checkpoint that cannot be read (tree or metadata) is skipped with a warning naming it,
        and deleted, so that the resumed run can save that step again.

        Raises:
          CheckpointMismatchError: the checkpoints hold another model/state.
          CheckpointCorruptError: there are checkpoints but none is readable (the message names
            the directory and ``--fresh``).
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        bad = []
        for step in steps:
            try:
                tree = self.restore(step, template)
                self.metadata(step)
            except CheckpointCorruptError as e:
                warnings.warn(str(e).split("; delete it")[0] + "; falling back to the newest "
                              "readable older checkpoint (the bad one is deleted)", RuntimeWarning,
                              stacklevel=2)
                bad.append(step)
                continue
            for b in bad:
                self._manager.delete(b)
            return step, tree
        if bad:
            raise CheckpointCorruptError(
                f"no readable checkpoint in {self.directory} (checkpoints {bad} are corrupt or "
                "truncated); delete the directory or rerun with --fresh to start over")
        return None

    def _check_signature(self, template) -> bool:
        """True if the directory's signature matches ``template``; False if there is none."""
        sig_path = os.path.join(self.directory, self.SIGNATURE)
        if not os.path.exists(sig_path):
            return False
        try:
            with open(sig_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return False  # an unreadable signature proves nothing either way
        want = tree_signature(template)
        if saved == want:
            return True
        missing = sorted(set(want) - set(saved))
        extra = sorted(set(saved) - set(want))
        differ = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
        parts = []
        if differ:
            k = differ[0]
            parts.append(f"leaf {k} is {saved[k]} on disk but {want[k]} in the model")
        if missing:
            parts.append(f"{len(missing)} leaves missing from the checkpoint (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected leaves in the checkpoint (first: {extra[0]})")
        raise CheckpointMismatchError(
            f"checkpoint in {self.directory} does not match the model: " + "; ".join(parts))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
