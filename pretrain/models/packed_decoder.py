"""Teacher-forced decoding over real caption tokens only, with the weights of ``nn.TransformerDecoder``.

A batch of right-padded captions spends a large share of the textual head's work on padding:
COCO captions average about 13 tokens but a batch is padded to its longest, up to 30. Every
operation of a decoder layer except attention acts on each token independently (projections,
feed-forward, LayerNorm, dropout), so this module runs those on the packed ``(N, H)`` matrix of
real tokens and lays tokens out as ``(B, T, H)`` only around the attention kernels.

Under a causal mask with right padding, a real position attends only to real positions, so the
hidden state of every real position equals that of the padded ``nn.TransformerDecoder`` (the
tests check values and gradients). Padded query rows are computed by the attention kernel but
never read. The layers' own modules and parameters are used, so state dicts, official
checkpoints and attention hooks on the padded path are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class PackedLayout:
    """Where the packed rows live in a ``(B, T)`` batch: ``flat_index`` = b * T + t."""

    batch_size: int
    length: int
    flat_index: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PackedLayout:
        """Layout of the ``True`` positions of a (B, T) mask, row-major."""
        return cls(mask.size(0), mask.size(1), mask.flatten().nonzero().squeeze(1))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D), zeros at positions outside the layout."""
        padded = packed.new_zeros(self.batch_size * self.length, packed.size(1))
        return padded.index_copy(0, self.flat_index, packed).view(self.batch_size, self.length, -1)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (N, D)."""
        return padded.reshape(self.batch_size * self.length, -1).index_select(0, self.flat_index)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _attend(
    attention: nn.MultiheadAttention,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Scaled dot-product attention of (B, T, H) projected queries over (B, S, H) keys/values,
    with the module's head count and attention dropout; returns (B, T, H) before ``out_proj``."""
    heads = attention.num_heads
    dropout = attention.dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(
        _split_heads(queries, heads), _split_heads(keys, heads), _split_heads(values, heads),
        dropout_p=dropout, is_causal=causal,
    )
    return out.transpose(1, 2).flatten(2)


def _self_attention(attention: nn.MultiheadAttention, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    qkv = layout.unpack(F.linear(x, attention.in_proj_weight, attention.in_proj_bias))
    out = _attend(attention, *qkv.chunk(3, dim=-1), causal=True)
    return attention.out_proj(layout.pack(out))


def _cross_attention(
    attention: nn.MultiheadAttention, x: torch.Tensor, memory: torch.Tensor, layout: PackedLayout
) -> torch.Tensor:
    width = attention.embed_dim
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    queries = layout.unpack(F.linear(x, weight[:width], bias[:width]))
    keys, values = F.linear(memory, weight[width:], bias[width:]).chunk(2, dim=-1)
    out = _attend(attention, queries, keys, values, causal=False)
    return attention.out_proj(layout.pack(out))


def _feed_forward(layer: nn.TransformerDecoderLayer, x: torch.Tensor) -> torch.Tensor:
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


def _layer_forward(
    layer: nn.TransformerDecoderLayer, x: torch.Tensor, memory: torch.Tensor, layout: PackedLayout
) -> torch.Tensor:
    """One decoder layer on packed tokens, in the layer's post-norm or pre-norm arrangement."""
    if layer.norm_first:
        x = x + layer.dropout1(_self_attention(layer.self_attn, layer.norm1(x), layout))
        x = x + layer.dropout2(_cross_attention(layer.multihead_attn, layer.norm2(x), memory, layout))
        return x + layer.dropout3(_feed_forward(layer, layer.norm3(x)))
    x = layer.norm1(x + layer.dropout1(_self_attention(layer.self_attn, x, layout)))
    x = layer.norm2(x + layer.dropout2(_cross_attention(layer.multihead_attn, x, memory, layout)))
    return layer.norm3(x + layer.dropout3(_feed_forward(layer, x)))


def packed_causal_decode(
    decoder: nn.TransformerDecoder, x: torch.Tensor, memory: torch.Tensor, layout: PackedLayout
) -> torch.Tensor:
    """``decoder`` under a causal mask, on packed (N, H) token embeddings laid out by ``layout``
    (each row's real tokens must be a prefix); returns the packed (N, H) hidden states."""
    for layer in decoder.layers:
        x = _layer_forward(layer, x, memory, layout)
    return x if decoder.norm is None else decoder.norm(x)
