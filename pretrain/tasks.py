"""The task table: each ``MODEL.NAME`` with its model builder and its dataset builder, side by side.

This is the one extension point for a new pretraining task: register a model builder and a
dataset builder together (``register_task("my_task", build_my_model, build_my_dataset)``) and
``tools/pretrain.py`` trains it, with every feature of the loop. Everything else builds models
and datasets only through :func:`build_model` and :func:`build_dataset`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import Dataset

from pretrain.data.build import (
    build_caption_dataset,
    build_masked_lm_dataset,
    build_multilabel_dataset,
)
from pretrain.errors import BadValueError
from pretrain.models import factory
from pretrain.tokenizer import SentencePieceBPETokenizer

ModelBuilder = Callable[[CfgNode], nn.Module]
DatasetBuilder = Callable[[CfgNode, str, SentencePieceBPETokenizer], Dataset]


@dataclass(frozen=True)
class Task:
    """What one ``MODEL.NAME`` trains: the model and the samples it learns from."""

    build_model: ModelBuilder
    build_dataset: DatasetBuilder


_TASKS: dict[str, Task] = {}


def register_task(name: str, build_model: ModelBuilder, build_dataset: DatasetBuilder) -> None:
    """Make ``MODEL.NAME name`` build ``build_model(cfg)`` trained on ``build_dataset(cfg, split, tokenizer)``."""
    if name in _TASKS:
        raise ValueError(f"MODEL.NAME '{name}' is already registered")
    _TASKS[name] = Task(build_model, build_dataset)


def list_tasks() -> list[str]:
    """Every accepted ``MODEL.NAME``, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The task of ``MODEL.NAME name``; ``ValueError`` listing the known names otherwise."""
    if name not in _TASKS:
        raise BadValueError(f"MODEL.NAME '{name}' is unknown; choose one of {', '.join(list_tasks())}")
    return _TASKS[name]


def build_model(cfg: CfgNode) -> nn.Module:
    """The model named by ``cfg.MODEL.NAME``, freshly initialised, on the CPU in train mode."""
    task = get_task(cfg.MODEL.NAME)
    if cfg.MODEL.NAME != "cappa_bicaptioning" and cfg.MODEL.CAPPA.PARALLEL_FRACTION != 0.0:
        raise BadValueError(
            f"MODEL.CAPPA.PARALLEL_FRACTION is only used by MODEL.NAME 'cappa_bicaptioning', not '{cfg.MODEL.NAME}'"
        )
    return task.build_model(cfg)


def build_dataset(cfg: CfgNode, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """The ``split`` ("train" or "val") dataset of ``cfg.MODEL.NAME``'s task, transforms included."""
    return get_task(cfg.MODEL.NAME).build_dataset(cfg, split, tokenizer)


# The paper's tasks (``virtex`` is the official name of bicaptioning) and CapPa.
register_task("virtex", factory.build_bicaptioning, build_caption_dataset)
register_task("bicaptioning", factory.build_bicaptioning, build_caption_dataset)
register_task("captioning", factory.build_captioning, build_caption_dataset)
register_task("cappa_bicaptioning", factory.build_cappa_bicaptioning, build_caption_dataset)
# The model turns caption_tokens into bag-of-words targets.
register_task("token_classification", factory.build_token_classification, build_caption_dataset)
register_task("masked_lm", factory.build_masked_lm, build_masked_lm_dataset)
register_task("multilabel_classification", factory.build_multilabel_classification, build_multilabel_dataset)
