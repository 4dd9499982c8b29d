"""Classification baselines of the VirTex paper: token classification and multi-label.

Both predict a set of labels from the pooled image features. By default with a softmax over
classes and the official loss: for each image, minus the mean log-probability of its (unique)
target classes, i.e. cross-entropy against a uniform K-hot target; then the mean over the batch.
An image without any target class contributes 0 (the official loop would produce NaN).
``MODEL.CLASSIFICATION_LOSS binary_cross_entropy`` is the usual multi-label loss instead (one
sigmoid per class), for a labels baseline that is not held back by the softmax's competition
between the classes of one image (docs/demo.md measures both).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .textual_heads import LinearTextualHead
from .visual_backbones import TorchvisionVisualBackbone


def k_hot_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``-mean(log_softmax(logits)[b, targets[b] == 1])``; empty rows count 0."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    targets = targets.to(logprobs.dtype)
    per_image = (logprobs * targets).sum(dim=-1) / targets.sum(dim=-1).clamp(min=1.0)
    return -per_image.mean()


def multi_hot_binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of one sigmoid per class against the multi-hot ``targets``, summed
    over classes and averaged over the batch (so the loss does not shrink with the number of
    classes, most of which an image does not have)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    return bce / logits.size(0)


#: ``MODEL.CLASSIFICATION_LOSS`` names and their loss functions ``(logits, targets) -> loss``.
CLASSIFICATION_LOSSES = {
    "k_hot_softmax": k_hot_cross_entropy,
    "binary_cross_entropy": multi_hot_binary_cross_entropy,
}


class ClassificationModel(nn.Module):
    """Visual backbone + :class:`LinearTextualHead`, trained with one of
    :data:`CLASSIFICATION_LOSSES` (``loss``; the official :func:`k_hot_cross_entropy` by default).

    Subclasses say where the K-hot targets come from (:meth:`targets`). In eval mode the
    10 highest-scoring classes per image are returned as ``predictions``, as official, and
    the logits of every class as ``scores`` (what validation ranks for mean average precision).
    """

    loss_name = "classification"

    def __init__(self, visual: TorchvisionVisualBackbone, textual: LinearTextualHead, loss: str = "k_hot_softmax"):
        super().__init__()
        if loss not in CLASSIFICATION_LOSSES:
            raise ValueError(f"unknown classification loss {loss!r}; choose one of {', '.join(CLASSIFICATION_LOSSES)}")
        self.visual = visual
        self.textual = textual
        self.loss = CLASSIFICATION_LOSSES[loss]

    def targets(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        """(B, num_classes) K-hot targets of a batch."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"loss", "loss_components"}`` (+ ``predictions`` (B, 10) and ``scores`` (B, C) in eval mode)."""
        logits = self.textual(self.visual(batch["image"]))
        loss = self.loss(logits, self.targets(batch, logits.size(-1)))
        output: dict[str, Any] = {"loss": loss, "loss_components": {self.loss_name: loss.detach()}}
        if not self.training:
            output["predictions"] = logits.topk(k=min(10, logits.size(-1)), dim=-1).indices
            output["scores"] = logits.float()
        return output


class TokenClassificationModel(ClassificationModel):
    """Predict the set of vocabulary tokens of the image's caption (``caption_tokens``).

    Special ids (``ignore_indices``: padding/<unk>, [SOS], [EOS]) are never targets.
    """

    def __init__(
        self,
        visual: TorchvisionVisualBackbone,
        textual: LinearTextualHead,
        ignore_indices: Sequence[int] = (0, 1, 2),
        loss: str = "k_hot_softmax",
    ):
        super().__init__(visual, textual, loss)
        self.ignore_indices = tuple(ignore_indices)

    def targets(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        tokens = batch["caption_tokens"]
        k_hot = torch.zeros(tokens.size(0), num_classes, device=tokens.device)
        k_hot.scatter_(1, tokens, 1.0)
        k_hot[:, list(self.ignore_indices)] = 0.0
        return k_hot


class MultiLabelClassificationModel(ClassificationModel):
    """Predict the set of COCO object categories in the image (``labels``: (B, 80) multi-hot)."""

    def targets(self, batch: dict[str, Any], num_classes: int) -> torch.Tensor:
        labels = batch["labels"]
        if labels.dim() != 2 or labels.size(1) != num_classes:
            raise ValueError(
                f"batch['labels'] must be (batch, {num_classes}) multi-hot, got {tuple(labels.shape)}"
            )
        return labels
