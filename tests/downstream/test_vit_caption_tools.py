"""The caption tools on a ViT checkpoint: caption.py and visualize_attention.py load it from its
config alone (eval_captioning.py loads models the same way, through ``load_captioning_model``),
and the attention maps cover the patch grid."""
from __future__ import annotations

import json

import pytest
import torch

from pretrain.config import load_config
from pretrain.downstream.attention import caption_with_attention
from pretrain.downstream.caption_eval import load_captioning_model
from tests.downstream.conftest import TINY_CONFIG, VOCAB_SIZE, load_tool

# The tiny captioner of the other downstream tests with a ViT-Ti/16 at 64 px: a 4 x 4 patch grid.
VIT_CONFIG = TINY_CONFIG.replace('"torchvision::resnet18"', '"timm::vit_tiny_patch16_224"').replace(
    "FEATURE_SIZE: 512", "FEATURE_SIZE: 192"
)


@pytest.fixture(scope="module")
def vit_run(synthetic_root, tokenizer_model, tmp_path_factory):
    """(config path, checkpoint path) of a randomly initialised tiny ViT captioner."""
    folder = tmp_path_factory.mktemp("vit_run")
    config = folder / "tiny_bicaptioning_ViT_T.yaml"
    config.write_text(VIT_CONFIG.format(root=synthetic_root / "coco", tokenizer=tokenizer_model, vocab=VOCAB_SIZE))
    from pretrain.tasks import build_model

    torch.manual_seed(0)
    model = build_model(load_config(str(config)))
    checkpoint = folder / "checkpoint_3.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, checkpoint)
    return config, checkpoint


def test_attention_maps_cover_the_patch_grid(vit_run):
    config, checkpoint = vit_run
    cfg = load_config(str(config))
    model, tokenizer = load_captioning_model(cfg, checkpoint)
    assert "timm" in type(model.visual.vit).__module__
    torch.manual_seed(0)
    [result] = caption_with_attention(model, torch.randn(1, 3, 64, 96), tokenizer, 1, 2, 4)
    assert result.words, "the caption is empty"
    for word in result.words:
        assert word.attention.shape == (4, 6)  # 64 x 96 px in 16 px patches
        assert word.attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_caption_and_attention_tools_run_on_a_vit_checkpoint(vit_run, synthetic_root, tmp_path):
    config, checkpoint = vit_run
    common = ["--config", str(config), "--checkpoint", str(checkpoint)]
    captions = tmp_path / "captions.json"
    images = synthetic_root / "coco" / "val2017"
    assert load_tool("caption").main([*common, "--images", str(images), "--output", str(captions)]) == 0
    assert len(json.loads(captions.read_text())) == len(list(images.glob("*.jpg")))

    out = tmp_path / "attention"
    assert load_tool("visualize_attention").main([*common, "--output-dir", str(out), "--max-images", "1"]) == 0
    assert (out / "index.html").is_file() and len(list(out.glob("*_attention.png"))) == 1


def test_a_vit_checkpoint_for_a_resnet_config_is_named_in_one_line(vit_run, tiny_config, synthetic_root, tmp_path,
                                                                     capsys):
    """One line naming the file and both kinds (exit 2), not torch's list of every key."""
    _, checkpoint = vit_run
    argv = ["--config", str(tiny_config), "--checkpoint", str(checkpoint), "--images",
            str(synthetic_root / "coco" / "val2017"), "--output", str(tmp_path / "c.json")]
    assert load_tool("caption").main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"{checkpoint}: holds a ViT visual backbone, but the config's MODEL.VISUAL.NAME builds a ResNet")


@pytest.mark.parametrize("tool", ["clf_linear", "clf_voc07"])
def test_a_crop_the_vits_patch_does_not_divide_is_refused_before_any_image_is_read(vit_run, tmp_path, capsys, tool):
    config, _ = vit_run
    argv = ["--config", str(config), "--random-init", "--crop", "100", "--resize", "112", "--output-dir", str(tmp_path)]
    if tool == "clf_linear":
        argv += ["--data-root", str(tmp_path / "no_such_folder")]  # never reached
    else:
        argv += ["--voc-root", str(tmp_path / "no_such_folder")]
    assert load_tool(tool).main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{tool}: error: --crop 100: timm::vit_tiny_patch16_224 needs a multiple of its patch size 16 (e.g. 96)")
