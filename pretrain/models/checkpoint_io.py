"""Reading model weights from checkpoint files, safely and with errors that name the file.

Official VirTex checkpoints and ours are both plain dicts whose ``"model"`` entry is the
model's state dict (official ones also hold ``optimizer``, ``scheduler``, ``scaler`` and
``iteration``). Files are read with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers: a file that needs arbitrary unpickling (which could run any
code) is refused rather than trusted.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable, unsafe, or not shaped as expected."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: refusing to load: the file contains Python objects that need arbitrary "
                "unpickling, which can execute code. Only tensors and plain containers are "
                "accepted (torch.load(weights_only=True)); re-save the weights as a plain "
                f"state dict. Details: {err}"
            ) from err
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt?): {err}") from err
    except Exception as err:  # torch's readers fail on damaged bytes with many exception types
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
            f"{type(err).__name__}: {err}"
        ) from err


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of an official VirTex checkpoint or one of ours."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{os.fspath(path)}: expected a dict with a 'model' entry, got {type(checkpoint).__name__}"
        )
    if "model" not in checkpoint:
        raise CheckpointError(
            f"{os.fspath(path)}: no 'model' entry (found keys: {sorted(map(str, checkpoint))})"
        )
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(f"{os.fspath(path)}: 'model' is not a state dict of named tensors")
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load the model weights of checkpoint ``path`` into ``model``.

    Shared/tied tensors receive the same value from each of their aliased keys. Missing or
    unexpected keys and shape mismatches raise :class:`CheckpointError` naming the file.
    """
    state = load_model_state(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{os.fspath(path)}: does not fit the model: {err}") from err
