"""Checkpoints of a training run: ``OUTPUT_DIR/checkpoint_{iteration}.pth``, pruned to the last
K plus pinned ones, and the newest usable one found on resume.

Reading, naming and atomic writing are :mod:`pretrain.checkpoint_io`'s; this module only keeps
one run's folder tidy. A file that does not load, or lacks the required entries, is reported
with its path, set aside, and :meth:`CheckpointManager.choose_latest` falls back to the previous
valid one; a file that cannot be read at all (``OSError``) is an error, never a fallback.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pretrain.checkpoint_io import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    read_training_checkpoint,
    save_checkpoint,
    unwritten_checkpoint_error,
)
from pretrain.files import remove_stale_temporaries

logger = logging.getLogger(__name__)

READ_ATTEMPTS = 3  # an OSError while reading a checkpoint is retried this often before it is raised
RETRY_DELAY_S = 2.0  # wait before the n-th retry: n times this


class CheckpointManager:
    """Saves ``checkpoint_{iteration}.pth`` into one folder and keeps it tidy.

    After each save only the newest ``keep_last`` checkpoints survive, plus those whose
    iteration is in ``pinned``. Files that do not match the naming pattern are never touched.
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int, pinned: list[int] = ()):
        if keep_last < 1:
            raise ValueError(f"ENGINE.KEEP_LAST_CHECKPOINTS must be >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.pinned = set(pinned)

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (which must hold ``model``) as the checkpoint of ``iteration``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.output_dir, "checkpoint_*.pth")
        path = checkpoint_path(self.output_dir, iteration)
        try:
            save_checkpoint({**state, "iteration": iteration}, path, force=True)
        except OSError as err:  # e.g. ENOSPC: the atomic writer has left the previous files as they were
            saved = list_checkpoints(self.output_dir)
            raise unwritten_checkpoint_error(err, path, saved[-1][1] if saved else None) from err
        self._prune()
        return path

    def _prune(self) -> None:
        unpinned = [(it, path) for it, path in list_checkpoints(self.output_dir) if it not in self.pinned]
        for _, path in unpinned[: max(0, len(unpinned) - self.keep_last)]:
            path.unlink(missing_ok=True)

    def read(self, iteration: int) -> dict[str, Any]:
        """The checkpoint of ``iteration``, validated; an ``OSError`` while reading (a transient
        network-filesystem fault) is retried a few times and then raised, never taken for a
        damaged file. A damaged file raises :class:`CheckpointError`."""
        path = checkpoint_path(self.output_dir, iteration)
        state = _read_retrying(path)
        if state["iteration"] != iteration:
            raise CheckpointError(f"{path}: file name says iteration {iteration}, contents say {state['iteration']}")
        return state

    def choose_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads and validates, or None if there is none.

        Only the main rank chooses (:func:`pretrain.engine.resume.agreed_resume_state` hands the
        choice to the others). Every damaged newer file is logged with its path and the reason
        and renamed to ``checkpoint_N.pth.rejected`` (kept for inspection): left in place, it
        would count as the newest checkpoint when the folder is pruned, and the resumed run would
        later write over it.
        """
        rejected = []
        for iteration, path in reversed(list_checkpoints(self.output_dir)):
            try:
                state = self.read(iteration)
            except CheckpointError as err:
                logger.error("%s", err)
                rejected.append(_set_aside(path))
                continue
            if rejected:
                logger.warning(
                    "resuming from %s instead: newer checkpoint(s) are damaged and were set aside as %s",
                    path,
                    ", ".join(str(p) for p in rejected),
                )
            return state
        if rejected:
            logger.warning("no usable checkpoint in %s (set aside: %s)", self.output_dir, ", ".join(map(str, rejected)))
        return None


def _read_retrying(path: Path) -> dict[str, Any]:
    """:func:`read_training_checkpoint`, retrying an ``OSError`` (the file could not be read; its
    bytes were not judged) a few times; a damaged file raises :class:`CheckpointError` at once."""
    error: OSError | None = None
    for attempt in range(READ_ATTEMPTS):
        if error is not None:
            logger.warning("%s: read failed (%s); retrying in %.0f s", path, error, attempt * RETRY_DELAY_S)
            time.sleep(attempt * RETRY_DELAY_S)
        try:
            return read_training_checkpoint(path)
        except OSError as err:
            error = err
    raise OSError(error.errno, f"{path}: could not be read ({error.strerror or error}) after {READ_ATTEMPTS} "
                               "attempts; the file itself was not judged") from error


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.rejected`` (``NAME.rejected.2``, ... if taken)."""
    target, n = path.with_name(path.name + ".rejected"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.rejected.{n}")
    path.rename(target)
    return target
