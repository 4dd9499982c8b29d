"""detectron2's ``ViT`` + ``SimpleFeaturePyramid`` (ViTDet) as a registered yacs backbone.

``MODEL.BACKBONE.NAME build_vitdet_backbone`` builds them from ``MODEL.VIT.*`` and
``MODEL.SFP.*`` (keys in :mod:`detectron2_ext.vit_config`), so the ViTDet models train with the
project's one config system and ``tools/train_net.py``. Settings that would build a model
different from the one asked for are refused before anything is built (:func:`check_vit_config`).
"""
from __future__ import annotations

import math
from functools import partial

from detectron2.modeling import BACKBONE_REGISTRY, SimpleFeaturePyramid, ViT
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from pretrain.config import ConfigError
from pretrain.models.vit import import_timm

#: the scale factors detectron2's ``SimpleFeaturePyramid`` has layers for
SFP_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)


def check_vit_config(cfg) -> None:
    """:class:`ConfigError` naming the key where ``MODEL.VIT``/``MODEL.SFP`` cannot be right."""
    vit, sfp = cfg.MODEL.VIT, cfg.MODEL.SFP
    for key in ("IMG_SIZE", "PRETRAIN_IMG_SIZE"):
        if vit[key] % vit.PATCH_SIZE:
            raise ConfigError(f"MODEL.VIT.{key} {vit[key]} is not a multiple of MODEL.VIT.PATCH_SIZE {vit.PATCH_SIZE}")
    if vit.EMBED_DIM % vit.NUM_HEADS:
        raise ConfigError(f"MODEL.VIT.EMBED_DIM {vit.EMBED_DIM} is not divisible by MODEL.VIT.NUM_HEADS {vit.NUM_HEADS}")
    outside = [i for i in vit.WINDOW_BLOCK_INDEXES if not 0 <= i < vit.DEPTH]
    if outside:
        raise ConfigError(f"MODEL.VIT.WINDOW_BLOCK_INDEXES {outside} are not blocks of a depth-{vit.DEPTH} ViT")
    grid = vit.IMG_SIZE // vit.PATCH_SIZE
    if vit.WINDOW_BLOCK_INDEXES:
        if not 0 < vit.WINDOW_SIZE <= grid:
            raise ConfigError(f"MODEL.VIT.WINDOW_SIZE {vit.WINDOW_SIZE} must be in 1..{grid} (the {grid} x {grid} patch grid)")
        if grid % vit.WINDOW_SIZE and not vit.ALLOW_WINDOW_PADDING:
            raise ConfigError(
                f"MODEL.VIT.WINDOW_SIZE {vit.WINDOW_SIZE} does not divide the {grid} x {grid} patch grid "
                f"(MODEL.VIT.IMG_SIZE {vit.IMG_SIZE} / PATCH_SIZE {vit.PATCH_SIZE}); pick a divisor or set "
                f"MODEL.VIT.ALLOW_WINDOW_PADDING True to pad every window block"
            )
    unsupported = [s for s in sfp.SCALE_FACTORS if s not in SFP_SCALE_FACTORS]
    if unsupported:
        raise ConfigError(f"MODEL.SFP.SCALE_FACTORS {list(sfp.SCALE_FACTORS)}: detectron2's SimpleFeaturePyramid "
                          f"implements only {', '.join(f'{s:g}' for s in SFP_SCALE_FACTORS)}")
    if math.log2(vit.PATCH_SIZE) != int(math.log2(vit.PATCH_SIZE)):
        raise ConfigError(f"MODEL.VIT.PATCH_SIZE {vit.PATCH_SIZE} is not a power of 2, so neither are the feature "
                          "pyramid's strides; ViTDet needs a ViT with patch 16 (a *_patch16_* one)")
    strides = [int(vit.PATCH_SIZE / s) for s in sfp.SCALE_FACTORS]
    coarsest = max(strides) * 2  # LastLevelMaxPool halves the last level once more
    made = {f"p{int(math.log2(s))}" for s in [*strides, coarsest]}
    wanted = sorted({*cfg.MODEL.RPN.IN_FEATURES, *cfg.MODEL.ROI_HEADS.IN_FEATURES} - made)
    if wanted:
        raise ConfigError(
            f"MODEL.VIT.PATCH_SIZE {vit.PATCH_SIZE} with MODEL.SFP.SCALE_FACTORS {list(sfp.SCALE_FACTORS)} gives "
            f"the features {', '.join(sorted(made))}, but MODEL.RPN.IN_FEATURES and MODEL.ROI_HEADS.IN_FEATURES also "
            f"take {', '.join(wanted)}; the ViTDet configs need patch 16 (a *_patch16_* ViT)"
        )
    if sfp.SQUARE_PAD % coarsest:
        raise ConfigError(f"MODEL.SFP.SQUARE_PAD {sfp.SQUARE_PAD} is not a multiple of the coarsest stride {coarsest}")
    if cfg.INPUT.LSJ.ENABLED and sfp.SQUARE_PAD and sfp.SQUARE_PAD < cfg.INPUT.LSJ.IMAGE_SIZE:
        raise ConfigError(
            f"MODEL.SFP.SQUARE_PAD {sfp.SQUARE_PAD} is smaller than INPUT.LSJ.IMAGE_SIZE {cfg.INPUT.LSJ.IMAGE_SIZE}: "
            f"detectron2 would crop one image and fail on a batch"
        )
    if sfp.SQUARE_PAD and not cfg.INPUT.LSJ.ENABLED and sfp.SQUARE_PAD < cfg.INPUT.MAX_SIZE_TRAIN:
        raise ConfigError(
            f"MODEL.SFP.SQUARE_PAD {sfp.SQUARE_PAD} is smaller than INPUT.MAX_SIZE_TRAIN {cfg.INPUT.MAX_SIZE_TRAIN}: "
            f"larger training images would be cropped"
        )
    if sfp.SQUARE_PAD and sfp.SQUARE_PAD < cfg.INPUT.MAX_SIZE_TEST:
        raise ConfigError(
            f"MODEL.SFP.SQUARE_PAD {sfp.SQUARE_PAD} is smaller than INPUT.MAX_SIZE_TEST {cfg.INPUT.MAX_SIZE_TEST}: "
            f"larger test images would be cropped"
        )


def build_vit(cfg) -> ViT:
    """detectron2's ``ViT`` from ``MODEL.VIT`` (``last_feat``: stride PATCH_SIZE, EMBED_DIM channels)."""
    import_timm()  # ViT blocks import timm.models.layers; import it without its FutureWarning
    vit = cfg.MODEL.VIT
    return ViT(
        img_size=vit.IMG_SIZE,
        patch_size=vit.PATCH_SIZE,
        embed_dim=vit.EMBED_DIM,
        depth=vit.DEPTH,
        num_heads=vit.NUM_HEADS,
        mlp_ratio=vit.MLP_RATIO,
        qkv_bias=vit.QKV_BIAS,
        drop_path_rate=vit.DROP_PATH_RATE,
        norm_layer=partial(nn.LayerNorm, eps=vit.NORM_EPS),
        use_abs_pos=vit.USE_ABS_POS,
        use_rel_pos=vit.USE_REL_POS,
        window_size=vit.WINDOW_SIZE,
        window_block_indexes=list(vit.WINDOW_BLOCK_INDEXES),
        pretrain_img_size=vit.PRETRAIN_IMG_SIZE,
        pretrain_use_cls_token=vit.PRETRAIN_USE_CLS_TOKEN,
        out_feature="last_feat",
    )


@BACKBONE_REGISTRY.register()
def build_vitdet_backbone(cfg, input_shape) -> SimpleFeaturePyramid:
    """ViTDet's backbone: a plain ViT and a simple feature pyramid (p2-p6) built from its last map."""
    check_vit_config(cfg)
    if input_shape.channels != 3:
        raise ConfigError(f"the ViT takes 3-channel images; the input has {input_shape.channels} (MODEL.PIXEL_MEAN)")
    sfp = cfg.MODEL.SFP
    return SimpleFeaturePyramid(
        net=build_vit(cfg),
        in_feature="last_feat",
        out_channels=sfp.OUT_CHANNELS,
        scale_factors=tuple(sfp.SCALE_FACTORS),
        top_block=LastLevelMaxPool(),
        norm=sfp.NORM,
        square_pad=sfp.SQUARE_PAD,
    )
