"""detectron2's checkpointer reading files as data, never as code, and writing them atomically.

:class:`SafeDetectionCheckpointer` routes detectron2's own loading (``MODEL.WEIGHTS``,
``--resume``) through :func:`pretrain.checkpoint_io.read_checkpoint`: ``torch.load(...,
weights_only=True)``, and a file that would need arbitrary unpickling (a pickled object, a raw
pickle such as detectron2's ``.pkl`` model-zoo files) is refused with an explanation unless the
user explicitly opts in. Its saving goes through :func:`pretrain.checkpoint_io.save_checkpoint`:
fvcore writes a checkpoint in place, so a full disk left a truncated file that
``last_checkpoint``, and so ``--resume``, would pick up.
"""
from __future__ import annotations

from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer

from pretrain.checkpoint_io import (
    UNSAFE_OPT_IN_FLAG,
    UnsafeCheckpointError,
    read_checkpoint,
    save_checkpoint,
    unwritten_checkpoint_error,
)
from pretrain.files import remove_stale_temporaries, write_text_atomic


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, reading every file through :func:`~pretrain.checkpoint_io.read_checkpoint`
    and writing through :func:`~pretrain.checkpoint_io.save_checkpoint`.

    detectron2 reads ``.pkl`` files with plain ``pickle.load`` and others with a bare
    ``torch.load``; here ``.pkl``/``.pyth`` files are refused unless ``allow_unsafe_pickle``,
    and everything else is loaded with ``weights_only=True`` whatever torch's default is.
    ``loaded_path`` is the path the last :meth:`load` was given ("" for none).
    """

    def __init__(self, model, save_dir="", *, allow_unsafe_pickle=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.loaded_path = ""

    def load(self, path, *args, **kwargs):
        """detectron2's ``load``, keeping ``path`` as ``loaded_path``: after ``resume_or_load``, the
        file it chose (``--eval-only`` records which weights it evaluated)."""
        self.loaded_path = path or ""
        return super().load(path, *args, **kwargs)

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``save`` (``<save_dir>/<name>.pth`` of the model, the checkpointables and
        ``kwargs``, then ``last_checkpoint`` naming it), written atomically: if the write fails (a
        full disk), no partial file is left, ``last_checkpoint`` still names the previous one, and
        the ``OSError`` names the file and that previous checkpoint. Temporary files that a killed
        save left in ``save_dir`` are removed first."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{key: obj.state_dict() for key, obj in self.checkpointables.items()},
                **kwargs}
        path = Path(self.save_dir) / f"{name}.pth"
        remove_stale_temporaries(self.save_dir, "*.pth")
        self.logger.info("Saving checkpoint to %s", path)
        try:
            save_checkpoint(data, path, force=True)
        except OSError as err:
            raise unwritten_checkpoint_error(err, path, self.get_checkpoint_file() if self.has_checkpoint() else None) from err
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """fvcore's tag naming the newest checkpoint, written atomically (after the checkpoint)."""
        write_text_atomic(Path(self.save_dir) / "last_checkpoint", last_filename_basename)

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
        return read_checkpoint(f, allow_unsafe_pickle=self.allow_unsafe_pickle)
