"""ViT conversion: our encoder and a MAE-format timm state dict become exact ``backbone.net.*``
keys of detectron2's ViT; detectron2's ViT then gives our encoder's tokens (before its final
norm) at the pretraining resolution; every ViT key loads into ViTDet (only rel-pos tables new);
and what cannot be placed (LayerScale, odd shapes, the wrong backbone kind or pretraining size)
is refused naming the key or file."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from detectron2_ext import load_config
from detectron2_ext.convert import ConversionError
from detectron2_ext.transfer import convert_weights, describe
from detectron2_ext.vit_backbone import build_vit
from detectron2_ext.vit_convert import convert_vit_state_dict
from detectron2_ext.vit_verify import check_backbone_run
from pretrain.checkpoint_io import read_checkpoint
from pretrain.config import ConfigError
from pretrain.config import load_config as load_pretrain_config
from pretrain.errors import MissingInputError
from pretrain.models.vit import TimmViTBackbone, import_timm, initial_vit_state
from tests.tool_main import Tool

REPO = Path(__file__).resolve().parents[2]
VITDET_B = REPO / "configs" / "detectron2" / "vitdet" / "coco_mask_rcnn_vitdet_b_100ep.yaml"
BUILTIN_T = REPO / "configs" / "detectron2" / "builtin" / "lvis_segm_ViTDet_T_builtin.yaml"
# The ViTDet-B model at MAE-layout test width: 64 wide, 2 blocks (block 0 windowed, block 1 global).
NARROW = ["MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "2",
          "MODEL.VIT.WINDOW_BLOCK_INDEXES", "[0]", "MODEL.VIT.IMG_SIZE", "256", "MODEL.VIT.WINDOW_SIZE", "8",
          "MODEL.SFP.SQUARE_PAD", "256", "INPUT.LSJ.IMAGE_SIZE", "256", "INPUT.MAX_SIZE_TEST", "256"]


def mae_format_state_dict(seed: int = 0) -> dict:
    """A state dict in the layout of MAE's released encoders (mae_pretrain_vit_base.pth's
    ``model``): cls_token, pos_embed with the class slot, patch_embed, blocks and the final norm,
    no head; random weights at width 64 and depth 2."""
    timm = import_timm()
    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0, global_pool="token"
    )
    state = vit.state_dict()
    torch.nn.init.normal_(state["cls_token"], std=0.02)  # timm starts it near 0; any value will do
    assert {"cls_token", "norm.weight", "norm.bias"} <= set(state) and not any(k.startswith("head") for k in state)
    assert state["pos_embed"].shape == (1, 197, 64)
    return state


def test_detectron2_vit_gives_our_encoders_tokens_before_the_final_norm():
    torch.manual_seed(0)
    ours = TimmViTBackbone("vit_tiny_patch16_224", 192, image_size=64).eval()
    checkpoint = {"model": {**{f"visual.vit.{k}": v for k, v in ours.vit.state_dict().items()},
                            "textual.output.weight": torch.zeros(3, 3)}}
    converted = convert_vit_state_dict(checkpoint["model"], "visual.vit.")
    assert (converted.patch_size, converted.pretrain_img_size, converted.pretrain_use_cls_token) == (16, 64, False)
    assert (converted.embed_dim, converted.depth, converted.mlp_ratio, converted.qkv_bias) == (192, 12, 4.0, True)
    assert converted.dropped_keys == ["visual.vit.norm.weight", "visual.vit.norm.bias"] and converted.ignored_keys == 1
    assert all(k.startswith("backbone.net.") for k in converted.state_dict)

    cfg = load_config(BUILTIN_T, ["MODEL.VIT.IMG_SIZE", "64", "MODEL.VIT.PRETRAIN_IMG_SIZE", "64",
                                  "MODEL.VIT.WINDOW_BLOCK_INDEXES", "[]", "MODEL.VIT.DROP_PATH_RATE", "0.0"])
    vit = build_vit(cfg).eval()
    result = vit.load_state_dict({k[len("backbone.net."):]: v for k, v in converted.state_dict.items()}, strict=False)
    assert not result.unexpected_keys and all("rel_pos" in k for k in result.missing_keys) and result.missing_keys
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = ours.vit.blocks(ours.vit._pos_embed(ours.vit.patch_embed(images)))  # (B, 16, D), before norm
        theirs = vit(images)["last_feat"]  # (B, D, 4, 4)
    torch.testing.assert_close(theirs.flatten(2).transpose(1, 2), tokens, rtol=1e-5, atol=1e-5)


def test_mae_format_weights_convert_and_load_with_every_vit_key_placed(tmp_path):
    state = mae_format_state_dict()
    target = load_config(VITDET_B, NARROW)
    backbone, [check] = convert_weights({"model": state}, "mae_pretrain_vit_base.pth", tmp_path / "mae.pth",
                                        [("vitdet_b", target)])
    assert backbone.had_class_token and backbone.pretrain_use_cls_token and backbone.pretrain_img_size == 224
    assert backbone.dropped_keys == ["cls_token", "norm.weight", "norm.bias"]
    assert check.loaded == len(state) - 3  # all but cls_token and norm.{weight,bias}
    assert check.untouched == ["4 relative-position tables (zero-initialised)"]  # h and w of 2 blocks
    written = torch.load(tmp_path / "mae.pth", weights_only=True)
    assert written["matching_heuristics"] is False
    assert written["conversion"]["pretrain_use_cls_token"] is True and written["conversion"]["backbone"] == "vit"
    assert set(written["model"]) == {f"backbone.net.{k}" for k in state if k not in ("cls_token", "norm.weight", "norm.bias")}
    for key, value in written["model"].items():
        assert torch.equal(value, state[key[len("backbone.net."):]])


def test_deit_and_augreg_layouts_lose_their_classifier_and_keep_the_rest():
    """timm's DeiT/AugReg classification files: MAE's layout plus ``head.*`` (and ``fc_norm`` when
    pooled by averaging); a ``module.`` prefix (DDP) is found like any other."""
    state = mae_format_state_dict()
    classifier = {"head.weight": torch.zeros(1000, 64), "head.bias": torch.zeros(1000),
                  "fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64)}
    converted = convert_vit_state_dict({f"module.{k}": v for k, v in {**state, **classifier}.items()}, "module.")
    assert sorted(converted.dropped_keys) == sorted(f"module.{k}" for k in ["cls_token", "norm.weight", "norm.bias",
                                                                           *classifier])
    assert len(converted.state_dict) == len(state) - 3 and converted.pretrain_use_cls_token


def test_random_init_vit_baseline_is_seeded_and_loads_into_the_builtin_config(tmp_path):
    state = initial_vit_state("vit_tiny_patch16_224", 128, seed=3)
    assert torch.equal(state["pos_embed"], initial_vit_state("vit_tiny_patch16_224", 128, seed=3)["pos_embed"])
    assert not torch.equal(state["pos_embed"], initial_vit_state("vit_tiny_patch16_224", 128, seed=4)["pos_embed"])
    backbone, [check] = convert_weights(state, "random_vit_tiny_patch16_224_seed3", tmp_path / "r.pth",
                                        [("builtin", load_config(BUILTIN_T))])
    assert backbone.pretrain_img_size == 128 and not backbone.had_class_token
    assert check.loaded == len(state) - 2  # all but the final norm


@pytest.mark.parametrize("flags, message", [
    (["--vit", "vit_tiny_patch16_224", "--image-size", "100"],
     ("--image-size 100 is not a multiple of vit_tiny_patch16_224's patch size 16 (the position embeddings are for "
      "whole patches; use 96 or 112)")),
    (["--vit", "vit_huge_patch14_224", "--image-size", "10"],
     ("--image-size 10 is not a multiple of vit_huge_patch14_224's patch size 14 (the position embeddings are for "
      "whole patches; use 14)")),
    (["--image-size", "0"], "--image-size must be 1 or more, got 0"),
])
def test_random_vit_image_size_that_is_no_whole_number_of_patches_is_refused(tmp_path, capsys, flags, message):
    """--image-size 100 used to be floored to 96 patches' worth and then refused by the target
    config check ("MODEL.VIT.PRETRAIN_IMG_SIZE is 100; the weights need 96")."""
    with pytest.raises(SystemExit) as exit_:
        Tool("convert_backbone").main(["--init", "random", *flags, "--output", str(tmp_path / "r.pth")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")
    assert not (tmp_path / "r.pth").exists()


@pytest.mark.parametrize("key, value, message", [
    ("blocks.1.ls1.gamma", torch.ones(64), "'blocks.1.ls1.gamma' is a LayerScale weight"),
    ("dist_token", torch.zeros(1, 1, 64), "'dist_token' has no place in detectron2's ViT"),
    ("pos_embed", torch.zeros(1, 198, 64), r"'pos_embed' has shape \(1, 198, 64\)"),
    ("blocks.0.attn.proj.weight", torch.zeros(64, 32), r"'blocks.0.attn.proj.weight' has shape \(64, 32\)"),
    ("blocks.1.attn.q_norm.weight", torch.ones(32), "'blocks.1.attn.q_norm.weight' has no place"),
])
def test_what_cannot_be_placed_is_refused_naming_the_key(tmp_path, key, value, message):
    state = {**mae_format_state_dict(), key: value}
    with pytest.raises(ConversionError, match=message):
        convert_weights(state, "bad.pth", tmp_path / "out.pth", [("vitdet_b", load_config(VITDET_B, NARROW))])
    assert not (tmp_path / "out.pth").exists()


def test_config_that_contradicts_the_weights_is_refused_naming_the_key(tmp_path):
    state = mae_format_state_dict()
    for opts, message in [
        (["MODEL.VIT.PRETRAIN_IMG_SIZE", "384"], "MODEL.VIT.PRETRAIN_IMG_SIZE is 384; the weights need 224"),
        (["MODEL.VIT.PATCH_SIZE", "32"], "MODEL.VIT.PATCH_SIZE is 32; the weights need 16"),
        (["MODEL.VIT.PRETRAIN_USE_CLS_TOKEN", "False"], "PRETRAIN_USE_CLS_TOKEN is False; the weights need True"),
    ]:
        with pytest.raises(ConversionError, match=message):
            convert_weights(state, "mae.pth", tmp_path / "out.pth", [("vitdet_b", load_config(VITDET_B, NARROW + opts))])
    resnet_target = load_config(REPO / "configs" / "detectron2" / "coco_segm_default_init_2x.yaml")
    with pytest.raises(ConversionError, match="holds a ViT but this config builds MODEL.BACKBONE.NAME build_resnet_fpn_backbone"):
        convert_weights(state, "mae.pth", tmp_path / "out.pth", [("r50", resnet_target)])


def test_a_run_refuses_weights_of_the_other_kind_or_size_before_training(tmp_path):
    vit_file = tmp_path / "vit.pth"
    convert_weights(initial_vit_state("vit_tiny_patch16_224", 128, 0), "random", vit_file, [("t", load_config(BUILTIN_T))])
    check_backbone_run(load_config(BUILTIN_T, ["MODEL.WEIGHTS", str(vit_file)]))  # fits
    with pytest.raises(ConversionError, match=r"vit.pth: MODEL.VIT.PRETRAIN_IMG_SIZE is 224; the weights need 128"):
        check_backbone_run(load_config(BUILTIN_T, ["MODEL.WEIGHTS", str(vit_file), "MODEL.VIT.PRETRAIN_IMG_SIZE", "224"]))
    r18 = REPO / "configs" / "detectron2" / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml"
    with pytest.raises(ConversionError, match=r"vit.pth: holds a ViT backbone, but MODEL.BACKBONE.NAME build_resnet_fpn"):
        check_backbone_run(load_config(r18, ["MODEL.WEIGHTS", str(vit_file)]))
    resnet_file = tmp_path / "r.pth"
    torch.save({"model": {}, "conversion": {"backbone": "resnet", "depth": 18, "block": "basic"}}, resnet_file)
    with pytest.raises(ConversionError, match=r"r.pth: holds a ResNet-18 backbone, but MODEL.BACKBONE.NAME build_vitdet"):
        check_backbone_run(load_config(BUILTIN_T, ["MODEL.WEIGHTS", str(resnet_file)]))
    with pytest.raises(ConfigError, match="MODEL.VIT.WINDOW_SIZE 6 does not divide the 8 x 8 patch grid"):
        check_backbone_run(load_config(BUILTIN_T, ["MODEL.VIT.WINDOW_SIZE", "6"]))
    with pytest.raises(ConfigError, match="SOLVER.VIT_LR_DECAY_RATE is 0.7, but MODEL.BACKBONE.NAME build_resnet_fpn_backbone"):
        check_backbone_run(load_config(r18, ["SOLVER.OPTIMIZER", "ADAMW", "SOLVER.VIT_LR_DECAY_RATE", "0.7"]))
    with pytest.raises(ConfigError, match="SOLVER.OPTIMIZER is 'LAMB'; must be one of SGD, ADAMW"):
        check_backbone_run(load_config(r18, ["SOLVER.OPTIMIZER", "LAMB"]))


def test_the_head_count_of_a_pretraining_checkpoint_is_recorded_and_checked(tmp_path):
    """The weights of a ViT with 3 heads and with 12 are alike (qkv is as wide for any count):
    the count comes from the checkpoint's pretraining config, or from --init random's name."""
    pretraining = load_pretrain_config(str(REPO / "configs" / "builtin" / "bicaptioning_ViT_T_16_L1_H192.yaml"))
    weights = initial_vit_state("vit_tiny_patch16_224", 128, 0)
    state = {"model": {f"visual.vit.{k}": v for k, v in weights.items()}, "config": pretraining.dump()}
    converted = tmp_path / "t.pth"
    backbone, _ = convert_weights(state, "checkpoint_600.pth", converted, [("t", load_config(BUILTIN_T))])
    assert backbone.num_heads == 3 and torch.load(converted, weights_only=True)["conversion"]["num_heads"] == 3
    with pytest.raises(ConversionError, match=r"t.pth: MODEL.VIT.NUM_HEADS is 12; the weights need 3"):
        check_backbone_run(load_config(BUILTIN_T, ["MODEL.WEIGHTS", str(converted), "MODEL.VIT.NUM_HEADS", "12"]))
    with pytest.raises(ConversionError, match=r"MODEL.VIT.NUM_HEADS is 12; the weights need 3"):
        convert_weights(state, "checkpoint_600.pth", tmp_path / "u.pth",
                        [("t", load_config(BUILTIN_T, ["MODEL.VIT.NUM_HEADS", "12"]))])
    backbone, _ = convert_weights(weights, "random", tmp_path / "r.pth", [("t", load_config(BUILTIN_T))],
                                  vit_arch="vit_tiny_patch16_224")
    assert backbone.num_heads == 3
    # A plain state dict (MAE's, DeiT's) does not say: recorded as unknown, and the summary says so.
    backbone, _ = convert_weights(weights, "mae.pth", tmp_path / "m.pth", [("t", load_config(BUILTIN_T))])
    assert backbone.num_heads is None and "num_heads" not in backbone.metadata
    assert "heads not recorded: MODEL.VIT.NUM_HEADS must be the pretraining's" in describe(backbone, "mae.pth")


@pytest.fixture(scope="module")
def resnet18_state() -> dict:
    """A torchvision ResNet-18 state dict with its classifier (``fc``), as torchvision saves it."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def test_a_run_refuses_unconverted_or_missing_weights_unless_it_resumes_its_own(tmp_path, resnet18_state):
    """detectron2 would load none of an unconverted file's keys and train from random init, with
    only its list of missing keys to tell; a missing file would fail after the model is built."""
    r18 = REPO / "configs" / "detectron2" / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml"
    pretraining = tmp_path / "checkpoint_600.pth"  # ours and the official code's: visual.* under "model"
    torch.save({"model": {**{f"visual.cnn.{k}": v for k, v in resnet18_state.items() if not k.startswith("fc.")},
                          "textual.x": torch.zeros(1)}, "iteration": 600}, pretraining)
    torchvision_file = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, torchvision_file)
    for config in (r18, BUILTIN_T):
        with pytest.raises(ConversionError, match=rf"MODEL.WEIGHTS {pretraining}: a ResNet in torchvision's names "
                                                  rf"\(keys 'visual.cnn.\*'\) with no conversion record, .* "
                                                  rf"convert it first: python tools/convert_backbone.py --input"):
            check_backbone_run(load_config(config, ["MODEL.WEIGHTS", str(pretraining)]))
    with pytest.raises(ConversionError, match=rf"MODEL.WEIGHTS {torchvision_file}: a ResNet in torchvision's names "
                                              rf"\(top-level keys\)"):
        check_backbone_run(load_config(r18, ["MODEL.WEIGHTS", str(torchvision_file)]))
    missing = tmp_path / "converted.pth"
    with pytest.raises(MissingInputError, match=rf"MODEL.WEIGHTS {missing}: file not found"):
        check_backbone_run(load_config(r18, ["MODEL.WEIGHTS", str(missing)]))
    # Resuming a run that has its own checkpoint: detectron2 loads that one, MODEL.WEIGHTS is not read.
    run = tmp_path / "run"
    run.mkdir()
    opts = ["MODEL.WEIGHTS", str(missing), "OUTPUT_DIR", str(run)]
    with pytest.raises(MissingInputError):
        check_backbone_run(load_config(r18, opts), resume=True)
    (run / "last_checkpoint").write_text("model_0000099.pth")
    check_backbone_run(load_config(r18, opts), resume=True)
    with pytest.raises(MissingInputError):
        check_backbone_run(load_config(r18, opts), resume=False)


R18_BUILTIN = REPO / "configs" / "detectron2" / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml"
# Layouts the converter reads beyond a pretraining checkpoint and torchvision's own file:
# layout -> (file contents from a ResNet-18 state dict and a MAE-format ViT, config, where the backbone is).
CONVERTIBLE_LAYOUTS = {
    "torchvision_without_fc": (  # DINO's and Barlow Twins' released ResNet-50s
        lambda r18, vit: {k: v for k, v in r18.items() if not k.startswith("fc.")}, R18_BUILTIN,
        "a ResNet in torchvision's names (top-level keys)"),
    "moco": (
        lambda r18, vit: {"state_dict": {f"module.encoder_q.{k}": v for k, v in r18.items()}, "epoch": 200},
        R18_BUILTIN, "a ResNet in torchvision's names (keys 'module.encoder_q.*')"),
    "ddp_pretraining": (
        lambda r18, vit: {"model": {f"module.visual.cnn.{k}": v for k, v in r18.items() if not k.startswith("fc.")}},
        R18_BUILTIN, "a ResNet in torchvision's names (keys 'module.visual.cnn.*')"),
    "mae": (lambda r18, vit: {"model": vit}, VITDET_B, "a ViT in timm's names (top-level keys)"),
}


@pytest.mark.parametrize("layout", sorted(CONVERTIBLE_LAYOUTS))
def test_a_run_refuses_a_backbone_in_any_layout_the_converter_reads(tmp_path, resnet18_state, layout):
    """Each of these passed the check and trained from random init (0 of 265 ResNet-50 tensors,
    0 of 171 ViTDet-T tensors loaded); refused, the command it names converts the same file."""
    contents, config, found = CONVERTIBLE_LAYOUTS[layout]
    opts = NARROW if config == VITDET_B else []
    source = tmp_path / "source.pth"
    torch.save(contents(resnet18_state, mae_format_state_dict()), source)
    with pytest.raises(ConversionError) as refusal:
        check_backbone_run(load_config(config, [*opts, "MODEL.WEIGHTS", str(source)]))
    assert str(refusal.value) == (
        f"MODEL.WEIGHTS {source}: {found} with no conversion record, not detectron2 weights (detectron2 would load "
        f"none of it); convert it first: python tools/convert_backbone.py --input {source} --output <name>.pth "
        f"--config-file <this config>")
    convert_weights(read_checkpoint(source), str(source), tmp_path / "d2.pth", [("target", load_config(config, opts))])
    check_backbone_run(load_config(config, [*opts, "MODEL.WEIGHTS", str(tmp_path / "d2.pth")]))


def test_weights_with_a_query_are_checked_as_the_file_they_name(tmp_path):
    """detectron2's ViTDet configs name MAE's file with ``?matching_heuristics=True``; its
    checkpointer strips the query, so a local copy named that way was refused as not found."""
    mae = tmp_path / "mae.pth"
    torch.save({"model": mae_format_state_dict()}, mae)
    with pytest.raises(ConversionError, match=rf"MODEL.WEIGHTS {mae}\?matching_heuristics=True: a ViT in timm's names "
                                              rf".*name matching would load only what it guesses, unchecked\); convert "
                                              rf"it first: python tools/convert_backbone.py --input {mae} --output"):
        check_backbone_run(load_config(VITDET_B, [*NARROW, "MODEL.WEIGHTS", f"{mae}?matching_heuristics=True"]))
    converted = tmp_path / "vit.pth"
    convert_weights(read_checkpoint(mae), str(mae), converted, [("b", load_config(VITDET_B, NARROW))])
    check_backbone_run(load_config(VITDET_B, [*NARROW, "MODEL.WEIGHTS", f"{converted}?matching_heuristics=True"]))
    with pytest.raises(ConversionError, match=r"vit.pth\?matching_heuristics=True: MODEL.VIT.PRETRAIN_IMG_SIZE is 384; "
                                              r"the weights need 224"):
        check_backbone_run(load_config(VITDET_B, [*NARROW, "MODEL.WEIGHTS", f"{converted}?matching_heuristics=True",
                                                  "MODEL.VIT.PRETRAIN_IMG_SIZE", "384"]))
    missing = tmp_path / "missing.pth"
    with pytest.raises(MissingInputError, match=rf"MODEL.WEIGHTS {missing}\?matching_heuristics=True: file not found"):
        check_backbone_run(load_config(BUILTIN_T, ["MODEL.WEIGHTS", f"{missing}?matching_heuristics=True"]))


@pytest.mark.parametrize("config", [R18_BUILTIN, BUILTIN_T], ids=["resnet", "vitdet"])
def test_detectron2_checkpoints_are_left_to_detectron2(tmp_path, config):
    """A fine-tuned model of ours (train_net's ``model_final.pth``: a ViTDet's ViT is under
    ``backbone.net.``, detectron2's own names) and a model-zoo ``.pkl`` carry no conversion
    record and load as they are: not refused."""
    cfg = load_config(config, ["MODEL.DEVICE", "cpu"])
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model_final", iteration=99)
    for weights in (tmp_path / "model_final.pth", f"{tmp_path / 'model_final.pth'}?matching_heuristics=True"):
        check_backbone_run(load_config(config, ["MODEL.WEIGHTS", str(weights)]))
    zoo = tmp_path / "model_final_f10217.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
                     "__author__": "Detectron2 Model Zoo"}, f)
    check_backbone_run(load_config(config, ["MODEL.WEIGHTS", str(zoo)]))


def test_convert_tool_names_layerscale_in_one_line_and_exits_2(tmp_path):
    state = {**mae_format_state_dict(), "blocks.0.ls2.gamma": torch.ones(64)}
    torch.save({"model": state}, tmp_path / "deit3.pth")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_backbone.py"), "--input", str(tmp_path / "deit3.pth"),
         "--output", str(tmp_path / "out.pth")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "deit3.pth" in lines[0] and "'blocks.0.ls2.gamma' is a LayerScale weight" in lines[0]
    assert not (tmp_path / "out.pth").exists()
