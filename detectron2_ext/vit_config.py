"""Config keys of the ViTDet recipe in the project's yacs configs (``add_vitdet_config``).

detectron2's yacs config already has the head-side keys ViTDet uses (``MODEL.RPN.CONV_DIMS``,
``MODEL.ROI_BOX_HEAD.NORM``/``NUM_CONV``/``USE_SIGMOID_CE``/``USE_FED_LOSS``,
``MODEL.ROI_MASK_HEAD.NORM``, the repeat-factor sampler); what it lacks, ViTDet sets in Python
LazyConfig files (detectron2's projects/ViTDet). Those settings become keys here, with the
defaults of ``ViT``/``SimpleFeaturePyramid`` and of the ViTDet-B recipe where it fixes a value:

- ``MODEL.VIT.*``: the arguments of detectron2's ``ViT`` (``detectron2_ext.vit_backbone``);
- ``MODEL.SFP.*``: the arguments of ``SimpleFeaturePyramid``;
- ``SOLVER.OPTIMIZER`` (``SGD``, detectron2's, or ``ADAMW`` with layer-wise lr decay),
  ``SOLVER.BETAS``, ``SOLVER.VIT_LR_DECAY_RATE``, ``SOLVER.WEIGHT_DECAY_POS_EMBED``;
- ``INPUT.LSJ.*``: large-scale jitter for training (``detectron2_ext.vit_training``).
"""
from detectron2.config import CfgNode as CN

#: MODEL.BACKBONE.NAME of the ViT + simple feature pyramid backbone.
VITDET_BACKBONE = "build_vitdet_backbone"


def add_vitdet_config(cfg) -> None:
    """Add the ViTDet keys to a detectron2 config, in place (defaults change nothing for
    configs that do not use them: SGD, no LSJ, a ResNet backbone)."""
    vit = cfg.MODEL.VIT = CN()
    vit.PATCH_SIZE = 16
    vit.EMBED_DIM = 768
    vit.DEPTH = 12
    vit.NUM_HEADS = 12
    vit.MLP_RATIO = 4.0
    vit.QKV_BIAS = True
    vit.DROP_PATH_RATE = 0.1
    vit.NORM_EPS = 1e-6  # ViTDet's and timm's LayerNorm eps (detectron2's ViT class defaults to 1e-5)
    vit.IMG_SIZE = 1024  # the fine-tuning input size; sizes the global blocks' rel-pos tables
    vit.USE_ABS_POS = True
    vit.USE_REL_POS = True
    vit.WINDOW_SIZE = 14
    vit.WINDOW_BLOCK_INDEXES = [0, 1, 3, 4, 6, 7, 9, 10]  # the others (2, 5, 8, 11) are global
    # A window size that does not divide the IMG_SIZE / PATCH_SIZE grid pads every window
    # block's tokens (ViTDet-B: 64 -> 70 for window 14 at 1024 px). False: that is refused, so
    # a mistyped window cannot quietly add padding; the ViTDet-B configs set True.
    vit.ALLOW_WINDOW_PADDING = False
    # What the position embeddings were pretrained for: tools/convert_backbone.py records both
    # and the run refuses weights that disagree.
    vit.PRETRAIN_IMG_SIZE = 224
    vit.PRETRAIN_USE_CLS_TOKEN = True

    sfp = cfg.MODEL.SFP = CN()
    sfp.OUT_CHANNELS = 256
    sfp.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]  # p2..p5; LastLevelMaxPool adds p6
    sfp.NORM = "LN"
    # Batches are padded to this square (0: to their largest image). SimpleFeaturePyramid
    # misspells its size_divisibility constraint, so this is the only padding it gets.
    sfp.SQUARE_PAD = 1024

    cfg.SOLVER.OPTIMIZER = "SGD"  # SGD: detectron2's | ADAMW: with layer-wise lr decay for a ViT
    cfg.SOLVER.BETAS = [0.9, 0.999]  # ADAMW
    # ADAMW: a ViT parameter in block i (of depth L) gets lr * rate ** (L + 1 - (i + 1)); patch
    # and position embeddings rate ** (L + 1); everything outside the ViT the full lr. The depth
    # is read from the built ViT (detectron2's helper defaults to 12 whatever the depth).
    cfg.SOLVER.VIT_LR_DECAY_RATE = 1.0
    cfg.SOLVER.WEIGHT_DECAY_POS_EMBED = 0.0  # ADAMW: ViTDet's override for pos_embed

    lsj = cfg.INPUT.LSJ = CN()
    lsj.ENABLED = False  # True: flip, ResizeScale, FixedSizeCrop instead of INPUT.MIN_SIZE_TRAIN
    lsj.IMAGE_SIZE = 1024
    lsj.MIN_SCALE = 0.1
    lsj.MAX_SCALE = 2.0
