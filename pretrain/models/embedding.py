"""Token embedding of the textual heads: word + learned absolute position, normalised."""
from __future__ import annotations

import torch
from torch import nn


class WordAndPositionalEmbedding(nn.Module):
    """Embeds (B, T) token ids as (B, T, H) vectors, exactly as official VirTex does.

    ``LayerNorm(words[token] + positions[t])`` (eps 1e-8) followed by dropout, then every
    position whose token id is ``padding_idx`` is set to zero. Id 0 is both ``<unk>`` and
    padding in the VirTex vocabulary, so an ``<unk>`` inside a caption is zeroed too.
    Positions are 0..T-1 for every sequence (captions are right-padded), and there are
    ``max_caption_length`` of them. Submodule names (``words``, ``positions``,
    ``layer_norm``) match the official state-dict keys.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dropout: float = 0.1,
        max_caption_length: int = 30,
        padding_idx: int = 0,
    ):
        super().__init__()
        self.padding_idx = padding_idx
        self.words = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx)
        self.positions = nn.Embedding(max_caption_length, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=1e-8, elementwise_affine=True)
        self.dropout = nn.Dropout(p=dropout)

    @property
    def max_caption_length(self) -> int:
        """Number of learned positions: the longest token sequence this embedding accepts."""
        return self.positions.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) long token ids -> (B, T, H) embeddings, zero at padding positions."""
        length = tokens.size(1)
        if length > self.max_caption_length:
            raise ValueError(
                f"token sequence of length {length} exceeds the {self.max_caption_length} "
                "learned positions (DATA.MAX_CAPTION_LENGTH)"
            )
        embeddings = self.words(tokens) + self.positions.weight[:length]
        embeddings = self.dropout(self.layer_norm(embeddings))
        return embeddings.masked_fill(tokens.eq(self.padding_idx).unsqueeze(-1), 0.0)
