"""Check converted ViT weights against the ViTDet models they are meant for, and a run's
``MODEL.WEIGHTS`` against its backbone before training.

For each target config, ``MODEL.VIT`` must describe the converted ViT (width, depth, patch size,
pretraining image size, class slot, MLP ratio, qkv bias, and the head count where the source
records it); the model is then built, the file loaded
through detectron2's checkpointer exactly as ``MODEL.WEIGHTS`` is for training, and every
``backbone.net.*`` tensor but the relative-position tables (which the pretraining ViT has not)
must come from the file, with its exact value.
"""
from __future__ import annotations

from pathlib import Path

from detectron2.modeling import build_model

from pretrain.checkpoint_io import read_checkpoint
from pretrain.errors import MissingInputError

from .convert import ConversionError
from .verify import TargetCheck, load_exactly
from .vit_backbone import check_vit_config
from .vit_config import VITDET_BACKBONE
from .vit_convert import TARGET_PREFIX, ConvertedViT
from .vit_training import check_solver_config

#: MODEL.VIT key -> the conversion record's field it must equal.
RECORDED = {
    "EMBED_DIM": "embed_dim",
    "DEPTH": "depth",
    "PATCH_SIZE": "patch_size",
    "PRETRAIN_IMG_SIZE": "pretrain_img_size",
    "PRETRAIN_USE_CLS_TOKEN": "pretrain_use_cls_token",
    "MLP_RATIO": "mlp_ratio",
    "QKV_BIAS": "qkv_bias",
    "NUM_HEADS": "num_heads",  # recorded where the source says (a pretraining config), else unchecked
}


def record_kind(record: dict) -> str:
    """``"vit"`` or ``"resnet"`` for a conversion record (ResNet records of older files have no ``backbone``)."""
    return record.get("backbone", "resnet")


def config_kind(cfg) -> str:
    """``"vit"`` when the config builds the ViTDet backbone, else ``"resnet"``."""
    return "vit" if cfg.MODEL.BACKBONE.NAME == VITDET_BACKBONE else "resnet"


def record_mismatches(cfg, record: dict) -> list[str]:
    """``MODEL.VIT.KEY is X; the weights need Y`` for each recorded property the config contradicts."""
    return [
        f"MODEL.VIT.{key} is {cfg.MODEL.VIT[key]}; the weights need {record[field]}"
        for key, field in RECORDED.items()
        if field in record and cfg.MODEL.VIT[key] != record[field]
    ]


def check_vit_target_config(cfg, backbone: ConvertedViT, name: str) -> None:
    """ConversionError naming the key where ``cfg`` cannot hold ``backbone`` exactly."""
    if config_kind(cfg) != "vit":
        raise ConversionError(
            f"{name}: the checkpoint holds a ViT but this config builds MODEL.BACKBONE.NAME "
            f"{cfg.MODEL.BACKBONE.NAME}; use a ViTDet config ({VITDET_BACKBONE})"
        )
    problems = record_mismatches(cfg, backbone.metadata)
    if problems:
        raise ConversionError(f"{name}: " + "; ".join(problems))
    check_vit_config(cfg)  # a model that detectron2 could not build or feed


def verify_vit_target(cfg, backbone: ConvertedViT, weights_path, name: str) -> TargetCheck:
    """Build ``cfg``'s model on CPU, load ``weights_path`` through the checkpointer, check every ViT tensor."""
    check_vit_target_config(cfg, backbone, name)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    vit_keys = [k for k in model.state_dict() if k.startswith(TARGET_PREFIX)]
    new = [k for k in vit_keys if k.endswith((".rel_pos_h", ".rel_pos_w"))]  # the pretraining ViT has none
    expected = sorted(set(vit_keys) - set(new))
    load_exactly(model, {k: k for k in expected}, backbone.state_dict, weights_path, f"{name}: ViT")
    vit = cfg.MODEL.VIT
    architecture = (f"{cfg.MODEL.META_ARCHITECTURE} ViT-D{vit.EMBED_DIM}-L{vit.DEPTH}/{vit.PATCH_SIZE} at {vit.IMG_SIZE} px "
                    f"+ SimpleFeaturePyramid")
    untouched = [f"{len(new)} relative-position tables (zero-initialised)"] if new else []
    return TargetCheck(name, architecture, len(expected), untouched, [])


def unconverted_kind(checkpoint) -> str | None:
    """What an unconverted backbone file is (a pretraining checkpoint or a torchvision ResNet
    state dict), or None: detectron2 would match none of its keys and train from random init."""
    if not isinstance(checkpoint, dict):
        return None
    model = checkpoint.get("model")
    if isinstance(model, dict) and any(isinstance(k, str) and k.startswith("visual.") for k in model):
        return "a pretraining checkpoint (its 'model' holds visual.* weights)"
    if "layer1.0.conv1.weight" in checkpoint and "fc.weight" in checkpoint:
        return "a torchvision ResNet state dict"
    return None


def check_weights_fit_backbone(cfg, allow_unsafe_pickle: bool = False, resume: bool = False) -> None:
    """Before a fine-tuning run: an input error when ``MODEL.WEIGHTS`` names a local file that
    is missing, an unconverted backbone (a pretraining checkpoint or a torchvision state dict,
    of which detectron2 would load nothing, silently), a converted backbone of the other kind
    (ResNet weights for a ViTDet config, or the reverse), or a ViT whose recorded patch size,
    pretraining image size, class slot or shape contradicts ``MODEL.VIT``. Other files (e.g. a
    detectron2 checkpoint) are left to detectron2, and nothing is checked when ``resume`` finds
    the run's own checkpoint, which detectron2 then loads instead."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights:
        return
    if resume and (Path(cfg.OUTPUT_DIR) / "last_checkpoint").is_file():
        return
    if not Path(weights).is_file():
        raise MissingInputError(f"MODEL.WEIGHTS {weights}: file not found")
    checkpoint = read_checkpoint(weights, allow_unsafe_pickle) if Path(weights).suffix != ".pkl" else {}
    unconverted = unconverted_kind(checkpoint)
    if unconverted:
        raise ConversionError(
            f"MODEL.WEIGHTS {weights}: {unconverted}, not detectron2 weights (nothing would load); convert "
            f"it first: python tools/convert_backbone.py --input {weights} --output <name>.pth --config-file <this config>"
        )
    record = checkpoint.get("conversion") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict):
        return
    kind, wanted = record_kind(record), config_kind(cfg)
    if kind != wanted:
        held = "a ViT" if kind == "vit" else f"a ResNet-{record.get('depth', '?')}"
        raise ConversionError(
            f"{weights}: holds {held} backbone, but MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME} builds "
            f"{'a ViT' if wanted == 'vit' else 'a ResNet'}; nothing would load"
        )
    problems = record_mismatches(cfg, record) if kind == "vit" else []
    if problems:
        raise ConversionError(f"{weights}: " + "; ".join(problems))


def check_backbone_run(cfg, allow_unsafe_pickle: bool = False, resume: bool = False) -> None:
    """Everything about the backbone that can be judged before a fine-tuning run starts: the
    optimiser name, the ViTDet keys (window size against the grid, padding, strides) and whether
    ``MODEL.WEIGHTS`` fits the backbone. Errors are input errors naming the key or the file."""
    check_solver_config(cfg)
    if config_kind(cfg) == "vit":
        check_vit_config(cfg)
    check_weights_fit_backbone(cfg, allow_unsafe_pickle, resume)
