"""Every fine-tuning config of ``configs/detectron2/``, merged with detectron2's defaults, holds
the values of the official VirTex config it mirrors (kdexd/virtex, ``configs/detectron2/``).

The official values are written here as data: each key the official file sets, directly or
through its ``_BASE_``, with the file it comes from. A deliberate difference is listed in
``DEVIATIONS`` with the reason, and in docs/fidelity.md.
"""
from pathlib import Path

import pytest

from detectron2_ext import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2"

# configs/detectron2/_base_mask_rcnn_R_50_FPN.yaml (official)
OFFICIAL_MASK_RCNN_BASE = {
    "INPUT.FORMAT": "RGB",
    "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800),
    "INPUT.MIN_SIZE_TEST": 800,
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
    "TEST.PRECISE_BN.ENABLED": True,
}
# configs/detectron2/_base_faster_rcnn_R_50_C4_BN.yaml (official)
OFFICIAL_FASTER_RCNN_BASE = {
    "INPUT.FORMAT": "RGB",
    "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800),
    "INPUT.MIN_SIZE_TEST": 800,
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
    "TEST.PRECISE_BN.ENABLED": True,
}
LVIS = {
    "DATASETS.TRAIN": ("lvis_v1_train",),
    "DATASETS.TEST": ("lvis_v1_val",),
    "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
    "DATALOADER.REPEAT_THRESHOLD": 0.001,
    "TEST.DETECTIONS_PER_IMAGE": 300,
    "MODEL.MASK_ON": True,
    "MODEL.ROI_HEADS.NUM_CLASSES": 1203,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0001,
    "MODEL.WEIGHTS": "",
    "SOLVER.STEPS": (120000, 160000),
    "SOLVER.MAX_ITER": 180000,
}
OFFICIAL = {
    # configs/detectron2/coco_segm_default_init_2x.yaml
    "coco_segm_default_init_2x.yaml": {
        **OFFICIAL_MASK_RCNN_BASE,
        "DATASETS.TRAIN": ("coco_2017_train",),
        "DATASETS.TEST": ("coco_2017_val",),
        "MODEL.MASK_ON": True,
        "MODEL.FPN.NORM": "SyncBN",
        "MODEL.WEIGHTS": "",
        "SOLVER.STEPS": (120000, 160000),
        "SOLVER.MAX_ITER": 180000,
    },
    # configs/detectron2/lvis_segm_default_init_2x.yaml
    "lvis_segm_default_init_2x.yaml": {**OFFICIAL_MASK_RCNN_BASE, **LVIS, "MODEL.FPN.NORM": "SyncBN"},
    # configs/detectron2/lvis_segm_imagenet_init_2x.yaml: BN frozen, and no norm in the FPN
    # (detectron2's default FPN.NORM, "").
    "lvis_segm_imagenet_init_2x.yaml": {
        **OFFICIAL_MASK_RCNN_BASE, **LVIS, "MODEL.RESNETS.NORM": "FrozenBN", "MODEL.FPN.NORM": "",
    },
    # configs/detectron2/voc_det_default_init_24k.yaml
    "voc_det_default_init_24k.yaml": {
        **OFFICIAL_FASTER_RCNN_BASE,
        "DATASETS.TRAIN": ("voc_2007_trainval", "voc_2012_trainval"),
        "DATASETS.TEST": ("voc_2007_test",),
        "INPUT.MIN_SIZE_TRAIN": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        "INPUT.MIN_SIZE_TEST": 800,
        "MODEL.MASK_ON": False,
        "MODEL.ROI_HEADS.NUM_CLASSES": 20,
        "MODEL.WEIGHTS": "",
        "SOLVER.STEPS": (18000, 22000),
        "SOLVER.MAX_ITER": 24000,
        "SOLVER.WARMUP_ITERS": 100,
    },
}
# (config, key) -> why ours differs; each is a row of docs/fidelity.md.
DEVIATIONS: dict[tuple[str, str], str] = {}


def value(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def same(ours, official) -> bool:
    if isinstance(official, (list, tuple)):
        return isinstance(ours, (list, tuple)) and len(ours) == len(official) and all(
            same(a, b) for a, b in zip(ours, official))
    if isinstance(official, float):
        return abs(ours - official) < 1e-9
    return ours == official


def test_every_full_size_config_is_compared():
    ours = {p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("_base_")}
    assert ours == set(OFFICIAL)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_holds_the_official_values(name):
    cfg = load_config(CONFIGS / name)
    differing = {
        key: (value(cfg, key), official)
        for key, official in OFFICIAL[name].items()
        if (name, key) not in DEVIATIONS and not same(value(cfg, key), official)
    }
    assert differing == {}, f"{name}: ours vs official: {differing}"
