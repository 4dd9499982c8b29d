"""ViTDet's training recipe for detectron2's yacs ``DefaultTrainer``: the AdamW optimiser with
layer-wise lr decay, the large-scale-jitter data loader, and AMP only where it can run.

``tools/train_net.py`` (its ``Trainer``) and ``tools/benchmark.py finetune`` build their optimizer
and train loader with :func:`build_recipe_optimizer` and :func:`build_recipe_train_loader`:
ViTDet's when ``SOLVER.OPTIMIZER`` is ``ADAMW`` and ``INPUT.LSJ.ENABLED`` is true, otherwise
detectron2's SGD and resize augmentation, exactly as ``DefaultTrainer`` builds them (with a mapper
that names an unreadable image, :mod:`detectron2_ext.image_mapper`).
"""
from __future__ import annotations

import logging
from functools import partial

import torch
from detectron2.data import build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.modeling.backbone.vit import ViT, get_vit_lr_decay_rate
from detectron2.solver import build_optimizer
from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
)

from pretrain.config import ConfigError

from .image_mapper import ImageNamingMapper
from .vit_config import VITDET_BACKBONE

OPTIMIZERS = ("SGD", "ADAMW")

logger = logging.getLogger(__name__)


def find_vit(model: torch.nn.Module) -> tuple[str, ViT] | None:
    """(module name, module) of the one detectron2 ``ViT`` inside ``model``, or None."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, ViT)]
    if len(found) > 1:
        raise ConfigError(f"the model has {len(found)} ViTs ({[n for n, _ in found]}); layer-wise lr decay needs one")
    return found[0] if found else None


def vit_lr_factor(model: torch.nn.Module, decay_rate: float):
    """``name -> lr factor`` of ViTDet's layer-wise decay, with the depth of the model's own ViT
    (detectron2's ``get_vit_lr_decay_rate`` counts 12 layers unless told, whatever the depth)."""
    located = find_vit(model)
    if located is None:
        raise ConfigError(f"SOLVER.VIT_LR_DECAY_RATE is {decay_rate}, but the model has no ViT to decay")
    name, vit = located
    if not name.startswith("backbone"):
        raise ConfigError(f"the ViT is at '{name}'; layer-wise lr decay expects it under 'backbone'")
    return partial(get_vit_lr_decay_rate, lr_decay_rate=decay_rate, num_layers=len(vit.blocks))


def build_adamw_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """ViTDet's optimiser: AdamW over detectron2's default parameter groups (no decay on
    ``torch.nn`` norms, none on ``pos_embed``), the lr of each ViT parameter scaled by
    ``SOLVER.VIT_LR_DECAY_RATE`` per block above it, and detectron2's optional gradient clipping."""
    check_solver_config(cfg)
    solver = cfg.SOLVER
    lr_factor, decay = None, "no layer-wise lr decay"
    if solver.VIT_LR_DECAY_RATE != 1.0:
        lr_factor = vit_lr_factor(model, solver.VIT_LR_DECAY_RATE)
        decay = f"layer-wise lr decay {solver.VIT_LR_DECAY_RATE} over {lr_factor.keywords['num_layers']} ViT blocks"
    logger.info("optimizer: AdamW (ViTDet recipe), %s", decay)
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
        lr_factor_func=lr_factor,
        overrides={"pos_embed": {"weight_decay": solver.WEIGHT_DECAY_POS_EMBED}},
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=solver.BASE_LR, betas=tuple(solver.BETAS),
                                                                weight_decay=solver.WEIGHT_DECAY)


def lsj_augmentations(cfg) -> list:
    """Large-scale jitter: horizontal flip, ``ResizeScale`` to MIN-MAX_SCALE of IMAGE_SIZE squared,
    then ``FixedSizeCrop`` of IMAGE_SIZE squared without padding (the batch is padded by the
    pyramid's ``square_pad``)."""
    lsj = cfg.INPUT.LSJ
    if not 0 < lsj.MIN_SCALE <= lsj.MAX_SCALE:
        raise ConfigError(f"INPUT.LSJ.MIN_SCALE {lsj.MIN_SCALE} and MAX_SCALE {lsj.MAX_SCALE} must satisfy 0 < MIN <= MAX")
    size = lsj.IMAGE_SIZE
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(min_scale=lsj.MIN_SCALE, max_scale=lsj.MAX_SCALE, target_height=size, target_width=size),
        T.FixedSizeCrop(crop_size=(size, size), pad=False),
    ]


def build_lsj_train_loader(cfg):
    """detectron2's train loader with the LSJ mapper; boxes are recomputed from the cropped masks."""
    mapper = ImageNamingMapper(cfg, is_train=True, augmentations=lsj_augmentations(cfg),
                               recompute_boxes=cfg.MODEL.MASK_ON)
    return build_detection_train_loader(cfg, mapper=mapper)


def build_recipe_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The config's optimiser: ViTDet's AdamW (``SOLVER.OPTIMIZER ADAMW``) or detectron2's SGD."""
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        return build_adamw_optimizer(cfg, model)
    check_solver_config(cfg)  # an unknown name (also checked before launch, vit_verify.check_backbone_run)
    logger.info("optimizer: detectron2's SGD")
    return build_optimizer(cfg, model)


def build_recipe_train_loader(cfg):
    """The config's train loader: large-scale jitter (``INPUT.LSJ.ENABLED``) or detectron2's default."""
    if cfg.INPUT.LSJ.ENABLED:
        lsj = cfg.INPUT.LSJ
        logger.info("train loader: large-scale jitter, %g-%g of %dx%d", lsj.MIN_SCALE, lsj.MAX_SCALE,
                    lsj.IMAGE_SIZE, lsj.IMAGE_SIZE)
        return build_lsj_train_loader(cfg)
    logger.info("train loader: detectron2's (INPUT.MIN_SIZE_TRAIN resizing)")
    return build_detection_train_loader(cfg, mapper=ImageNamingMapper(cfg, is_train=True))


def disable_amp_without_cuda(cfg) -> bool:
    """Turn ``SOLVER.AMP.ENABLED`` off (in a mutable config) where CUDA is absent: detectron2's
    AMP trainer asserts CUDA. Returns whether it changed anything (the caller logs it)."""
    if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
        cfg.SOLVER.AMP.ENABLED = False
        logger.warning("SOLVER.AMP.ENABLED: off, this machine has no CUDA (fp32 training)")
        return True
    return False


def check_solver_config(cfg) -> None:
    """ConfigError naming the key for an unknown ``SOLVER.OPTIMIZER``, AdamW betas or a layer-wise
    decay rate out of range, or a decay rate below 1 for a model without a ViT (it would be ignored)."""
    solver = cfg.SOLVER
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ConfigError(f"SOLVER.OPTIMIZER is '{solver.OPTIMIZER}'; must be one of {', '.join(OPTIMIZERS)}")
    if solver.OPTIMIZER != "ADAMW":
        return
    if len(solver.BETAS) != 2 or not all(0 <= b < 1 for b in solver.BETAS):
        raise ConfigError(f"SOLVER.BETAS is {list(solver.BETAS)}; must be two numbers in [0, 1)")
    if not 0 < solver.VIT_LR_DECAY_RATE <= 1:
        raise ConfigError(f"SOLVER.VIT_LR_DECAY_RATE is {solver.VIT_LR_DECAY_RATE}; must be in (0, 1]")
    if solver.VIT_LR_DECAY_RATE != 1 and cfg.MODEL.BACKBONE.NAME != VITDET_BACKBONE:
        raise ConfigError(
            f"SOLVER.VIT_LR_DECAY_RATE is {solver.VIT_LR_DECAY_RATE}, but MODEL.BACKBONE.NAME "
            f"{cfg.MODEL.BACKBONE.NAME} has no ViT to decay; set it to 1.0"
        )
