"""Vision Transformer backbones for pretraining: timm ``VisionTransformer`` s that return their
normed patch tokens as a (B, D, H/p, W/p) map.

``MODEL.VISUAL.NAME timm::vit_base_patch16_224`` (any timm ViT of :data:`SUPPORTED_VITS`) builds
the timm model with:

- no class token and no pooling (``class_token=False, global_pool=''``): the textual head attends
  to every patch token, as it attends to every cell of a ResNet's feature map, and CapPa's
  encoder (big_vision ViT, GAP representation) has no class token either;
- no LayerScale (``init_values=None``): detectron2's ``ViT`` has no place for its weights, so a
  LayerScale backbone could not be transferred exactly;
- no classifier (``num_classes=0``), learned absolute position embeddings for the pretraining
  image size (``DATA.IMAGE_CROP_SIZE``), resampled by timm when another size comes in
  (``dynamic_img_size``; the caption tools may feed other sizes);
- drop path ``MODEL.VISUAL.DROP_PATH``.

The timm model lives in a submodule named ``vit``, so its keys are ``visual.vit.<timm name>``:
timm's names are detectron2's ``ViT`` names (``detectron2_ext.vit_convert`` maps them).

The output is timm's ``forward_features``: the tokens after the final LayerNorm (the captioner
reads normed tokens; that norm is dropped when the encoder moves to detectron2, where ViTDet's
pyramid reads the last block's tokens unnormed), reshaped NCHW so that the textual heads consume
it exactly as a ResNet's feature map.
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.models.visual_backbones import VisualBackbone, parse_library_name

#: timm ViT constructors accepted after the ``timm::`` prefix of MODEL.VISUAL.NAME: the plain
#: pre-norm ViTs whose every weight has a place in detectron2's ``ViT``.
SUPPORTED_VITS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
)


def requested_vit(visual_name: str) -> str | None:
    """timm's name of the ViT that ``MODEL.VISUAL.NAME`` asks for; None for another backbone."""
    return parse_vit_name(visual_name) if is_vit_name(visual_name) else None


def vit_patch_size(arch: str) -> int:
    """The patch size of a timm ViT of :data:`SUPPORTED_VITS`, as its name gives it (``patch16``: 16)."""
    return int(re.search(r"_patch(\d+)_", arch).group(1))


def is_vit_name(name: str) -> bool:
    """Whether ``MODEL.VISUAL.NAME`` asks for a timm ViT (``timm::...``)."""
    return name.startswith("timm::")


def parse_vit_name(name: str) -> str:
    """``"timm::vit_base_patch16_224"`` -> ``"vit_base_patch16_224"``; anything else :class:`ConfigError`."""
    return parse_library_name(name, "timm", SUPPORTED_VITS, error=ConfigError)


def import_timm():
    """timm, imported without its deprecation warnings (detectron2's ``ViT`` imports the
    deprecated ``timm.models.layers`` path; importing it here once keeps that warning from users)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import timm
        import timm.models.layers  # imported here, warnings off, so that later imports of it are silent
    return timm


def create_timm_vit(arch: str, image_size: int, drop_path: float = 0.0) -> nn.Module:
    """timm's ``arch`` for ``image_size`` px input, without class token, pooling, classifier
    or LayerScale, randomly initialised (timm's ViT init: truncated-normal weights, zero biases)."""
    timm = import_timm()
    vit = timm.create_model(
        arch,
        pretrained=False,
        num_classes=0,
        class_token=False,
        global_pool="",
        init_values=None,
        img_size=image_size,
        drop_path_rate=drop_path,
        dynamic_img_size=True,
    )
    if vit.num_prefix_tokens != 0:
        raise RuntimeError(f"timm {arch} still has {vit.num_prefix_tokens} prefix tokens; expected none")
    return vit


def vit_num_heads(arch: str) -> int:
    """Attention heads of timm's ``arch``: its weights do not show them (the qkv projection is
    as wide for any count), so they are read from the model built on the meta device (no memory)."""
    timm = import_timm()
    with torch.device("meta"):
        vit = timm.create_model(arch, pretrained=False)
    return vit.blocks[0].attn.num_heads


class TimmViTBackbone(VisualBackbone):
    """A timm ViT whose forward maps (B, 3, H, W) images to (B, D, H/p, W/p) normed patch tokens.

    ``frozen=True`` turns gradients off and keeps the encoder in eval mode (no drop path).
    """

    def __init__(
        self,
        arch: str = "vit_base_patch16_224",
        visual_feature_size: int = 768,
        image_size: int = 224,
        drop_path: float = 0.0,
        frozen: bool = False,
    ):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"MODEL.VISUAL.DROP_PATH must be in [0, 1), got {drop_path}")
        self.vit = create_timm_vit(arch, image_size, drop_path)
        self._set_up(self.vit, arch, self.vit.embed_dim, visual_feature_size, frozen)
        self.patch_size = self.vit.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D, H/p, W/p) tokens after the final LayerNorm."""
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens = self.vit.forward_features(images)  # (B, h*w, D), row-major over the grid
        return tokens.transpose(1, 2).unflatten(2, (height, width))


def initial_vit_state(arch: str, image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The weights a randomly initialised pretraining ViT starts from: timm's ``arch`` as
    :class:`TimmViTBackbone` builds it (no class token, no LayerScale) for ``image_size`` px,
    under ``torch.manual_seed(seed)``; the random-init baseline that tools/convert_backbone.py
    converts, as for ResNets."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_timm_vit(arch, image_size).state_dict()
