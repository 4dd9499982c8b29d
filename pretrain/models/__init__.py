"""VirTex pretraining models. Other code builds them only through :func:`build_model`."""
from .checkpoint_io import (
    CheckpointError,
    load_model_state,
    load_model_weights,
    read_checkpoint,
)
from .decoding import BeamSearch, NucleusSampling
from .factory import build_decoder, build_model, list_models, register_model

__all__ = [
    "BeamSearch",
    "CheckpointError",
    "NucleusSampling",
    "build_decoder",
    "build_model",
    "list_models",
    "load_model_state",
    "load_model_weights",
    "read_checkpoint",
    "register_model",
]
