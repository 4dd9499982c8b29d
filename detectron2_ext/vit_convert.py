"""Convert the ViT of a timm-format state dict into exact ``backbone.net.*`` keys of detectron2's ``ViT``.

Works from state-dict keys alone: a pretraining checkpoint of ours (``visual.vit.*``), a DDP-wrapped
one, a ``{"model": ...}``/``{"state_dict": ...}`` wrapper, or a plain timm ``VisionTransformer``
state dict such as MAE's ``mae_pretrain_vit_base.pth``, DeiT's or AugReg's. The ViT is found
through its ``patch_embed.proj.weight`` key.

timm's names are detectron2's, so conversion is a prefix and a drop list: the class token, the
final norm (``norm``/``fc_norm``), the classifier (``head``) and an MAE decoder are dropped; the
patch embedding, position embeddings and blocks are kept, each shape checked. The keys are
written whole (``backbone.net.blocks.0.attn.qkv.weight``) and loaded without name matching:
detectron2's heuristics would skip a ``pos_embed`` of the wrong shape with a warning, and a final
``norm`` as wide as the heads makes them fail (docs/fidelity.md).

Refused, naming the key: LayerScale (detectron2's ``ViT`` has no place for it and would run
without it), a distillation or register token (more than the one class slot that detectron2
strips from ``pos_embed``), q/k norms, separate q/v biases and anything else it cannot place.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .convert import ConversionError, anchor_prefixes

ANCHOR_KEY = "patch_embed.proj.weight"
TARGET_PREFIX = "backbone.net."
DROPPED = re.compile(r"(cls_token|(norm|fc_norm|head|pre_logits)(\..+)?|mask_token|decoder_.+)")
LAYERSCALE = re.compile(r"blocks\.\d+\.(ls[12]\.gamma|gamma_[12])")
# Per block: timm name -> shape as a function of (embed dim D, MLP hidden H); detectron2 names are the same.
BLOCK_SHAPES = {
    "norm1.weight": lambda d, h: (d,),
    "norm1.bias": lambda d, h: (d,),
    "attn.qkv.weight": lambda d, h: (3 * d, d),
    "attn.qkv.bias": lambda d, h: (3 * d,),
    "attn.proj.weight": lambda d, h: (d, d),
    "attn.proj.bias": lambda d, h: (d,),
    "norm2.weight": lambda d, h: (d,),
    "norm2.bias": lambda d, h: (d,),
    "mlp.fc1.weight": lambda d, h: (h, d),
    "mlp.fc1.bias": lambda d, h: (h,),
    "mlp.fc2.weight": lambda d, h: (d, h),
    "mlp.fc2.bias": lambda d, h: (d,),
}
_BLOCK_KEY = re.compile(r"blocks\.(?P<index>\d+)\.(?P<rest>.+)")


@dataclass
class ConvertedViT:
    """detectron2 ``ViT`` weights (``backbone.net.*``) and what was learned about the source."""

    state_dict: OrderedDict[str, torch.Tensor]
    embed_dim: int
    depth: int
    patch_size: int
    pretrain_img_size: int  # the grid of pos_embed times the patch size
    pretrain_use_cls_token: bool  # pos_embed has a class slot (detectron2 strips it)
    had_class_token: bool  # the source had a cls_token (dropped)
    mlp_ratio: float
    qkv_bias: bool
    source_prefix: str
    dropped_keys: list = field(default_factory=list)
    ignored_keys: int = 0  # keys outside the ViT (e.g. the textual head)
    num_heads: int | None = None  # known from the pretraining config, not from the weights

    @property
    def metadata(self) -> dict:
        """What ``MODEL.VIT`` must say to hold these weights, as recorded in the converted file."""
        return {
            "backbone": "vit",
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "patch_size": self.patch_size,
            "pretrain_img_size": self.pretrain_img_size,
            "pretrain_use_cls_token": self.pretrain_use_cls_token,
            "had_class_token": self.had_class_token,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            **({"num_heads": self.num_heads} if self.num_heads is not None else {}),
        }


def find_vit_prefix(state_dict: dict) -> str | None:
    """The prefix under which a timm-format ViT lives (``""`` for a plain one), or None if none."""
    prefixes = anchor_prefixes(state_dict, ANCHOR_KEY)
    if len(prefixes) > 1:
        raise ConversionError(f"several ViTs found, under prefixes {prefixes}; expected exactly one")
    return prefixes[0] if prefixes else None


def _grid_of(pos_tokens: int) -> tuple[int, bool] | None:
    """(grid side, has a class slot) for a ``pos_embed`` of ``pos_tokens`` positions."""
    for slots, has_cls in ((0, False), (1, True)):
        side = math.isqrt(pos_tokens - slots)
        if side > 0 and side * side == pos_tokens - slots:
            return side, has_cls
    return None


def _check_blocks(kept: dict, embed_dim: int, prefix: str) -> tuple[int, int, bool]:
    """(depth, MLP hidden size, qkv bias) after checking that every block is complete and fits."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in kept.items():
        match = _BLOCK_KEY.fullmatch(name)
        if match:
            blocks.setdefault(int(match["index"]), {})[match["rest"]] = value
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ConversionError(f"the ViT under '{prefix}' has blocks {sorted(blocks)}; expected 0..n-1 with n >= 1")
    hidden = blocks[0]["mlp.fc1.weight"].shape[0] if "mlp.fc1.weight" in blocks[0] else None
    qkv_bias = "attn.qkv.bias" in blocks[0]
    for index, params in sorted(blocks.items()):
        for rest, shape_of in BLOCK_SHAPES.items():
            key = f"{prefix}blocks.{index}.{rest}"
            if rest == "attn.qkv.bias" and not qkv_bias:
                if rest in params:
                    raise ConversionError(f"'{key}': block 0 has no qkv bias but block {index} has one")
                continue
            if rest not in params:
                raise ConversionError(f"'{key}' is missing: every block needs {', '.join(BLOCK_SHAPES)}")
            expected = shape_of(embed_dim, hidden)
            if tuple(params[rest].shape) != expected:
                raise ConversionError(
                    f"'{key}' has shape {tuple(params[rest].shape)}; detectron2's ViT of width {embed_dim} "
                    f"(MLP {hidden}) needs {expected}"
                )
    return len(blocks), hidden, qkv_bias


def convert_vit_state_dict(state_dict: dict, prefix: str) -> ConvertedViT:
    """Convert the ViT under ``prefix`` of a model state dict into detectron2 ``ViT`` weights."""
    kept, dropped, ignored = OrderedDict(), [], 0
    for key, value in state_dict.items():
        if not (isinstance(key, str) and key.startswith(prefix)):
            ignored += 1
            continue
        name = key[len(prefix):]
        if LAYERSCALE.fullmatch(name):
            raise ConversionError(
                f"'{key}' is a LayerScale weight: detectron2's ViT has none and would silently run "
                f"without it; pretrain without LayerScale (timm init_values=None)"
            )
        if DROPPED.fullmatch(name):
            dropped.append(key)
            continue
        if name not in ("pos_embed", ANCHOR_KEY, "patch_embed.proj.bias") and not (
            _BLOCK_KEY.fullmatch(name) and _BLOCK_KEY.fullmatch(name)["rest"] in BLOCK_SHAPES
        ):
            raise ConversionError(f"'{key}' has no place in detectron2's ViT (plain pre-norm blocks only)")
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"'{key}' holds a {type(value).__name__}, not a tensor")
        kept[name] = value.detach().clone().contiguous()  # clone: never save a view's whole storage

    proj = kept[ANCHOR_KEY]
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise ConversionError(f"'{prefix}{ANCHOR_KEY}' has shape {tuple(proj.shape)}; expected (D, 3, p, p)")
    embed_dim, patch = proj.shape[0], proj.shape[2]
    if "pos_embed" not in kept:
        raise ConversionError(f"'{prefix}pos_embed' is missing: detectron2's ViT needs absolute position embeddings")
    pos = kept["pos_embed"]
    grid = _grid_of(pos.shape[1]) if pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[2] == embed_dim else None
    if grid is None:
        raise ConversionError(
            f"'{prefix}pos_embed' has shape {tuple(pos.shape)}: not (1, g*g [+1 class slot], {embed_dim}), so "
            f"detectron2's ViT cannot place it"
        )
    depth, hidden, qkv_bias = _check_blocks(kept, embed_dim, prefix)
    converted = OrderedDict((TARGET_PREFIX + name, value) for name, value in kept.items())
    return ConvertedViT(
        converted, embed_dim, depth, patch, grid[0] * patch, grid[1], f"{prefix}cls_token" in state_dict,
        hidden / embed_dim, qkv_bias, prefix, dropped, ignored,
    )


def to_detectron2_vit_checkpoint(backbone: ConvertedViT, source: str) -> dict:
    """The dict detectron2's checkpointer loads: exact keys, no name-matching heuristics, and
    the conversion record (:attr:`ConvertedViT.metadata`) that the fine-tuning run checks."""
    return {
        "model": backbone.state_dict,
        "__author__": "virtex-d2 tools/convert_backbone.py",
        "matching_heuristics": False,
        "conversion": {"source": str(source), "source_prefix": backbone.source_prefix, **backbone.metadata},
    }


def describe_vit(backbone: ConvertedViT, source) -> str:
    """One-line summary of a ViT conversion."""
    prefix = f"'{backbone.source_prefix}*'" if backbone.source_prefix else "top-level keys"
    cls = "with a class slot in pos_embed" if backbone.pretrain_use_cls_token else "without a class slot"
    heads = (f"{backbone.num_heads} heads" if backbone.num_heads is not None
             else "heads not recorded: MODEL.VIT.NUM_HEADS must be the pretraining's")
    text = (
        f"ViT (width {backbone.embed_dim}, depth {backbone.depth}, {heads}, patch {backbone.patch_size}, pretrained "
        f"at {backbone.pretrain_img_size} px, {cls}) from {prefix} of {source}: {len(backbone.state_dict)} tensors"
    )
    if backbone.dropped_keys:
        shown = ", ".join(k[len(backbone.source_prefix):] for k in backbone.dropped_keys[:6])
        more = f" and {len(backbone.dropped_keys) - 6} more" if len(backbone.dropped_keys) > 6 else ""
        text += f"; dropped {shown}{more}"
    if backbone.ignored_keys:
        text += f"; ignored {backbone.ignored_keys} keys outside the ViT"
    return text
