"""Textual heads: the transformer decoder that reads visual features, and a linear classifier.

Names follow the official config strings: ``transdec_postnorm::L{layers}_H{hidden}_A{heads}_F{ffn}``
(post-norm layers, what every released VirTex model uses) and ``transdec_prenorm::...``
(``norm_first`` layers plus a final LayerNorm). Submodule names match official checkpoints:
``visual_projection``, ``embedding``, ``transformer.layers.<i>``, ``output``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.errors import BadValueError

from .embedding import WordAndPositionalEmbedding
from .packed_decoder import PackedLayout, packed_causal_decode

_TRANSDEC_NAME = re.compile(r"^transdec_(postnorm|prenorm)::L(\d+)_H(\d+)_A(\d+)_F(\d+)$")


@dataclass(frozen=True)
class TransformerSpec:
    """Architecture encoded in a textual head name."""

    num_layers: int
    hidden_size: int
    attention_heads: int
    feedforward_size: int
    norm_first: bool


def parse_textual_name(name: str) -> TransformerSpec:
    """Parse ``transdec_{postnorm,prenorm}::L1_H2048_A32_F8192``; raise ``ValueError`` if malformed."""
    match = _TRANSDEC_NAME.match(name)
    if match is None:
        raise BadValueError(
            f"MODEL.TEXTUAL.NAME '{name}' is not of the form "
            "'transdec_postnorm::L<layers>_H<hidden>_A<heads>_F<feedforward>' (or transdec_prenorm)"
        )
    norm, layers, hidden, heads, ffn = match.groups()
    spec = TransformerSpec(int(layers), int(hidden), int(heads), int(ffn), norm == "prenorm")
    if spec.hidden_size % spec.attention_heads:
        raise BadValueError(f"MODEL.TEXTUAL.NAME '{name}': H={hidden} is not divisible by A={heads}")
    return spec


def _init_weights(module: nn.Module) -> None:
    """Official VirTex init: N(0, 0.02) for Linear/in-projection/embedding weights.

    Biases are deliberately left at PyTorch's defaults (the official code does not touch them),
    and the padding row of an embedding is re-zeroed after sampling.
    """
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.MultiheadAttention):
        module.in_proj_weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


class TransformerTextualHead(nn.Module):
    """Transformer decoder over caption tokens, cross-attending to projected visual features.

    The (B, C, h, w) feature map is flattened to h*w tokens and mapped to the hidden size by
    one Linear (``visual_projection``; no position encoding, as official). Tokens go through
    :class:`WordAndPositionalEmbedding` and ``nn.TransformerDecoder`` (GELU, dropout, batch
    first), so attention runs through PyTorch's fused scaled-dot-product kernels. ``output``
    is a Linear whose weight *is* the word-embedding matrix (tied) with its own bias.

    The head exposes its stages separately so that models can project the visual features once
    for several heads (:meth:`project_visual`), run the decoder (:meth:`hidden_states`, or
    :meth:`teacher_forced_hidden_states` on real tokens only) and apply the vocabulary projection
    only where a prediction is needed (``output``).
    """

    def __init__(
        self,
        visual_feature_size: int,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        attention_heads: int,
        feedforward_size: int,
        dropout: float = 0.1,
        norm_first: bool = False,
        max_caption_length: int = 30,
        padding_idx: int = 0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.padding_idx = padding_idx
        self.visual_projection = nn.Linear(visual_feature_size, hidden_size)
        self.embedding = WordAndPositionalEmbedding(
            vocab_size, hidden_size, dropout, max_caption_length, padding_idx
        )
        layer = nn.TransformerDecoderLayer(
            hidden_size,
            attention_heads,
            dim_feedforward=feedforward_size,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=norm_first,
        )
        final_norm = nn.LayerNorm(hidden_size) if norm_first else None
        self.transformer = nn.TransformerDecoder(layer, num_layers, norm=final_norm)
        # Initialised before ``output`` exists, as official: its bias keeps PyTorch's default.
        self.apply(_init_weights)
        self.output = nn.Linear(hidden_size, vocab_size)
        self.output.weight = self.embedding.words.weight

    def project_visual(self, visual_features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) backbone features -> (B, h*w, H) decoder memory."""
        # permute+flatten is a free view for channels_last feature maps.
        tokens = visual_features.permute(0, 2, 3, 1).flatten(1, 2)
        return self.visual_projection(tokens)

    def hidden_states(
        self,
        projected_visual: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Decoder output (B, T, H) for (B, T) right-padded ``tokens``.

        ``causal=True``: position t attends to positions <= t. Padding is right-aligned, so
        under a causal mask no real position can see a padded one, and the key-padding mask
        of the official code cannot change any non-padding output; it is omitted so that the
        attention kernel runs with its plain causal path. ``causal=False`` (masked LM, parallel
        prediction): every position attends to all positions < ``lengths``.
        """
        embeddings = self.embedding(tokens)
        length = tokens.size(1)
        if causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu_(1)
            return self.transformer(
                embeddings, projected_visual, tgt_mask=mask, tgt_is_causal=True
            )
        if lengths is None:
            raise ValueError("non-causal decoding needs caption lengths for its padding mask")
        positions = torch.arange(length, device=tokens.device)
        padding = positions.unsqueeze(0) >= lengths.unsqueeze(1)
        return self.transformer(embeddings, projected_visual, tgt_key_padding_mask=padding)

    def teacher_forced_hidden_states(
        self, projected_visual: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal decoder states for (B, T) right-padded ``inputs``, only where they are needed.

        Returns packed ``(hidden (N, H), targets (N,))`` for every position up to the last one
        of its row whose target is not padding; they equal the corresponding rows of
        :meth:`hidden_states` (see :mod:`pretrain.models.packed_decoder`), at the cost of the
        real tokens instead of the padded batch.
        """
        predicts = targets != self.padding_idx
        needed = predicts.flip(1).cumsum(1).flip(1) > 0
        layout = PackedLayout.from_mask(needed)
        tokens = layout.pack(self.embedding(inputs))
        hidden = packed_causal_decode(self.transformer, tokens, projected_visual, layout)
        return hidden, layout.pack(targets.unsqueeze(-1)).squeeze(-1)

    def forward(
        self,
        visual_features: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Full (B, T, V) logits; models use the staged methods to skip padded positions."""
        hidden = self.hidden_states(self.project_visual(visual_features), tokens, lengths, causal)
        return self.output(hidden)


class LinearTextualHead(nn.Module):
    """Global-average-pooled visual features -> one Linear to ``num_classes`` logits.

    The head of the official token/multi-label classification baselines (TEXTUAL.NAME "none").
    """

    def __init__(self, visual_feature_size: int, num_classes: int):
        super().__init__()
        self.output = nn.Linear(visual_feature_size, num_classes)

    def forward(self, visual_features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, num_classes) logits."""
        return self.output(visual_features.mean(dim=(2, 3)))
