"""Masked language modelling on COCO Captions (the official ``masked_lm`` ablation)."""
from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch

from pretrain.data.captions import CaptionSamples, CocoCaptionsDataset, ImageRecord


def mask_caption_tokens(
    tokens: torch.Tensor,
    special_ids: Collection[int],
    mask_id: int,
    vocab_size: int,
    mask_proportion: float = 0.15,
    mask_probability: float = 0.85,
    replace_probability: float = 0.10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption of one caption; returns ``(masked_tokens, masked_labels)``.

    ``ceil(mask_proportion * n)`` of the ``n`` non-special tokens are chosen uniformly. Each
    chosen token becomes ``[MASK]`` with ``mask_probability``, a random ordinary token (an id
    above every special id) with ``replace_probability``, and stays as it is otherwise; a lone
    chosen token always becomes ``[MASK]``, as in the official code. ``masked_labels`` holds the
    original id at every chosen position and 0 (the ignored padding id) elsewhere.

    Deliberate differences from the official code, which labels only the positions that became
    ``[MASK]`` and draws replacements from the whole vocabulary, padding and ``[SOS]`` included:
    here every chosen position is a prediction target (as in BERT) and a replacement is always
    an ordinary token.
    """
    candidates = torch.nonzero(~torch.isin(tokens, torch.tensor(list(special_ids)))).flatten()
    num_chosen = math.ceil(candidates.numel() * mask_proportion)
    chosen = candidates[torch.randperm(candidates.numel())[:num_chosen]]
    masked = tokens.clone()
    labels = torch.zeros_like(tokens)
    labels[chosen] = tokens[chosen]
    if num_chosen == 1:
        masked[chosen] = mask_id
        return masked, labels
    draw = torch.rand(num_chosen)
    masked[chosen[draw < mask_probability]] = mask_id
    replaced = chosen[(draw >= mask_probability) & (draw < mask_probability + replace_probability)]
    masked[replaced] = torch.randint(max(special_ids) + 1, vocab_size, (replaced.numel(),))
    return masked, labels


MASKING_ARGS = ("mask_proportion", "mask_probability", "replace_probability")


class MaskedLmSamples(CaptionSamples):
    """Caption samples whose tokens are corrupted by :func:`mask_caption_tokens`.

    Keys: ``image_id``, ``image``, ``caption_tokens`` (``[SOS] caption [EOS]`` cut to the
    maximum length, then corrupted), ``masked_labels`` (same length; original ids at the chosen
    positions, 0 elsewhere) and ``caption_lengths``.
    """

    def __init__(
        self,
        *args: Any,
        mask_proportion: float = 0.15,
        mask_probability: float = 0.85,
        replace_probability: float = 0.10,
        **kwargs: Any,
    ):
        if not 0 < mask_proportion <= 1:
            raise ValueError(f"DATA.MASKED_LM.MASK_PROPORTION must be in (0, 1], got {mask_proportion}")
        if not (0 <= mask_probability and 0 <= replace_probability and mask_probability + replace_probability <= 1):
            raise ValueError(
                f"DATA.MASKED_LM: MASK_PROBABILITY ({mask_probability}) and REPLACE_PROBABILITY "
                f"({replace_probability}) must be probabilities summing to at most 1"
            )
        super().__init__(*args, **kwargs)
        self.mask_proportion = mask_proportion
        self.mask_probability = mask_probability
        self.replace_probability = replace_probability
        self.mask_id = self.tokenizer.token_to_id("[MASK]")
        self.special_ids = (self.tokenizer.token_to_id("<unk>"), self.sos_id, self.eos_id, self.mask_id)

    def make_sample(self, record: ImageRecord, image: torch.Tensor, tokens: list[int]) -> dict[str, Any]:
        masked, labels = mask_caption_tokens(
            torch.tensor(tokens, dtype=torch.long),
            self.special_ids,
            self.mask_id,
            self.tokenizer.get_vocab_size(),
            self.mask_proportion,
            self.mask_probability,
            self.replace_probability,
        )
        return {
            "image_id": torch.tensor(record.image_id, dtype=torch.long),
            "image": image,
            "caption_tokens": masked,
            "masked_labels": labels,
            "caption_lengths": torch.tensor(len(tokens), dtype=torch.long),
        }


class MaskedLmDataset(CocoCaptionsDataset):
    """COCO Captions samples with masked captions (the keys of :class:`MaskedLmSamples`); takes
    the arguments of :class:`CocoCaptionsDataset` and those of :data:`MASKING_ARGS`."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._masking = {name: kwargs.pop(name) for name in MASKING_ARGS if name in kwargs}
        super().__init__(*args, **kwargs)

    def sample_maker(self, tokenizer, transform, max_caption_length) -> MaskedLmSamples:
        return MaskedLmSamples(tokenizer, transform, max_caption_length, **self._masking)
