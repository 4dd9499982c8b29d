"""Checkpoints of a training run: ``OUTPUT_DIR/checkpoint_{iteration}.pth``, pruned to the last
K plus pinned ones, and the newest usable one found on resume.

Reading, naming and atomic writing are :mod:`pretrain.checkpoint_io`'s; this module only keeps
one run's folder tidy. A file that does not load, or lacks the required entries, is reported
with its path and :meth:`CheckpointManager.load_latest` falls back to the previous valid one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pretrain.checkpoint_io import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    read_training_checkpoint,
    save_checkpoint,
)
from pretrain.files import remove_stale_temporaries

logger = logging.getLogger(__name__)


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
            kept = f"the previous checkpoint {saved[-1][1]} is intact" if saved else "no earlier checkpoint exists"
            raise OSError(err.errno, f"{path}: {err.strerror or err}; nothing was written, {kept}") from err
        self._prune()
        return path

    def _prune(self) -> None:
        unpinned = [(it, path) for it, path in list_checkpoints(self.output_dir) if it not in self.pinned]
        for _, path in unpinned[: max(0, len(unpinned) - self.keep_last)]:
            path.unlink(missing_ok=True)

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads and validates, or None if there is none.

        Every unusable newer file is logged as an error with its path and the reason, followed by
        a warning naming the checkpoint that is used instead.
        """
        rejected = []
        for iteration, path in reversed(list_checkpoints(self.output_dir)):
            try:
                state = read_training_checkpoint(path)
            except CheckpointError as err:
                logger.error("%s", err)
                rejected.append(path)
                continue
            if state["iteration"] != iteration:
                logger.error("%s: file name says iteration %d, contents say %s", path, iteration, state["iteration"])
                rejected.append(path)
                continue
            if rejected:
                logger.warning(
                    "resuming from %s instead: newer checkpoint(s) %s are unusable",
                    path,
                    ", ".join(str(p) for p in rejected),
                )
            return state
        if rejected:
            logger.warning("no usable checkpoint in %s (rejected: %s)", self.output_dir, ", ".join(map(str, rejected)))
        return None
