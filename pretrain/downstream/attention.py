"""Where the captioning decoder looks: cross-attention over the image for each generated word.

The paper's attention figure, reproduced without changing the model: PyTorch's decoder layers
call their ``multihead_attn`` (cross-attention) module with ``need_weights=False``, so a forward
pre-hook switches that call to ``need_weights=True, average_attn_weights=False`` and a forward
hook keeps the returned probabilities (:class:`CrossAttentionRecorder`). The layer itself only
uses the first output, so its result is unchanged.

For an image, the caption is decoded with the model's decoder (beam search by default); then the
forward head reads ``[SOS] w1 ... w(n-1)`` once, causally, and the query at position ``t`` (whose
output predicted ``w{t+1}``) gives that word's attention over the ``h x w`` visual tokens. This
is exactly the attention used while generating, because decoding recomputes the full prefix
and a causal decoder's position ``t`` does not see later tokens. Maps are averaged over heads;
``layer`` picks the decoder layer (the last by default). SentencePiece pieces of one word are
merged and their maps averaged, so each tile shows a word.
"""
from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.nn import functional as F

from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.errors import BadValueError
from pretrain.files import write_text_atomic
from pretrain.tokenizer import SentencePieceBPETokenizer, group_pieces, strip_special


class CrossAttentionRecorder:
    """Context manager recording the cross-attention probabilities of a transformer head.

    Inside the ``with`` block every forward pass of ``head.transformer`` appends, per decoder
    layer, an (B, heads, T, S) tensor to :attr:`maps` (T queries = caption positions, S keys =
    visual tokens). Hooks are removed on exit.
    """

    def __init__(self, head: nn.Module):
        self.modules = [layer.multihead_attn for layer in head.transformer.layers]
        self.maps: list[torch.Tensor] = []
        self._handles: list = []

    @staticmethod
    def _request_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def _record(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self.maps.append(output[1].detach())

    def __enter__(self):  # returns self, for ``with ... as recorder``
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._request_weights, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True)
class WordAttention:
    """One generated word and its (h, w) attention over the feature map (sums to 1)."""

    word: str
    attention: np.ndarray


@dataclass(frozen=True)
class CaptionAttention:
    """A generated caption, split into words with their attention maps."""

    caption: str
    words: list[WordAttention]


@torch.no_grad()
def caption_with_attention(
    model: nn.Module,
    images: torch.Tensor,
    tokenizer: SentencePieceBPETokenizer,
    sos_index: int,
    eos_index: int,
    first_word_index: int,
    layer: int = -1,
) -> list[CaptionAttention]:
    """Caption (B, 3, H, W) normalised ``images`` and return each word's cross-attention map."""
    model.eval()
    visual = model.visual(images)
    height, width = visual.shape[-2:]
    tokens = model.decode_features(visual)
    head = model.textual
    memory = head.project_visual(visual)
    num_layers = len(head.transformer.layers)
    if not -num_layers <= layer < num_layers:
        raise BadValueError(f"layer {layer} does not exist: the decoder has {num_layers} layer(s)")
    results = []
    for b in range(images.size(0)):
        ids = strip_special(tokens[b].tolist(), eos_index, first_word_index)
        # The inputs that predicted ids[0..n-1]: [SOS] and all but the last generated token.
        prefix = torch.tensor([[sos_index, *ids[:-1]]], device=images.device)
        with CrossAttentionRecorder(head) as recorder:
            head.hidden_states(memory[b : b + 1], prefix, causal=True)
        # (n, h*w) averaged over heads; row t is the query that predicted ids[t].
        per_piece = recorder.maps[layer][0].float().mean(dim=0).cpu()
        pieces = [tokenizer.id_to_token(i) for i in ids]
        words = [
            WordAttention(
                tokenizer.decode([ids[i] for i in group]),
                per_piece[group].mean(dim=0).reshape(height, width).numpy(),
            )
            for group in group_pieces(pieces)
        ]
        results.append(CaptionAttention(tokenizer.decode(ids), words))
    return results


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) ImageNet-normalised tensor -> (H, W, 3) uint8 RGB array."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The (h, w) ``attention`` upsampled bilinearly to the (H, W, 3) ``image``, scaled to its
    own min-max range, coloured with the "jet" colormap and blended with weight ``alpha``."""
    size = image.shape[:2]
    upsampled = F.interpolate(torch.from_numpy(attention)[None, None].float(), size=size, mode="bilinear",
                              align_corners=False)[0, 0].numpy()
    span = upsampled.max() - upsampled.min()
    scaled = (upsampled - upsampled.min()) / span if span > 0 else np.zeros_like(upsampled)
    heat = colormaps["jet"](scaled)[..., :3] * 255
    return ((1 - alpha) * image + alpha * heat).round().astype(np.uint8)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


@dataclass(frozen=True)
class RenderedImage:
    """Files written for one image, relative to the output folder."""

    source: str
    caption: str
    grid: str
    tiles: list[tuple[str, str]]  # (label, file)


def render_image(
    name: str, image: np.ndarray, result: CaptionAttention, output_dir: str | os.PathLike, columns: int = 6
) -> RenderedImage:
    """Write the input and one overlay per word as PNG tiles, and a PNG grid of all of them."""
    output_dir = Path(output_dir)
    (output_dir / "tiles").mkdir(parents=True, exist_ok=True)
    stem = _safe_name(name)
    panels = [("input", image)] + [(w.word, overlay(image, w.attention)) for w in result.words]
    tiles = []
    for k, (label, pixels) in enumerate(panels):
        file = f"tiles/{stem}_{k:02d}.png"
        Image.fromarray(pixels).save(output_dir / file)
        tiles.append((label, file))

    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(2.2 * cols, 2.4 * rows))
    for k, (label, pixels) in enumerate(panels):
        axes = figure.add_subplot(rows, cols, k + 1)
        axes.imshow(pixels)
        axes.set_title(label, fontsize=11)
        axes.axis("off")
    figure.suptitle(result.caption or "(empty caption)", fontsize=12)
    figure.tight_layout()
    grid = f"{stem}_attention.png"
    figure.savefig(output_dir / grid, dpi=100)
    return RenderedImage(name, result.caption, grid, tiles)


def write_html(rendered: Sequence[RenderedImage], output_dir: str | os.PathLike, description: str) -> Path:
    """``index.html`` showing, per image, its caption and a tile per word; links are relative,
    so the folder can be moved or served as it is."""
    sections = []
    for item in rendered:
        figures = "\n".join(
            f'      <figure><img src="{quote(file)}" alt="{html.escape(label)}">'
            f"<figcaption>{html.escape(label)}</figcaption></figure>"
            for label, file in item.tiles
        )
        sections.append(
            f"  <section>\n    <h2>{html.escape(item.source)}</h2>\n"
            f'    <p class="caption">{html.escape(item.caption) or "(empty caption)"}</p>\n'
            f'    <div class="tiles">\n{figures}\n    </div>\n'
            f'    <p><a href="{quote(item.grid)}">PNG grid</a></p>\n  </section>'
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Decoder cross-attention per generated word</title>
  <style>
    body {{ font-family: sans-serif; margin: 2em; }}
    .caption {{ font-size: 1.2em; font-style: italic; }}
    .tiles {{ display: flex; flex-wrap: wrap; gap: 8px; }}
    figure {{ margin: 0; text-align: center; }}
    figure img {{ width: 160px; height: auto; image-rendering: auto; }}
  </style>
</head>
<body>
  <h1>Decoder cross-attention per generated word</h1>
  <p>{html.escape(description)}</p>
{chr(10).join(sections)}
</body>
</html>
"""
    path = Path(output_dir) / "index.html"
    write_text_atomic(path, page)
    return path
