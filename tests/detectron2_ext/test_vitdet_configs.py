"""The ViTDet-B configs (configs/detectron2/vitdet/) hold the values of detectron2's
projects/ViTDet LazyConfig recipe, written here as data (each upstream setting with the file it
comes from and the yacs key that carries it); the model they build has exactly the parameters
of the model-zoo ``common/models/mask_rcnn_vitdet.py`` that ships with detectron2; and the CPU and
built-in versions keep the recipe, changing only sizes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.modeling import build_model

from detectron2_ext import load_config
from pretrain.models.vit import import_timm
from tests.detectron2_ext.test_official_configs import same, value

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2"

# model_zoo common/models/mask_rcnn_vitdet.py (on common/models/mask_rcnn_fpn.py)
UPSTREAM_MODEL = {
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.BACKBONE.NAME": "build_vitdet_backbone",  # ViT + SimpleFeaturePyramid
    "MODEL.VIT.IMG_SIZE": 1024,
    "MODEL.VIT.PATCH_SIZE": 16,
    "MODEL.VIT.EMBED_DIM": 768,
    "MODEL.VIT.DEPTH": 12,
    "MODEL.VIT.NUM_HEADS": 12,
    "MODEL.VIT.DROP_PATH_RATE": 0.1,
    "MODEL.VIT.WINDOW_SIZE": 14,
    "MODEL.VIT.MLP_RATIO": 4.0,
    "MODEL.VIT.QKV_BIAS": True,
    "MODEL.VIT.NORM_EPS": 1e-6,
    "MODEL.VIT.WINDOW_BLOCK_INDEXES": [0, 1, 3, 4, 6, 7, 9, 10],
    "MODEL.VIT.USE_REL_POS": True,
    "MODEL.VIT.USE_ABS_POS": True,
    "MODEL.VIT.PRETRAIN_IMG_SIZE": 224,
    "MODEL.VIT.PRETRAIN_USE_CLS_TOKEN": True,
    "MODEL.SFP.OUT_CHANNELS": 256,
    "MODEL.SFP.SCALE_FACTORS": [4.0, 2.0, 1.0, 0.5],
    "MODEL.SFP.NORM": "LN",
    "MODEL.SFP.SQUARE_PAD": 1024,
    "MODEL.RPN.CONV_DIMS": [-1, -1],
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,  # conv_dims [256] * 4
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 1,  # fc_dims [1024]
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.NORM": "LN",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_MASK_HEAD.NORM": "LN",
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "TEST.DETECTIONS_PER_IMAGE": 100,  # box_predictor test_topk_per_image
}
# projects/ViTDet/configs/common/coco_loader_lsj.py (and common/data/coco.py)
UPSTREAM_LOADER = {
    "INPUT.FORMAT": "RGB",
    "INPUT.LSJ.ENABLED": True,  # RandomFlip(horizontal), ResizeScale, FixedSizeCrop(pad=False)
    "INPUT.LSJ.IMAGE_SIZE": 1024,
    "INPUT.LSJ.MIN_SCALE": 0.1,
    "INPUT.LSJ.MAX_SCALE": 2.0,
    "INPUT.RANDOM_FLIP": "horizontal",
    "INPUT.MIN_SIZE_TEST": 1024,  # ResizeShortestEdge(1024, max_size=1024)
    "INPUT.MAX_SIZE_TEST": 1024,
    "SOLVER.IMS_PER_BATCH": 64,
    "DATALOADER.NUM_WORKERS": 4,
}
# projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py, with common/train.py and common/optim.py
UPSTREAM_COCO_B = {
    **UPSTREAM_MODEL,
    **UPSTREAM_LOADER,
    "DATASETS.TRAIN": ("coco_2017_train",),
    "DATASETS.TEST": ("coco_2017_val",),
    "SOLVER.AMP.ENABLED": True,
    "SOLVER.MAX_ITER": 184375,
    "SOLVER.STEPS": (163889, 177546),  # MultiStepParamScheduler values [1, 0.1, 0.01]
    "SOLVER.GAMMA": 0.1,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.WARMUP_ITERS": 250,
    "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.OPTIMIZER": "ADAMW",
    "SOLVER.BASE_LR": 1e-4,
    "SOLVER.BETAS": [0.9, 0.999],
    "SOLVER.WEIGHT_DECAY": 0.1,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.VIT_LR_DECAY_RATE": 0.7,  # get_vit_lr_decay_rate(num_layers=12, lr_decay_rate=0.7)
    "SOLVER.WEIGHT_DECAY_POS_EMBED": 0.0,  # overrides {"pos_embed": {"weight_decay": 0.0}}
    "SOLVER.CHECKPOINT_PERIOD": 5000,
    "TEST.EVAL_PERIOD": 5000,
}
# projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_b_100ep.py
UPSTREAM_LVIS_B = {
    **UPSTREAM_COCO_B,
    "DATASETS.TRAIN": ("lvis_v1_train",),
    "DATASETS.TEST": ("lvis_v1_val",),
    "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
    "DATALOADER.REPEAT_THRESHOLD": 0.001,
    "MODEL.ROI_HEADS.NUM_CLASSES": 1203,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.02,
    "TEST.DETECTIONS_PER_IMAGE": 300,  # test_topk_per_image; LVISEvaluator(max_dets_per_image=300)
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": True,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": True,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": 0.5,
    "SOLVER.MAX_ITER": 156250,
    "SOLVER.STEPS": (138889, 150463),
    "TEST.EVAL_PERIOD": 30000,
    "SOLVER.BASE_LR": 2e-4,
}
UPSTREAM = {"coco_mask_rcnn_vitdet_b_100ep.yaml": UPSTREAM_COCO_B, "lvis_mask_rcnn_vitdet_b_100ep.yaml": UPSTREAM_LVIS_B}


def test_every_vitdet_config_is_compared():
    assert {p.name for p in (CONFIGS / "vitdet").glob("*.yaml") if not p.name.startswith("_base_")} == set(UPSTREAM)


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_config_holds_the_upstream_values(name):
    cfg = load_config(CONFIGS / "vitdet" / name)
    differing = {key: (value(cfg, key), up) for key, up in UPSTREAM[name].items() if not same(value(cfg, key), up)}
    assert differing == {}, f"{name}: ours vs upstream: {differing}"


def test_the_model_has_the_parameters_of_the_model_zoo_vitdet_model():
    """Our yacs-built ViTDet-B and detectron2's LazyConfig model: the same tensors, shapes and windows."""
    import_timm()
    lazy = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    upstream = instantiate(lazy)
    cfg = load_config(CONFIGS / "vitdet" / "coco_mask_rcnn_vitdet_b_100ep.yaml")
    cfg.MODEL.DEVICE = "cpu"
    ours = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in upstream.state_dict().items()}
    windows = [(b.window_size, b.attn.use_rel_pos) for b in ours.backbone.net.blocks]
    assert windows == [(b.window_size, b.attn.use_rel_pos) for b in upstream.backbone.net.blocks]
    assert ours.backbone.net.blocks[0].norm1.eps == upstream.backbone.net.blocks[0].norm1.eps == 1e-6
    assert ours.backbone.padding_constraints == upstream.backbone.padding_constraints


@pytest.mark.parametrize("name", ["cpu/coco_segm_vitdet_cpu.yaml", "cpu/lvis_segm_vitdet_cpu.yaml",
                                  "builtin/lvis_segm_ViTDet_T_builtin.yaml"])
def test_small_versions_keep_the_recipe(name):
    cfg = load_config(CONFIGS / name)
    full = UPSTREAM_LVIS_B if "lvis" in name else UPSTREAM_COCO_B
    recipe = ["MODEL.BACKBONE.NAME", "MODEL.VIT.USE_REL_POS", "MODEL.SFP.NORM", "MODEL.ROI_BOX_HEAD.NORM",
              "MODEL.ROI_BOX_HEAD.NUM_CONV", "MODEL.ROI_BOX_HEAD.NUM_FC", "MODEL.ROI_MASK_HEAD.NORM", "INPUT.LSJ.ENABLED",
              "INPUT.LSJ.MIN_SCALE", "INPUT.LSJ.MAX_SCALE", "SOLVER.OPTIMIZER", "SOLVER.VIT_LR_DECAY_RATE",
              "SOLVER.WEIGHT_DECAY", "DATASETS.TRAIN", "DATASETS.TEST", "MODEL.ROI_HEADS.NUM_CLASSES"]
    if "lvis" in name:
        recipe += ["DATALOADER.SAMPLER_TRAIN", "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS"]
    # The built-in data's departure, which its config explains: 1183 of the 1203 LVIS classes never
    # occur in its training split, so neither the federated loss nor 1203 sigmoid losses per box work.
    departures = ({"MODEL.ROI_BOX_HEAD.USE_FED_LOSS": False, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False}
                  if name.startswith("builtin/") else {})
    assert {k: value(cfg, k) for k in departures} == departures
    assert {k: (value(cfg, k), full[k]) for k in recipe
            if k not in departures and not same(value(cfg, k), full[k])} == {}
    assert not cfg.SOLVER.AMP.ENABLED  # detectron2's AMP trainer needs CUDA
    grid = cfg.MODEL.VIT.IMG_SIZE // cfg.MODEL.VIT.PATCH_SIZE
    assert grid % cfg.MODEL.VIT.WINDOW_SIZE == 0 and cfg.MODEL.SFP.SQUARE_PAD == cfg.INPUT.LSJ.IMAGE_SIZE
    assert set(cfg.MODEL.VIT.WINDOW_BLOCK_INDEXES) < set(range(cfg.MODEL.VIT.DEPTH))  # global blocks remain


@pytest.mark.parametrize(("overrides", "message"), [
    # patch 32: the pyramid starts at p3, the RPN asked for p2 and detectron2 failed with KeyError 'p2'
    (["MODEL.VIT.PATCH_SIZE", "32", "MODEL.VIT.WINDOW_SIZE", "2"],
     ("MODEL.VIT.PATCH_SIZE 32 with MODEL.SFP.SCALE_FACTORS [4.0, 2.0, 1.0, 0.5] gives the features p3, p4, p5, p6, "
      "p7, but MODEL.RPN.IN_FEATURES and MODEL.ROI_HEADS.IN_FEATURES also take p2; the ViTDet configs need patch 16")),
    (["MODEL.VIT.PATCH_SIZE", "8", "MODEL.VIT.WINDOW_SIZE", "8"], "also take p6"),
    (["MODEL.VIT.PATCH_SIZE", "14", "MODEL.VIT.IMG_SIZE", "112", "MODEL.VIT.PRETRAIN_IMG_SIZE", "112",
      "MODEL.VIT.WINDOW_SIZE", "2"], "MODEL.VIT.PATCH_SIZE 14 is not a power of 2"),
    (["MODEL.SFP.SCALE_FACTORS", "[8.0, 4.0, 2.0, 1.0]"],
     "MODEL.SFP.SCALE_FACTORS [8.0, 4.0, 2.0, 1.0]: detectron2's SimpleFeaturePyramid implements only 4, 2, 1, 0.5"),
])
def test_a_pyramid_detectron2_cannot_build_or_feed_is_named_before_the_model(overrides, message):
    from detectron2_ext.vit_backbone import check_vit_config
    from pretrain.config import ConfigError

    cfg = load_config(CONFIGS / "builtin" / "lvis_segm_ViTDet_T_builtin.yaml", overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_vit_config(cfg)
    check_vit_config(load_config(CONFIGS / "builtin" / "lvis_segm_ViTDet_T_builtin.yaml"))  # the config as shipped
