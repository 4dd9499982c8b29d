"""Tiny models and batches for the model tests: ResNet-18, H=64, vocabulary 100, 64 px images."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import get_default_config

VOCAB = 100
MAX_LENGTH = 12


def tiny_config(name: str = "virtex", textual: str = "transdec_postnorm::L1_H64_A2_F128", **extra):
    """A default config shrunk to the tiny model; ``extra`` maps dotted keys to values."""
    cfg = get_default_config()
    overrides = {
        "MODEL.NAME": name,
        "MODEL.VISUAL.NAME": "torchvision::resnet18",
        "MODEL.VISUAL.FEATURE_SIZE": 512,
        "MODEL.TEXTUAL.NAME": textual,
        "DATA.VOCAB_SIZE": VOCAB,
        "DATA.MAX_CAPTION_LENGTH": MAX_LENGTH,
        "DATA.IMAGE_CROP_SIZE": 64,
        "MODEL.DECODER.MAX_DECODING_STEPS": MAX_LENGTH,
        **extra,
    }
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    cfg.freeze()
    return cfg


def caption_batch(batch_size: int = 3, seed: int = 0, lengths=None) -> dict:
    """A collated captioning batch in the dataset's contract (right-padded, [SOS]=1 ... [EOS]=2)."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(4, MAX_LENGTH + 1, (batch_size,), generator=gen).tolist()
    width = max(lengths)
    forward = torch.zeros(batch_size, width, dtype=torch.long)
    backward = torch.zeros(batch_size, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        words = torch.randint(4, VOCAB, (n - 2,), generator=gen)
        seq = torch.cat([torch.tensor([1]), words, torch.tensor([2])])
        forward[i, :n] = seq
        backward[i, :n] = seq.flip(0)
    return {
        "image": torch.randn(batch_size, 3, 64, 64, generator=gen),
        "caption_tokens": forward,
        "noitpac_tokens": backward,
        "caption_lengths": torch.tensor(lengths),
        "image_id": torch.arange(batch_size),
    }


@pytest.fixture
def batch() -> dict:
    return caption_batch()
