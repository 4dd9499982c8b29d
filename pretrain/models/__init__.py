"""VirTex pretraining models and their config builders (:mod:`.factory`).

Code outside the task table builds a model only through :func:`pretrain.tasks.build_model`.
"""
from .decoding import BeamSearch, NucleusSampling
from .factory import build_decoder

__all__ = ["BeamSearch", "NucleusSampling", "build_decoder"]
