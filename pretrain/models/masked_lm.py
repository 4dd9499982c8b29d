"""Masked language modelling baseline of the VirTex paper (BERT-style, image-conditioned)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .textual_heads import TransformerTextualHead
from .visual_backbones import TorchvisionVisualBackbone


class MaskedLMModel(nn.Module):
    """Predict the original tokens at masked positions from the image and the whole caption.

    The dataset has already replaced the chosen tokens in ``caption_tokens`` and put the
    original ids in ``masked_labels`` (0 elsewhere). The transformer runs without a causal
    mask, with a key-padding mask from ``caption_lengths``; the loss is the mean CE over the
    masked positions (logits are computed only there). In eval mode ``predictions`` (B, T)
    holds the argmax at masked positions and 0 elsewhere, as official.
    """

    def __init__(self, visual: TorchvisionVisualBackbone, textual: TransformerTextualHead):
        super().__init__()
        self.visual = visual
        self.textual = textual

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"loss", "loss_components": {"masked_lm"}}`` (+ ``predictions`` in eval mode)."""
        projected = self.textual.project_visual(self.visual(batch["image"]))
        hidden = self.textual.hidden_states(
            projected, batch["caption_tokens"], batch["caption_lengths"], causal=False
        )
        labels = batch["masked_labels"]
        masked = labels != self.textual.padding_idx
        logits = self.textual.output(hidden[masked])
        loss = F.cross_entropy(logits.float(), labels[masked])
        output: dict[str, Any] = {"loss": loss, "loss_components": {"masked_lm": loss.detach()}}
        if not self.training:
            predictions = torch.zeros_like(labels)
            predictions[masked] = logits.argmax(dim=-1)
            output["predictions"] = predictions
        return output
