"""detectron2's checkpointer reading files as data, never as code.

:class:`SafeDetectionCheckpointer` routes detectron2's own loading (``MODEL.WEIGHTS``,
``--resume``) through :func:`pretrain.checkpoint_io.read_checkpoint`: ``torch.load(...,
weights_only=True)``, and a file that would need arbitrary unpickling (a pickled object, a raw
pickle such as detectron2's ``.pkl`` model-zoo files) is refused with an explanation unless the
user explicitly opts in.
"""
from __future__ import annotations

from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer

from pretrain.checkpoint_io import (
    UNSAFE_OPT_IN_FLAG,
    UnsafeCheckpointError,
    read_checkpoint,
)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, reading every file through :func:`~pretrain.checkpoint_io.read_checkpoint`.

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
        return read_checkpoint(f, allow_unsafe_pickle=self.allow_unsafe_pickle)
