"""Checkpoint files: the one place that reads, names and writes them.

Official VirTex checkpoints and ours are plain dicts whose ``model`` entry is the model's state
dict (official ones also hold ``optimizer``, ``scheduler``, ``scaler`` and ``iteration``).
Every checkpoint the project reads goes through :func:`read_checkpoint`, which uses
``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt, and a file
that needs arbitrary unpickling (which could run any code) is refused unless the caller opts in
explicitly (``--allow-unsafe-pickle`` on the command line). Every error is a
:class:`CheckpointError` whose message starts with the file's path. Files are written with
:func:`save_checkpoint`, atomically (:mod:`pretrain.files`).

``weights_only=True`` is only as safe as torch's own unpickler, which had published bypasses:
CVE-2025-32434 (GHSA-53q9-r3pm-6pq6: code execution, torch < 2.6.0) and CVE-2026-24747
(GHSA-63cw-57p8-fm3p: memory corruption to code execution, torch < 2.10.0). On a torch older
than :data:`SAFE_TORCH` (setup.py's floor) nothing is read: :class:`UnsafeTorchError` says
which torch is installed and what to upgrade.

Training runs name their checkpoints ``checkpoint_{iteration}.pth`` (:func:`checkpoint_path`).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from pretrain.errors import InputError, OutputExistsError
from pretrain.files import atomic_write

logger = logging.getLogger(__name__)

UNSAFE_OPT_IN_FLAG = "--allow-unsafe-pickle"
#: The oldest torch (major, minor) whose weights_only unpickler has no published bypass.
SAFE_TORCH = (2, 10)
SAFE_TORCH_PINS = "torch>=2.10 torchvision>=0.25"
TRAINING_CHECKPOINT_KEYS = ("model", "iteration")
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")


class CheckpointError(InputError, ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, truncated or of the wrong shape."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be read by running arbitrary pickled code."""


class UnsafeTorchError(InputError, RuntimeError):
    """The installed torch cannot be trusted to read checkpoints as data only.

    Not a :class:`CheckpointError`: nothing is wrong with any file, so a resume must not set
    files aside as damaged because of it.
    """


def check_torch_is_safe(version: str | None = None) -> None:
    """Raise :class:`UnsafeTorchError` unless torch ``version`` (default: the installed one) is
    at least :data:`SAFE_TORCH`, naming the version and the upgrade."""
    version = str(version or torch.__version__)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < SAFE_TORCH:
        raise UnsafeTorchError(
            f"torch {version} is installed, whose torch.load(weights_only=True) can be made to run code "
            f"hidden in a checkpoint (CVE-2025-32434, CVE-2026-24747); no checkpoint is read with it: "
            f"upgrade with pip install '{SAFE_TORCH_PINS.split()[0]}' '{SAFE_TORCH_PINS.split()[1]}'"
        )


# ---------------------------------------------------------------------------------------------
# Names


def checkpoint_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    """``output_dir/checkpoint_{iteration}.pth``."""
    return Path(output_dir) / f"checkpoint_{iteration}.pth"


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """The iteration in a ``checkpoint_N.pth`` file name, or None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``checkpoint_N.pth`` in ``output_dir``, oldest first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(checkpoint_iteration(path), path) for path in directory.iterdir()]
    return sorted((iteration, path) for iteration, path in found if iteration is not None)


# ---------------------------------------------------------------------------------------------
# Reading


def _looks_like_torch_file(path: Path) -> bool:
    """True for torch.save's zip format and for pickles (torch's legacy format starts with one)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"  # zip local header / pickle protocol 2+


def _unsafe_reason(error: Exception) -> str:
    """The line of torch's weights_only error that names what the file wanted to run."""
    for line in str(error).splitlines():
        if "GLOBAL" in line:
            return line.strip()
    return "it is not a tensor-only checkpoint written by torch.save (e.g. a raw pickle)"


def read_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """The contents of a checkpoint file, tensors on the CPU, read as data only.

    ``allow_unsafe_pickle=True`` retries a refused file with full unpickling (logged); only for
    files from a trusted source. Raises :class:`UnsafeCheckpointError` for a refused file and
    :class:`CheckpointError` for a missing, empty, corrupt or truncated one; an ``OSError`` while
    reading is raised as it is (the file's bytes were not judged). On a torch older than
    :data:`SAFE_TORCH` it raises :class:`UnsafeTorchError` before opening the file.
    """
    check_torch_is_safe()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err) and "Unsupported" not in str(err):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {_first_line(err)}") from err
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: reading it needs arbitrary unpickling, which can run "
                f"code hidden in the file ({_unsafe_reason(err)}). Checkpoints are read as data "
                f"(torch.load(weights_only=True)). If you trust the file's source, opt in with "
                f"{UNSAFE_OPT_IN_FLAG}."
            ) from None
        logger.warning("%s: loading with full unpickling (%s was given)", path, UNSAFE_OPT_IN_FLAG)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (*DAMAGED_BYTES, ImportError, AttributeError) as err2:  # also a class the pickle names but no module has
            raise CheckpointError(f"{path}: corrupt checkpoint: {_first_line(err2)}") from err2
    except OSError:  # the file could not be read (e.g. a network filesystem's fault): nothing is known of its bytes
        raise
    except DAMAGED_BYTES as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {_first_line(err)}") from err


#: what torch's readers raise on damaged bytes: a broken zip archive (RuntimeError from its
#: stream reader), a cut or garbled pickle. Anything else (a TypeError from how we call it, a
#: MemoryError) is not the file's fault and is raised as it is.
DAMAGED_BYTES = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError, struct.error,
                 zipfile.BadZipFile, KeyError, IndexError)


def _first_line(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint of a training run: a dict holding at least ``model`` and ``iteration``."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(state).__name__}, not dict)")
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of an official VirTex checkpoint or one of ours."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry, got {type(checkpoint).__name__}")
    if "model" not in checkpoint:
        raise CheckpointError(f"{path}: no 'model' entry (found keys: {sorted(map(str, checkpoint))})")
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(f"{path}: 'model' is not a state dict of named tensors")
    return state


def _visual_kind(state: dict) -> str | None:
    """"ViT" (``visual.vit.*``), "ResNet" (``visual.cnn.*``) or None for a model state dict."""
    for prefix, kind in (("visual.vit.", "ViT"), ("visual.cnn.", "ResNet")):
        if any(key.startswith(prefix) for key in state):
            return kind
    return None


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load the model weights of checkpoint ``path`` into ``model``.

    Shared/tied tensors receive the same value from each of their aliased keys. Missing or
    unexpected keys and shape mismatches raise :class:`CheckpointError` naming the file.
    """
    state = load_model_state(path)
    held, built = _visual_kind(state), _visual_kind(model.state_dict())
    if held and built and held != built:  # say so in a line, not in torch's list of every key
        raise CheckpointError(
            f"{path}: holds a {held} visual backbone, but the config's MODEL.VISUAL.NAME builds a {built}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit the model: {err}") from err


# ---------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(obj: Any, path: str | os.PathLike, force: bool = False) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, creating its folder; returns ``path``.

    With ``force=False`` an existing ``path`` is kept and ``FileExistsError`` raised.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        _save_raising_write_faults(obj, handle)
    return path


def unwritten_checkpoint_error(error: OSError, path: str | os.PathLike, previous: str | os.PathLike | None) -> OSError:
    """The ``OSError`` to raise when :func:`save_checkpoint` of ``path`` failed with ``error`` (a
    full disk): of the same errno (so that the tools tell it in one line), naming
    the file, saying that nothing was written and which earlier checkpoint, ``previous`` (None:
    none), is intact, as the atomic writer left it."""
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return OSError(error.errno, f"{path}: {error.strerror or error}; nothing was written, {kept}")


class _WriteFaultRecorder:
    """A binary handle for ``torch.save`` that keeps the first ``OSError`` its ``write()`` raised.

    torch's zip writer does not let that error out: a full disk (``ENOSPC``), a quota or a file
    size limit ends ``torch.save`` in ``RuntimeError: [enforce fail at inline_container.cc] ...
    unexpected pos``, which names neither the cause nor the file.
    """

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self.fault: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            if self.fault is None:
                self.fault = err
            raise

    def flush(self) -> None:
        self._handle.flush()


def _save_raising_write_faults(obj: Any, handle: IO[bytes]) -> None:
    """``torch.save(obj, handle)``; if it fails after a ``write()`` to ``handle`` failed, that
    write's ``OSError`` is raised instead of torch's own error, so callers see a full disk as the
    ``OSError`` it is. torch's errors with no failed write behind them are raised as they are."""
    recorder = _WriteFaultRecorder(handle)
    try:
        torch.save(obj, recorder)
    except Exception:
        if recorder.fault is None:
            raise
        raise recorder.fault
