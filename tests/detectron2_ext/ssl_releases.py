"""State dicts in the key layouts of the ResNet checkpoints that VirTex users compare against, as
their official repositories write them (layouts read from each project's training and release
code; the tensors are a given torchvision ResNet's, the heads tiny stand-ins).

Each builder takes two torchvision state dicts of one architecture (``fc`` included): ``kept``,
the encoder the project transfers, and ``other``, a second encoder with other values (MoCo's key
encoder, DINO's student, ...), so that a test can tell which one was converted. ``RELEASES`` maps
a layout name to its builder and where the right encoder is: (checkpoint entry, key prefix).
"""
from __future__ import annotations

import torch


def backbone(state: dict, prefix: str = "") -> dict:
    """The ResNet keys of a torchvision state dict (its classifier ``fc`` left out), under ``prefix``."""
    return {f"{prefix}{k}": v for k, v in state.items() if not k.startswith("fc.")}


def head(prefix: str, *names: str) -> dict:
    """Stand-in tensors for a projection head's keys: conversion must drop them whatever their shapes."""
    return {f"{prefix}{name}": torch.ones(2) for name in names}


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN_NO_AFFINE = ("running_mean", "running_var", "num_batches_tracked")
# MoCo v3's ResNet projector and predictor: Linear (no bias), BN, ReLU, Linear, BN without affine terms.
_MOCO_V3_MLP = ("0.weight", *(f"1.{f}" for f in _BN), "3.weight", *(f"4.{f}" for f in _BN_NO_AFFINE))


def moco_v1(kept, other):
    """facebookresearch/moco, main_moco.py without --mlp: DDP ``module.``, both encoders with a
    128-d ``fc``, the queue; ``{"epoch", "arch", "state_dict", "optimizer"}``."""
    state = {}
    for name, encoder in (("encoder_q", kept), ("encoder_k", other)):
        state.update(backbone(encoder, f"module.{name}."))
        state.update(head(f"module.{name}.fc.", "weight", "bias"))
    state.update(head("module.", "queue", "queue_ptr"))
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def moco_v2(kept, other):
    """facebookresearch/moco with --mlp (moco_v2_800ep_pretrain.pth.tar): ``fc`` is Linear, ReLU, Linear."""
    checkpoint = moco_v1(kept, other)
    state = checkpoint["state_dict"]
    for name in ("encoder_q", "encoder_k"):
        del state[f"module.{name}.fc.weight"], state[f"module.{name}.fc.bias"]
        state.update(head(f"module.{name}.fc.", "0.weight", "0.bias", "2.weight", "2.bias"))
    return checkpoint


def moco_v3(kept, other):
    """facebookresearch/moco-v3 (r-50-1000ep.pth.tar): ``base_encoder`` and ``momentum_encoder``
    whose ``fc`` is a 2-layer MLP with BatchNorm, a ``predictor``; plus epoch, arch, optimizer, scaler."""
    state = {}
    for name, encoder in (("base_encoder", kept), ("momentum_encoder", other)):
        state.update(backbone(encoder, f"module.{name}."))
        state.update(head(f"module.{name}.fc.", *_MOCO_V3_MLP))
    state.update(head("module.predictor.", *_MOCO_V3_MLP))
    return {"epoch": 300, "arch": "resnet50", "state_dict": state, "optimizer": {}, "scaler": {}}


def swav(kept, other):
    """facebookresearch/swav's release (swav_800ep_pretrain.pth.tar): a flat DDP state dict, the
    projection head (Linear, BN, ReLU, Linear) and the prototypes beside the ResNet under ``module.``."""
    return {**backbone(kept, "module."),
            **head("module.projection_head.", "0.weight", "0.bias", *(f"1.{f}" for f in _BN), "3.weight", "3.bias"),
            **head("module.prototypes.", "weight")}


def swav_training(kept, other):
    """SwAV's training checkpoint (checkpoint.pth.tar): the same state dict under ``state_dict``."""
    return {"epoch": 800, "state_dict": swav(kept, other), "optimizer": {}}


def dino_training(kept, other):
    """facebookresearch/dino's full checkpoint (dino_resnet50_pretrain_full_checkpoint.pth):
    ``student`` and ``teacher``, each a DDP-wrapped MultiCropWrapper (``backbone`` without ``fc``,
    the DINO ``head``); DINO's evaluation reads the teacher."""
    def network(encoder):
        return {**backbone(encoder, "module.backbone."),
                **head("module.head.", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                       "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v")}
    return {"student": network(other), "teacher": network(kept), "optimizer": {}, "epoch": 100,
            "dino_loss": head("", "center")}


def barlow_training(kept, other):
    """facebookresearch/barlowtwins' checkpoint.pth: DDP ``backbone`` (no ``fc``), ``projector``
    and the affine-free ``bn`` under ``model``."""
    model = {**backbone(kept, "module.backbone."),
             **head("module.projector.", "0.weight", *(f"1.{f}" for f in _BN), "3.weight"),
             **head("module.bn.", *_BN_NO_AFFINE)}
    return {"epoch": 1000, "model": model, "optimizer": {}}


def extracted(kept, other, author):
    """OpenSelfSup/DenseCL/MMSelfSup's extract_backbone_weights.py output: the ``backbone.*``
    keys without the prefix, under ``state_dict``."""
    return {"state_dict": backbone(kept), "author": author}


def densecl_training(kept, other):
    """WXinlong/DenseCL's (OpenSelfSup's) epoch_N.pth: ``encoder_q`` and ``encoder_k`` are
    Sequential(backbone, neck); ``backbone`` is ``encoder_q[0]`` registered again, so its tensors
    appear under both names (one storage); four queue buffers; mmcv's ``meta``."""
    state = {**backbone(kept, "encoder_q.0."), **head("encoder_q.1.", "mlp.0.weight", "mlp.2.weight"),
             **backbone(other, "encoder_k.0."), **head("encoder_k.1.", "mlp.0.weight", "mlp.2.weight"),
             **backbone(kept, "backbone."), **head("", "queue", "queue_ptr", "queue2", "queue2_ptr")}
    return {"meta": {"epoch": 800}, "state_dict": state, "optimizer": {}}


def mmselfsup_mocov2(kept, other):
    """open-mmlab/mmselfsup 1.x MoCo v2: ``backbone`` and ``neck``, the key encoder an
    ExponentialMovingAverage of Sequential(backbone, neck) (``encoder_k.module.0.*``, ``encoder_k.steps``)."""
    state = {**backbone(kept, "backbone."), **head("neck.", "mlp.0.weight", "mlp.2.weight"),
             **backbone(other, "encoder_k.module.0."), **head("encoder_k.module.1.", "mlp.0.weight", "mlp.2.weight"),
             **head("encoder_k.", "steps"), **head("", "queue", "queue_ptr")}
    return {"meta": {"epoch": 200}, "state_dict": state}


def mmselfsup_byol(kept, other):
    """mmselfsup 1.x BYOL: ``backbone``, ``neck``, ``head.predictor`` and the CosineEMA target
    network (``target_net.module.0.*``)."""
    state = {**backbone(kept, "backbone."), **head("neck.", "mlp.0.weight"), **head("head.predictor.", "mlp.0.weight"),
             **backbone(other, "target_net.module.0."), **head("target_net.module.1.", "mlp.0.weight"),
             **head("target_net.", "steps")}
    return {"meta": {"epoch": 200}, "state_dict": state}


def lightning(kept, other):
    """A PyTorch Lightning checkpoint of a LightningModule holding the ResNet as ``self.model``."""
    return {"epoch": 9, "global_step": 1000, "pytorch-lightning_version": "2.2.0",
            "state_dict": {f"model.{k}": v for k, v in kept.items()}, "optimizer_states": [{}], "lr_schedulers": []}


def virtex_zoo(kept, other):
    """kdexd/virtex's model zoo (bicaptioning_R_50_L1_H2048.pth): ``visual.cnn.*`` without ``fc``
    and the textual head under ``model``, beside optimizer, scheduler, scaler and iteration."""
    model = {**backbone(kept, "visual.cnn."), **head("textual.", "embedding.words.weight", "output.weight")}
    return {"model": model, "optimizer": {}, "scheduler": {}, "scaler": {}, "iteration": 500000}


# layout -> (builder, (entry, prefix) of the encoder the project transfers)
RELEASES = {
    "moco_v1": (moco_v1, ("state_dict", "module.encoder_q.")),
    "moco_v2": (moco_v2, ("state_dict", "module.encoder_q.")),
    "moco_v3": (moco_v3, ("state_dict", "module.base_encoder.")),
    "swav": (swav, (None, "module.")),
    "swav_training": (swav_training, ("state_dict", "module.")),
    "dino_release": (lambda kept, other: backbone(kept), (None, "")),
    "dino_training": (dino_training, ("teacher", "module.backbone.")),
    "barlow_release": (lambda kept, other: backbone(kept), (None, "")),
    "barlow_training": (barlow_training, ("model", "module.backbone.")),
    "densecl_release": (lambda kept, other: extracted(kept, other, "DenseCL"), ("state_dict", "")),
    "densecl_training": (densecl_training, ("state_dict", "backbone.")),
    "mmselfsup_extracted": (lambda kept, other: extracted(kept, other, "MMSelfSup"), ("state_dict", "")),
    "mmselfsup_mocov2": (mmselfsup_mocov2, ("state_dict", "backbone.")),
    "mmselfsup_byol": (mmselfsup_byol, ("state_dict", "backbone.")),
    "lightning": (lightning, ("state_dict", "model.")),
    "timm_resnet50": (lambda kept, other: dict(kept), (None, "")),
    "virtex_zoo": (virtex_zoo, ("model", "visual.cnn.")),
}
