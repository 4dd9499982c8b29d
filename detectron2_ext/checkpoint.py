"""Reading and writing checkpoints as data, never as code.

Every checkpoint our tools read goes through :func:`load_checkpoint`, which uses
``torch.load(..., weights_only=True)``: a file that would need arbitrary unpickling (a pickled
object, a raw pickle such as detectron2's ``.pkl`` model-zoo files) is refused with an
explanation unless the caller explicitly opts in. :class:`SafeDetectionCheckpointer` routes
detectron2's own loading (``MODEL.WEIGHTS``, ``--resume``) through the same rules, and
:func:`save_checkpoint` writes files that load that way, atomically.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer

from pretrain.engine.checkpoint import atomic_save

logger = logging.getLogger(__name__)

UNSAFE_OPT_IN_FLAG = "--allow-unsafe-pickle"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: missing, corrupt or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be read by running arbitrary pickled code."""


def _looks_like_torch_file(path: Path) -> bool:
    """True for torch.save's zip format and for pickles (torch's legacy format starts with one)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"  # zip local header / pickle protocol 2+


def _unsafe_reason(error: Exception) -> str:
    """The line of torch's weights_only error that names what the file wanted to run."""
    for line in str(error).splitlines():
        if "GLOBAL" in line:
            return line.strip()
    return "it is not a tensor-only checkpoint written by torch.save (e.g. a raw pickle)"


def load_checkpoint(path, allow_unsafe_pickle: bool = False):
    """Load a checkpoint on CPU with ``weights_only=True``.

    ``allow_unsafe_pickle=True`` retries a refused file with full unpickling; only do that for
    files from a trusted source. Raises :class:`UnsafeCheckpointError` for a refused file and
    :class:`CheckpointError` for a missing, empty or corrupt one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: reading it needs arbitrary unpickling, which can run "
                f"code hidden in the file ({_unsafe_reason(e)}). Checkpoints are read as data "
                f"(torch.load(weights_only=True)). If you trust the file's source, opt in with "
                f"{UNSAFE_OPT_IN_FLAG}."
            ) from None
        logger.warning("%s: loading with full unpickling (%s was given)", path, UNSAFE_OPT_IN_FLAG)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # a corrupt pickle raises anything from EOFError to ImportError
            raise CheckpointError(f"{path}: corrupt checkpoint: {e2}") from e2
    except (RuntimeError, EOFError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {first_line}") from e


def save_checkpoint(obj, path, force: bool = False) -> None:
    """Write ``obj`` atomically (pretrain's ``atomic_save``: temporary file, fsync, rename).

    An existing ``path`` is kept (``FileExistsError``) unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(obj, path)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, reading every file through :func:`load_checkpoint`.

    detectron2 reads ``.pkl`` files with plain ``pickle.load`` and others with a bare
    ``torch.load``; here ``.pkl``/``.pyth`` files are refused unless ``allow_unsafe_pickle``,
    and everything else is loaded with ``weights_only=True`` whatever torch's default is.
    """

    def __init__(self, model, save_dir="", *, allow_unsafe_pickle=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def _load_file(self, filename):
        if filename.endswith((".pkl", ".pyth")) and not self.allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{filename}: refusing to load: detectron2 reads {Path(filename).suffix} files "
                f"with plain pickle, which can run code hidden in the file. Convert the weights "
                f"to a .pth of tensors (tools/convert_backbone.py does so for ResNets), or opt in "
                f"with {UNSAFE_OPT_IN_FLAG} if you trust the file's source."
            )
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_checkpoint(f, allow_unsafe_pickle=self.allow_unsafe_pickle)
