"""A tiny stand-in for the captioning model and dataset, for fast unit tests of the engine.

It has what matters to the loop: a BatchNorm layer (per-process statistics), dropout (training
RNG), a ``cnn`` / ``textual`` naming split (two learning rates, no-decay regex) and the batch and
output contract of the real model (``image``/``caption_tokens`` in, ``loss``/``loss_components``
out).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import Dataset

from pretrain.config import get_default_config


class StandInVisual(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


class StandInTextual(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 4)
        self.transformer = nn.Sequential(OrderedDict(linear=nn.Linear(8, 8), norm=nn.LayerNorm(8)))
        self.output = nn.Linear(8, vocab)


class StandInModel(nn.Module):
    """Predicts each next token from the image feature and the current token."""

    def __init__(self, vocab: int = 12, dropout: float = 0.1):
        super().__init__()
        self.visual = StandInVisual()
        self.textual = StandInTextual(vocab)
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: dict) -> dict:
        feature = self.visual.cnn(batch["image"]).flatten(1)  # (B, 4)
        tokens = batch["caption_tokens"]
        words = self.textual.embedding(tokens[:, :-1])  # (B, T-1, 4)
        hidden = torch.cat([words, feature[:, None].expand_as(words)], dim=-1)
        logits = self.textual.output(self.dropout(self.textual.transformer(hidden)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
        return {"loss": loss, "loss_components": {"captioning_forward": loss.detach()}}


class StandInDataset(Dataset):
    """Random images and token sequences; the caption of an item depends on the RNG (like the
    random choice among an image's captions), the image on the index."""

    def __init__(self, size: int = 64, vocab: int = 12):
        self.size = size
        self.vocab = vocab

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        image = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(index))
        length = int(torch.randint(3, 7, ()))
        tokens = torch.randint(4, self.vocab, (length,))
        tokens[0] = 1
        return {"image": image, "caption_tokens": tokens, "image_id": index}


def standin_config(**overrides):
    """Official defaults scaled down to a few CPU iterations of the stand-in."""
    cfg = get_default_config()
    cfg.AMP = False
    cfg.DATA.NUM_WORKERS = 0
    cfg.OPTIM.BATCH_SIZE = 8
    cfg.OPTIM.NUM_ITERATIONS = 12
    cfg.OPTIM.WARMUP_STEPS = 3
    cfg.OPTIM.CNN_LR = 0.05
    cfg.OPTIM.LR = 0.05
    cfg.ENGINE.CHECKPOINT_PERIOD = 4
    cfg.ENGINE.LOG_PERIOD = 2
    cfg.ENGINE.VAL_PERIOD = 0
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    cfg.freeze()
    return cfg
