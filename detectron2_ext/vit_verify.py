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
from urllib.parse import parse_qs, urlparse

from detectron2.modeling import build_model

from pretrain.checkpoint_io import read_checkpoint
from pretrain.errors import MissingInputError

from .convert import (
    CHOSEN_ENTRIES,
    ConversionError,
    anchor_prefixes,
    extract_state_dict,
    locate_resnet,
)
from .verify import TargetCheck, load_exactly, record_kind, record_mismatches
from .vit_backbone import check_vit_config
from .vit_config import VITDET_BACKBONE
from .vit_convert import ANCHOR_KEY as VIT_ANCHOR
from .vit_convert import TARGET_PREFIX, ConvertedViT
from .vit_training import check_solver_config


def config_kind(cfg) -> str:
    """``"vit"`` when the config builds the ViTDet backbone, else ``"resnet"``."""
    return "vit" if cfg.MODEL.BACKBONE.NAME == VITDET_BACKBONE else "resnet"


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


def _places(prefixes, entry: str | None) -> str:
    """Where backbones are, in words: ``keys 'module.backbone.*' of the 'teacher' entry``; the
    entry is named where it was chosen among several networks, not for a mere wrapper."""
    places = ", ".join(f"keys '{p}*'" if p else "top-level keys" for p in prefixes)
    return f"{places} of the '{entry}' entry" if entry in CHOSEN_ENTRIES else places


def unconverted_backbone(checkpoint) -> str | None:
    """The backbone that the converter would find in ``checkpoint``, which has no conversion
    record (``"a ResNet in torchvision's names (keys 'module.encoder_q.*')"``), or None.

    Found as the converter finds it (:func:`.convert.locate_resnet`, :func:`.vit_convert.find_vit_prefix`'s
    anchor), in any layout it reads (a pretraining checkpoint, a DDP wrapper, ``{"state_dict": ...}``,
    DINO's teacher, a plain state dict, with or without heads or a momentum copy); where the
    converter would refuse a file with several ResNets, all are named. A ViT under detectron2's
    own ``backbone.net.`` (e.g. train_net's ``model_final.pth``) is not one.
    """
    if not isinstance(checkpoint, dict) or isinstance(checkpoint.get("conversion"), dict):
        return None
    resnet = locate_resnet(checkpoint)
    if resnet.candidates:
        found = [resnet.prefix] if resnet.prefix is not None else resnet.candidates
        return f"a ResNet in torchvision's names ({_places(found, resnet.entry)})"
    vits = [p for p in anchor_prefixes(extract_state_dict(checkpoint), VIT_ANCHOR) if p != TARGET_PREFIX]
    return f"a ViT in timm's names ({_places(vits, resnet.entry)})" if vits else None


def weights_file(weights: str) -> str:
    """The file that detectron2's checkpointer reads for ``MODEL.WEIGHTS``: the value without a
    ``?query`` such as ``?matching_heuristics=True`` (the form of detectron2's ViTDet configs)."""
    return urlparse(weights)._replace(query="").geturl()


def matches_names(weights: str, checkpoint) -> bool:
    """Whether detectron2 loads the file by name-matching heuristics (asked for by the query or
    by the file), which place what they can guess and skip the rest with a warning."""
    return parse_qs(urlparse(weights).query).get("matching_heuristics") == ["True"] or (
        isinstance(checkpoint, dict) and checkpoint.get("matching_heuristics") is True
    )


def refuse_unconverted(weights: str, checkpoint) -> None:
    """ConversionError, with the command that converts it, when ``checkpoint`` (read from
    ``MODEL.WEIGHTS``) holds a backbone that was never converted for detectron2."""
    unconverted = unconverted_backbone(checkpoint)
    if unconverted:
        loads = ("detectron2's name matching would load only what it guesses, unchecked"
                 if matches_names(weights, checkpoint) else "detectron2 would load none of it")
        raise ConversionError(
            f"MODEL.WEIGHTS {weights}: {unconverted} with no conversion record, not detectron2 weights ({loads}); "
            f"convert it first: python tools/convert_backbone.py --input {weights_file(weights)} --output <name>.pth "
            f"--config-file <this config>"
        )


def check_weights_fit_backbone(cfg, allow_unsafe_pickle: bool = False, resume: bool = False) -> None:
    """Before a fine-tuning run: an input error when ``MODEL.WEIGHTS`` names a local file that
    is missing, a backbone that was never converted (in any layout the converter reads; of such
    a file detectron2 loads nothing, or what name matching guesses, and trains the rest from
    random init), a converted backbone of the other kind (ResNet weights for a ViTDet config, or
    the reverse), or one whose record contradicts the config (``MODEL.VIT``'s patch size,
    pretraining image size, class slot or shape; ``MODEL.RESNETS``' depth, groups, widths or
    stride placement). Other files (e.g. a detectron2 checkpoint) are left to detectron2, and
    nothing is checked when ``resume`` finds the run's own checkpoint, which detectron2 then
    loads instead."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights:
        return
    if resume and (Path(cfg.OUTPUT_DIR) / "last_checkpoint").is_file():
        return
    path = Path(weights_file(weights))
    if not path.is_file():
        raise MissingInputError(f"MODEL.WEIGHTS {weights}: file not found")
    checkpoint = read_checkpoint(path, allow_unsafe_pickle) if path.suffix != ".pkl" else {}
    refuse_unconverted(weights, checkpoint)
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
    problems = record_mismatches(cfg, record)
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
