"""ViTDet fine-tuning through tools/train_net.py on the built-in LVIS layout: converted ViT
weights train a few iterations with the ViTDet recipe (LSJ, AdamW with layer-wise lr decay, AMP
asked for and turned off without CUDA) and are evaluated; the LVIS report reads the run
unchanged. Also the recipe's parts on their own: layer-wise decay with the ViT's own depth,
no decay on pos_embed and norms, and the LSJ augmentations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from detectron2_ext import load_config
from detectron2_ext.transfer import convert_weights
from detectron2_ext.vit_training import build_adamw_optimizer, lsj_augmentations
from tests.detectron2_ext.test_d2_train_net import (
    LVIS_METRICS,
    assert_trained_and_evaluated,
)
from tests.detectron2_ext.test_vit_convert import mae_format_state_dict

REPO = Path(__file__).resolve().parents[2]
LVIS_CPU = REPO / "configs" / "detectron2" / "cpu" / "lvis_segm_vitdet_cpu.yaml"
# A 64-wide, 2-block ViT (block 0 in 4 x 4 windows, block 1 global) at 128 px, and 2 iterations.
TINY = ["MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "2",
        "MODEL.VIT.WINDOW_BLOCK_INDEXES", "[0]", "MODEL.VIT.IMG_SIZE", "128", "MODEL.VIT.WINDOW_SIZE", "4",
        "MODEL.SFP.SQUARE_PAD", "128", "INPUT.LSJ.IMAGE_SIZE", "128", "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.MAX_ITER", "2", "TEST.DETECTIONS_PER_IMAGE", "20",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


def test_layer_wise_decay_uses_the_depth_of_the_vit_and_spares_pos_embed_and_norms():
    cfg = load_config(LVIS_CPU, TINY)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    optimizer = build_adamw_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}
    lr, rate = cfg.SOLVER.BASE_LR, cfg.SOLVER.VIT_LR_DECAY_RATE  # 2e-4, 0.7; depth 2, not detectron2's default 12
    expected_lr = {
        "backbone.net.pos_embed": lr * rate**3,
        "backbone.net.patch_embed.proj.weight": lr * rate**3,
        "backbone.net.blocks.0.attn.qkv.weight": lr * rate**2,
        "backbone.net.blocks.1.mlp.fc2.weight": lr * rate,
        "backbone.simfp_2.0.weight": lr,
        "roi_heads.box_predictor.cls_score.weight": lr,
    }
    assert {n: group_of[n]["lr"] for n in expected_lr} == pytest.approx(expected_lr)
    assert group_of["backbone.net.pos_embed"]["weight_decay"] == 0.0
    assert group_of["backbone.net.blocks.0.norm1.weight"]["weight_decay"] == 0.0  # torch LayerNorm
    assert group_of["backbone.net.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1
    # detectron2's own LayerNorm (pyramid and heads) is not a torch norm: decayed, as upstream
    assert group_of["backbone.simfp_2.1.weight"]["weight_decay"] == 0.1


def test_lsj_is_flip_resize_scale_and_fixed_crop():
    flip, resize, crop = lsj_augmentations(load_config(LVIS_CPU))
    assert isinstance(flip, T.RandomFlip) and flip.horizontal
    assert isinstance(resize, T.ResizeScale)
    assert (resize.min_scale, resize.max_scale, resize.target_height, resize.target_width) == (0.1, 2.0, 256, 256)
    assert isinstance(crop, T.FixedSizeCrop) and tuple(crop.crop_size) == (256, 256) and not crop.pad


def test_converted_vit_fine_tunes_on_lvis_and_the_report_reads_the_run(synthetic_root, tmp_path):
    weights = tmp_path / "mae_tiny.pth"
    convert_weights({"model": mae_format_state_dict()}, "mae_format.pth", weights, [("lvis", load_config(LVIS_CPU, TINY))])
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(LVIS_CPU), *TINY,
               "SOLVER.AMP.ENABLED", "True", "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(run)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert_trained_and_evaluated(run, "lvis_v1_val", "LVISEvaluator", {"bbox": LVIS_METRICS, "segm": LVIS_METRICS})
    log = (run / "log.txt").read_text()
    assert "SOLVER.AMP.ENABLED: off, this machine has no CUDA" in result.stderr + log
    # The recipe is what trained: ViTDet's AdamW with layer-wise decay, large-scale jitter, the converted weights.
    assert "optimizer: AdamW (ViTDet recipe), layer-wise lr decay" in log
    assert "train loader: large-scale jitter, 0.1-2 of 128x128" in log
    assert f"Loading from {weights}" in log
    # fvcore lists what the file did not set: of the ViT only the relative positions MAE has none of.
    assert "backbone.net.blocks.0.attn.{rel_pos_h, rel_pos_w}" in log
    assert not any(part in log for part in ("backbone.net.patch_embed", "backbone.net.blocks.0.mlp", "backbone.net.pos_embed"))
    assert "timm.models.layers is deprecated" not in result.stderr  # timm's warning stays out

    report = tmp_path / "report"
    subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), f"vit={run}", "--output", str(report)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    lvis = json.loads((report / "report.json").read_text())["datasets"]["lvis_v1_val"]
    assert {"APr", "APc", "APf"} <= set(lvis["mask"]["vit"])
