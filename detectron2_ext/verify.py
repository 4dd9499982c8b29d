"""Check converted ResNet weights against the detectron2 models they are meant for.

For each target config, ``MODEL.RESNETS`` must say what the conversion recorded (depth, groups,
widths, where the stride is); the model is then built, the converted file is loaded through
detectron2's checkpointer (with name-matching heuristics, exactly as ``MODEL.WEIGHTS`` is loaded
for training), and every ResNet parameter and buffer of the model is required to come from the
file, with the right shape and the exact value: nothing missing, unexpected or misplaced.

The comparison of a conversion record with a config (:func:`record_mismatches`) serves both
backbone kinds, here and before a fine-tuning run (:mod:`.vit_verify`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from detectron2.layers import CNNBlockBase, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone import ResNet

from .checkpoint import SafeDetectionCheckpointer
from .convert import ConversionError, ConvertedBackbone
from .vit_config import VITDET_BACKBONE

# What torchvision ResNets expect: RGB input normalised by the ImageNet mean/std (0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


#: For each backbone kind: the config node under MODEL that must hold the converted weights,
#: and its keys -> the conversion record's field each must equal (where the record has it).
RECORDED = {
    "vit": ("VIT", {
        "EMBED_DIM": "embed_dim",
        "DEPTH": "depth",
        "PATCH_SIZE": "patch_size",
        "PRETRAIN_IMG_SIZE": "pretrain_img_size",
        "PRETRAIN_USE_CLS_TOKEN": "pretrain_use_cls_token",
        "MLP_RATIO": "mlp_ratio",
        "QKV_BIAS": "qkv_bias",
        "NUM_HEADS": "num_heads",  # recorded where the source says (a pretraining config), else unchecked
    }),
    "resnet": ("RESNETS", {  # records of files converted before the widths were recorded have the depth only
        "DEPTH": "depth",
        "NUM_GROUPS": "num_groups",
        "WIDTH_PER_GROUP": "width_per_group",  # bottlenecks only
        "STRIDE_IN_1X1": "stride_in_1x1",  # bottlenecks only
        "STEM_OUT_CHANNELS": "stem_out_channels",
        "RES2_OUT_CHANNELS": "res2_out_channels",
    }),
}


def record_kind(record: dict) -> str:
    """``"vit"`` or ``"resnet"`` for a conversion record (ResNet records of older files have no ``backbone``)."""
    return record.get("backbone", "resnet")


def record_mismatches(cfg, record: dict) -> list[str]:
    """``MODEL.<NODE>.KEY is X; the weights need Y`` for each recorded property the config
    contradicts: detectron2 would then build layers of other shapes, whose tensors it skips
    with a warning and leaves at random init, or compute something else with the same tensors."""
    node, fields = RECORDED[record_kind(record)]
    return [
        f"MODEL.{node}.{key} is {cfg.MODEL[node][key]}; the weights need {record[field]}"
        for key, field in fields.items()
        if field in record and cfg.MODEL[node][key] != record[field]
    ]


@dataclass
class TargetCheck:
    """What loading the converted weights into one target model did."""

    name: str
    architecture: str
    loaded: int  # model tensors filled from the converted weights
    untouched: list = field(default_factory=list)  # ResNet-side layers with no pretrained counterpart
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.name}: {self.architecture}: {self.loaded} backbone tensors loaded exactly"
        if self.untouched:
            text += f"; no pretrained counterpart, left at init: {', '.join(self.untouched)}"
        return text


def check_config(cfg, backbone: ConvertedBackbone, name: str) -> list:
    """Raise ConversionError where the config cannot use these weights; return warnings."""
    if cfg.MODEL.BACKBONE.NAME == VITDET_BACKBONE:
        raise ConversionError(
            f"{name}: the checkpoint holds a ResNet-{backbone.depth} but this config builds a ViT "
            f"(MODEL.BACKBONE.NAME {VITDET_BACKBONE}); use a ResNet config"
        )
    problems = record_mismatches(cfg, backbone.metadata)
    if problems:
        raise ConversionError(f"{name}: " + "; ".join(problems))
    warnings = []
    if cfg.INPUT.FORMAT != "RGB":
        warnings.append(f"INPUT.FORMAT is {cfg.INPUT.FORMAT}; torchvision-style backbones were trained on RGB")
    for key, expected in (("PIXEL_MEAN", TORCHVISION_PIXEL_MEAN), ("PIXEL_STD", TORCHVISION_PIXEL_STD)):
        value = tuple(getattr(cfg.MODEL, key))
        if len(value) != 3 or any(abs(a - b) > 1e-3 for a, b in zip(value, expected)):
            warnings.append(f"MODEL.{key} is {list(value)}; the backbone was trained with {list(expected)}")
    return warnings


def backbone_key_map(model) -> tuple[dict, set]:
    """Map the model's ResNet state keys to converted key names.

    Returns ``(model key -> converted key, converted keys the model cannot hold)``; the latter
    are ``num_batches_tracked`` counters of FrozenBN layers, which have none.
    """
    resnets = [(name, module) for name, module in model.named_modules() if isinstance(module, ResNet)]
    if len(resnets) != 1:
        raise ConversionError(f"expected one detectron2 ResNet in the model, found {len(resnets)}")
    prefix, resnet = resnets[0]
    prefix = prefix + "." if prefix else ""
    key_map = {prefix + key: key for key in resnet.state_dict()}
    frozen = {f"{name}.num_batches_tracked" for name, m in resnet.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    res5_head = getattr(getattr(model, "roi_heads", None), "res5", None)
    if res5_head is not None:  # C4: res5 runs in the ROI head
        for index, block in res5_head.named_children():
            if isinstance(block, CNNBlockBase):
                key_map.update({f"roi_heads.res5.{index}.{k}": f"res5.{index}.{k}" for k in block.state_dict()})
                frozen |= {f"res5.{index}.{n}.num_batches_tracked" for n, m in block.named_modules()
                           if isinstance(m, FrozenBatchNorm2d)}
    return key_map, frozen


def _untouched_head_layers(model) -> list:
    """Names of non-block layers inside a res5 ROI head (e.g. Res5ROIHeadsExtraNorm's norm)."""
    res5_head = getattr(getattr(model, "roi_heads", None), "res5", None)
    if res5_head is None:
        return []
    return [f"roi_heads.res5.{n}" for n, m in res5_head.named_children() if not isinstance(m, CNNBlockBase)]


@contextlib.contextmanager
def _quiet_checkpoint_logs():
    """Silence detectron2/fvcore load logs: all heads are reported missing, which is expected here."""
    names = ("fvcore.common.checkpoint", "detectron2.checkpoint.c2_model_loading", "detectron2.layers.batch_norm")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_exactly(model, key_map: dict, converted: dict, weights_path, what: str, unplaced=frozenset()) -> None:
    """Load ``weights_path`` into ``model`` through detectron2's checkpointer and require every
    model key of ``key_map`` (model key -> converted key) to receive its converted tensor exactly.

    Before loading, the converted keys must match the map: none missing, none without a place
    (``unplaced`` lists those the model legitimately cannot hold), no shape mismatch.
    ConversionError starts with ``what`` (e.g. ``"coco.yaml: backbone"``).
    """
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(mk for mk, ck in key_map.items() if ck not in converted)
    unexpected = sorted(set(converted) - set(key_map.values()) - set(unplaced))
    wrong_shape = [f"{ck}: {tuple(converted[ck].shape)} in the weights, {shapes[mk]} in the model"
                   for mk, ck in key_map.items() if ck in converted and tuple(converted[ck].shape) != shapes[mk]]
    problems = [(missing, "missing from the weights"), (unexpected, "not in the model"), (wrong_shape, "of the wrong shape")]
    errors = [f"{len(keys)} {kind} (e.g. {keys[:3]})" for keys, kind in problems if keys]
    if errors:
        raise ConversionError(f"{what} weights do not fit {type(model).__name__}: " + "; ".join(errors))
    with _quiet_checkpoint_logs():
        SafeDetectionCheckpointer(model).load(str(weights_path))
    state = model.state_dict()
    misplaced = [mk for mk, ck in key_map.items() if not torch.equal(state[mk], converted[ck].to(state[mk].dtype))]
    if misplaced:
        raise ConversionError(
            f"{what}: DetectionCheckpointer did not load {len(misplaced)} tensors from the converted file "
            f"(e.g. {misplaced[:3]})"
        )


def verify_target(cfg, backbone: ConvertedBackbone, weights_path, name: str) -> TargetCheck:
    """Build ``cfg``'s model on CPU, load ``weights_path`` through the checkpointer, check it."""
    warnings = check_config(cfg, backbone, name)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    key_map, frozen_counters = backbone_key_map(model)
    load_exactly(model, key_map, backbone.state_dict, weights_path, f"{name}: backbone", frozen_counters)
    architecture = f"{cfg.MODEL.META_ARCHITECTURE} {cfg.MODEL.BACKBONE.NAME} R{cfg.MODEL.RESNETS.DEPTH} {cfg.MODEL.RESNETS.NORM}"
    return TargetCheck(name, architecture, len(key_map), _untouched_head_layers(model), warnings)
