"""Batching of the pretraining samples of every dataset variant."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

PADDING_ID = 0  # <unk> doubles as padding in the official vocabulary
PADDED_KEYS = frozenset({"caption_tokens", "noitpac_tokens", "masked_labels"})
"""Variable-length token sequences, right-padded to the longest in the batch."""


def collate_fn(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts into a batch dict with the same keys.

    Keys in :data:`PADDED_KEYS` are right-padded with 0 to the batch's longest sequence (so
    ``noitpac_tokens``, reversed before padding, reads ``[EOS] ... [SOS] 0 0``); every other
    key is stacked. One function serves all dataset variants.
    """
    if not samples:
        raise ValueError("collate_fn got an empty list of samples")
    return {
        key: pad_sequence([s[key] for s in samples], batch_first=True, padding_value=PADDING_ID)
        if key in PADDED_KEYS
        else torch.stack([s[key] for s in samples])
        for key in samples[0]
    }
