"""Every pretraining config loads through the schema, holds the official values, and its file
name says what it trains."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pretrain.config import (
    EXECUTION_ONLY_KEYS,
    ConfigError,
    config_differences,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(
    [CONFIGS / "_base_bicaptioning_R_50_L1_H1024.yaml"]
    + [p for folder in ("width_ablations", "depth_ablations", "backbone_ablations", "task_ablations", "builtin", "vit")
       for p in (CONFIGS / folder).glob("*.yaml")]
)
BACKBONES = {"R_18": "torchvision::resnet18", "R_50": "torchvision::resnet50", "R_101": "torchvision::resnet101",
             "R_50W2X": "torchvision::wide_resnet50_2", "ViT_T_16": "timm::vit_tiny_patch16_224",
             "ViT_S_16": "timm::vit_small_patch16_224", "ViT_B_16": "timm::vit_base_patch16_224"}
TASKS = {"bicaptioning": "virtex", "cappa": "cappa_bicaptioning"}  # file-name task -> MODEL.NAME


def test_all_expected_files_exist():
    names = {str(p.relative_to(CONFIGS)) for p in FILES}
    expected = {"_base_bicaptioning_R_50_L1_H1024.yaml", "builtin/bicaptioning_R_18_L1_H256.yaml"}
    expected |= {f"width_ablations/bicaptioning_R_50_L1_H{h}.yaml" for h in (512, 768, 1024, 2048)}
    expected |= {f"depth_ablations/bicaptioning_R_50_L{n}_H1024.yaml" for n in (1, 2, 3, 4)}
    expected |= {f"backbone_ablations/bicaptioning_R_{r}_L1_H1024.yaml" for r in ("50", "101", "50W2X")}
    expected |= {f"task_ablations/{n}.yaml" for n in (
        "bicaptioning_R_50_L1_H2048", "captioning_R_50_L1_H2048", "token_classification_R_50",
        "multilabel_classification_R_50", "masked_lm_R_50_L1_H2048")}
    expected |= {"builtin/multilabel_classification_R_18.yaml"}  # the demo's labels control
    expected |= {"builtin/bicaptioning_ViT_T_16_L1_H192.yaml", "vit/bicaptioning_ViT_B_16_L1_H768.yaml",
                 "vit/bicaptioning_ViT_S_16_L1_H384.yaml", "vit/cappa_ViT_B_16_L6_H768.yaml"}
    assert names == expected


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_and_matches_its_name(path):
    cfg = load_config(str(path))
    match = re.fullmatch(r"_?(?:base_)?(\w+?)_(R_\w+?|ViT_[TSB]_16)(?:_L(\d)_H(\d+))?", path.stem)
    task, backbone, layers, width = match.groups()
    assert cfg.MODEL.NAME == TASKS.get(task, task)
    assert cfg.MODEL.VISUAL.NAME == BACKBONES[backbone]
    if layers is None:
        assert cfg.MODEL.TEXTUAL.NAME == "none" and cfg.OPTIM.NO_DECAY == "none"
    else:
        heads, ffn = int(width) // 64, 4 * int(width)
        assert cfg.MODEL.TEXTUAL.NAME == f"transdec_postnorm::L{layers}_H{width}_A{heads}_F{ffn}"


@pytest.mark.parametrize("path", [p for p in FILES if p.parent.name not in ("builtin", "vit")], ids=lambda p: p.stem)
def test_official_hyper_parameters(path):
    cfg = load_config(str(path))
    assert (cfg.RANDOM_SEED, cfg.AMP, cfg.DATA.ROOT, cfg.DATA.TOKENIZER_MODEL) == (
        0, True, "datasets/coco", "datasets/vocab/coco_10k.model")
    assert cfg.DATA.VOCAB_SIZE == (80 if cfg.MODEL.NAME == "multilabel_classification" else 10000)
    assert (cfg.DATA.UNK_INDEX, cfg.DATA.SOS_INDEX, cfg.DATA.EOS_INDEX, cfg.DATA.MASK_INDEX) == (0, 1, 2, 3)
    assert (cfg.DATA.IMAGE_CROP_SIZE, cfg.DATA.MAX_CAPTION_LENGTH) == (224, 30)
    assert cfg.DATA.IMAGE_TRANSFORM_TRAIN == ["random_resized_crop", "horizontal_flip", "color_jitter", "normalize"]
    assert cfg.DATA.IMAGE_TRANSFORM_VAL == ["smallest_resize", "center_crop", "normalize"]
    assert cfg.MODEL.VISUAL.PRETRAINED is False and cfg.MODEL.TEXTUAL.DROPOUT == 0.1
    assert (cfg.MODEL.DECODER.NAME, cfg.MODEL.DECODER.BEAM_SIZE) == ("beam_search", 5)
    o = cfg.OPTIM
    assert (o.OPTIMIZER_NAME, o.SGD_MOMENTUM, o.WEIGHT_DECAY) == ("sgd", 0.9, 0.0001)
    assert (o.LOOKAHEAD.USE, o.LOOKAHEAD.ALPHA, o.LOOKAHEAD.STEPS) == (True, 0.5, 5)
    assert (o.BATCH_SIZE, o.CNN_LR, o.LR, o.NUM_ITERATIONS) == (256, 0.2, 0.001, 500000)
    assert (o.WARMUP_STEPS, o.LR_DECAY_NAME, o.CLIP_GRAD_NORM) == (10000, "cosine", 10.0)
    if cfg.MODEL.TEXTUAL.NAME != "none":
        assert o.NO_DECAY == ".*textual.(embedding|transformer).*(norm.*|bias)"


def test_builtin_config_is_small():
    cfg = load_config(str(CONFIGS / "builtin" / "bicaptioning_R_18_L1_H256.yaml"))
    assert (cfg.DATA.ROOT, cfg.DATA.TOKENIZER_MODEL, cfg.DATA.VOCAB_SIZE) == (
        "datasets/builtin/coco", "datasets/builtin/vocab/builtin_256.model", 256)
    assert (cfg.MODEL.VISUAL.FEATURE_SIZE, cfg.DATA.IMAGE_CROP_SIZE, cfg.OPTIM.BATCH_SIZE) == (512, 128, 16)
    assert cfg.OPTIM.NUM_ITERATIONS <= 1000 and cfg.OPTIM.WARMUP_STEPS < cfg.OPTIM.NUM_ITERATIONS


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f'_BASE_: "{CONFIGS / "_base_bicaptioning_R_50_L1_H1024.yaml"}"\nDATA:\n  IMAGE_CROP_SIZ: 128\n')
    with pytest.raises(ConfigError, match="typo.yaml.*IMAGE_CROP_SIZ"):
        load_config(str(path))


def test_config_differences_lists_changed_and_missing_keys():
    config = CONFIGS / "builtin" / "bicaptioning_R_18_L1_H256.yaml"
    saved = load_config(str(config)).dump()
    assert config_differences(saved, load_config(str(config))) == []
    # A tuple from an override equals the list YAML wrote: not a difference.
    pinned = load_config(str(config), ["ENGINE.PINNED_CHECKPOINTS", "(100, 200)"])
    assert config_differences(pinned.dump(), pinned) == []
    assert config_differences(saved, pinned) == ["ENGINE.PINNED_CHECKPOINTS: [] -> [100, 200]"]
    # A key the saved config lacks (written by an older version) is named, not skipped.
    older = saved.replace("    ZERO_INIT_RESIDUAL: false\n", "")
    assert config_differences(older, load_config(str(config))) == ["MODEL.VISUAL.ZERO_INIT_RESIDUAL: (absent) -> False"]
    # ... unless it keeps its default, as a key added since (a new option) does.
    assert "CLASSIFICATION_LOSS: k_hot_softmax\n" in saved
    before_the_option = saved.replace("  CLASSIFICATION_LOSS: k_hot_softmax\n", "")
    assert config_differences(before_the_option, load_config(str(config))) == []
    bce = load_config(str(config), ["MODEL.CLASSIFICATION_LOSS", "binary_cross_entropy"])
    assert config_differences(before_the_option, bce) == ["MODEL.CLASSIFICATION_LOSS: (absent) -> binary_cross_entropy"]
    # Keys of how a run is executed can be left out: the demo reuses a run made with other ones.
    executed_otherwise = load_config(str(config), ["ENGINE.COMPILE", "auto", "ENGINE.LOG_PERIOD", "1", "RANDOM_SEED", "1"])
    assert config_differences(saved, executed_otherwise, ignore=EXECUTION_ONLY_KEYS) == ["RANDOM_SEED: 0 -> 1"]


def test_config_differences_compares_paths_as_the_files_they_name(tmp_path, monkeypatch):
    config = CONFIGS / "builtin" / "bicaptioning_R_18_L1_H256.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "coco").mkdir(parents=True)
    relative = load_config(str(config), ["DATA.ROOT", "data/coco"]).dump()
    for same in (str(tmp_path / "data" / "coco"), "./data/../data/coco/"):
        assert config_differences(relative, load_config(str(config), ["DATA.ROOT", same])) == []
    other = load_config(str(config), ["DATA.ROOT", str(tmp_path / "other")])
    assert config_differences(relative, other) == [f"DATA.ROOT: data/coco -> {tmp_path / 'other'}"]


@pytest.mark.parametrize("path", [p for p in FILES if "ViT" in p.stem], ids=lambda p: p.stem)
def test_vit_configs_use_the_vit_optimiser(path):
    """AdamW without Lookahead, one learning rate for the ViT and the head, clipping at 1.0, no
    decay on norms, biases and position embeddings; the full-size ones CapPa's lr, warm-up and
    cosine decay on VirTex's data recipe."""
    cfg = load_config(str(path))
    o = cfg.OPTIM
    assert (o.OPTIMIZER_NAME, o.LOOKAHEAD.USE, o.CLIP_GRAD_NORM, o.CNN_LR) == ("adamw", False, 1.0, o.LR)
    assert o.NO_DECAY == ".*(norm|bias|pos_embed|positions)"
    assert cfg.MODEL.VISUAL.FEATURE_SIZE == int(re.search(r"_H(\d+)", path.stem)[1])
    if path.parent.name == "vit":
        assert (o.LR, o.WARMUP_STEPS, o.LR_DECAY_NAME, o.NUM_ITERATIONS, o.BATCH_SIZE) == (0.001, 10000, "cosine", 500000, 256)
        assert cfg.DATA.IMAGE_CROP_SIZE == 224
    assert cfg.MODEL.CAPPA.PARALLEL_FRACTION == (0.75 if cfg.MODEL.NAME == "cappa_bicaptioning" else 0.0)

