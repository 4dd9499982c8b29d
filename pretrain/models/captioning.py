"""Captioning models: forward-only, bidirectional (VirTex), and CapPa-style bidirectional.

Loss semantics are the official ones: teacher-forced next-token cross-entropy averaged over
all non-padding target tokens of the batch (``ignore_index`` = padding), forward head on
``caption_tokens``, backward head on ``noitpac_tokens``, total = plain sum of the directions.

Three things make the step cheaper than the official implementation without changing any
value: the visual projection, shared by both heads, is computed once; the causal decoder runs
on the real tokens only (:mod:`pretrain.models.packed_decoder`); and the vocabulary projection
(the largest matmul of the head) is applied only to the hidden states whose target is not
padding, so padded positions never produce logits.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .textual_heads import TransformerTextualHead
from .visual_backbones import TorchvisionVisualBackbone

Decoder = Callable[[Callable[[torch.Tensor], torch.Tensor], int, torch.device], torch.Tensor]


def gathered_cross_entropy(
    head: TransformerTextualHead, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean CE over positions whose target is not padding, computing logits only there.

    ``hidden`` is (..., H) with ``targets`` of its leading shape: padded (B, T) or packed (N,).
    Equal to ``F.cross_entropy(head.output(hidden).flatten(0, -2), targets.flatten(),
    ignore_index=padding)`` but without the full logits tensor. The logits are cast to
    float32 so that the loss is accurate under bf16/fp16 autocast.
    """
    keep = targets != head.padding_idx
    logits = head.output(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep])


class CaptioningModel(nn.Module):
    """A visual backbone and a forward transformer head; optionally a backward head.

    ``bidirectional=True`` is the VirTex model (official names ``virtex``/``bicaptioning``): the
    backward head is a deep copy of the *initialised* forward head (so its decoder layers start
    identical to the forward ones), then its ``visual_projection``, ``embedding`` and ``output``
    are pointed at the forward head's modules, so only ``backward_textual.transformer`` is its
    own. The state dict therefore has the official keys, aliases included.

    ``parallel_fraction > 0`` enables CapPa-style parallel prediction (Tschannen et al., "Image
    Captioners Are Scalable Vision Learners Too", 2023; not in official VirTex): in training,
    each batch is, with this probability, a *parallel* batch in which every non-padding decoder
    input token (both directions) is replaced by [MASK] and no causal mask is used, so each
    position must predict its target from the image and the positions alone. The decision is
    one draw of ``torch.rand`` per batch from ``generator`` (default: torch's global CPU
    generator, which the trainer seeds), so it is reproducible; ranks seeded differently
    decide independently. Evaluation always uses the autoregressive (causal) loss.

    Batch contract: ``image`` (B, 3, H, W); ``caption_tokens`` and, if bidirectional,
    ``noitpac_tokens`` (B, T) long, right-padded with 0; ``caption_lengths`` (B,).
    ``forward`` returns ``{"loss", "loss_components"}``; in eval mode and without
    ``caption_tokens`` it decodes with ``decoder`` and returns ``{"predictions": (B, L)}``
    (see :mod:`pretrain.models.decoding`).
    """

    def __init__(
        self,
        visual: TorchvisionVisualBackbone,
        textual: TransformerTextualHead,
        bidirectional: bool = True,
        decoder: Decoder | None = None,
        mask_index: int = 3,
        parallel_fraction: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not 0.0 <= parallel_fraction <= 1.0:
            raise ValueError(f"parallel_fraction must be in [0, 1], got {parallel_fraction}")
        self.visual = visual
        self.textual = textual
        self.bidirectional = bidirectional
        if bidirectional:
            self.backward_textual = copy.deepcopy(textual)
            self.backward_textual.visual_projection = textual.visual_projection
            self.backward_textual.embedding = textual.embedding
            self.backward_textual.output = textual.output
        self.decoder = decoder
        self.mask_index = mask_index
        self.parallel_fraction = parallel_fraction
        self.generator = generator

    def _is_parallel_batch(self) -> bool:
        if not self.training or self.parallel_fraction == 0.0:
            return False
        return bool(torch.rand((), generator=self.generator) < self.parallel_fraction)

    def _direction_loss(
        self,
        head: TransformerTextualHead,
        projected_visual: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        parallel: bool,
    ) -> torch.Tensor:
        """Next-token CE of one head; the last input token predicts nothing and is not fed."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if parallel:
            inputs = inputs.masked_fill(inputs != head.padding_idx, self.mask_index)
            hidden = head.hidden_states(projected_visual, inputs, lengths, causal=False)
        else:
            hidden, targets = head.teacher_forced_hidden_states(projected_visual, inputs, targets)
        return gathered_cross_entropy(head, hidden, targets)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Training/validation loss, or decoded ``predictions`` for an image-only batch."""
        visual_features = self.visual(batch["image"])
        if "caption_tokens" not in batch:
            if self.training:
                raise ValueError("a training batch needs 'caption_tokens'")
            return {"predictions": self.decode_features(visual_features)}

        projected = self.textual.project_visual(visual_features)
        lengths = batch["caption_lengths"]
        parallel = self._is_parallel_batch()
        loss = self._direction_loss(
            self.textual, projected, batch["caption_tokens"], lengths, parallel
        )
        components = {"captioning_forward": loss.detach()}
        if self.bidirectional:
            backward_loss = self._direction_loss(
                self.backward_textual, projected, batch["noitpac_tokens"], lengths, parallel
            )
            components["captioning_backward"] = backward_loss.detach()
            loss = loss + backward_loss
        if self.parallel_fraction > 0.0:
            components["parallel_batch"] = loss.new_tensor(float(parallel))
        return {"loss": loss, "loss_components": components}

    @torch.no_grad()
    def decode_features(self, visual_features: torch.Tensor) -> torch.Tensor:
        """Caption backbone features with the forward head and ``self.decoder``."""
        if self.decoder is None:
            raise ValueError("this model was built without a decoder; cannot predict captions")
        memory = self.textual.project_visual(visual_features)
        batch_size = memory.size(0)
        repeated = {1: memory}

        def step(prefixes: torch.Tensor) -> torch.Tensor:
            copies = prefixes.size(0) // batch_size
            if copies not in repeated:
                repeated[copies] = memory.repeat_interleave(copies, dim=0)
            hidden = self.textual.hidden_states(repeated[copies], prefixes, causal=True)
            return self.textual.output(hidden[:, -1])

        return self.decoder(step, batch_size, memory.device)
