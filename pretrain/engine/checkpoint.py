"""Training checkpoints: ``OUTPUT_DIR/checkpoint_{iteration}.pth``, written atomically, pruned to
the last K plus pinned ones, and validated on load.

A checkpoint is a plain dict whose ``model`` entry is the model's state dict, as in official
VirTex checkpoints (so official tools and ours read each other's model weights). Files are read
with ``torch.load(weights_only=True)``: no pickled code is ever executed. A file that does not
load, or lacks the required entries, is reported with its path; :meth:`CheckpointManager.
load_latest` then falls back to the previous valid checkpoint.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")
REQUIRED_KEYS = ("model", "iteration")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (corrupt, truncated or incomplete)."""


def checkpoint_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / f"checkpoint_{iteration}.pth"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``checkpoint_N.pth`` in ``output_dir``, oldest first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one checkpoint (tensors on the CPU); :class:`CheckpointError` names the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad magic, disallowed global, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(state).__name__}, not dict)")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


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
        for stale in self.output_dir.glob(".checkpoint_*.pth.*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        path = checkpoint_path(self.output_dir, iteration)
        atomic_save({**state, "iteration": iteration}, path)
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
                state = load_checkpoint(path)
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
