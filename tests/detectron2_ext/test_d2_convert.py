"""Backbone conversion: key layouts, errors, safe loading, and numerical equivalence.

Equivalence: a torchvision ResNet (random weights, randomised BN statistics) is converted, the
file is loaded into the detectron2 models built from our configs through DetectionCheckpointer,
and detectron2's ResNet in eval mode must reproduce torchvision's res2..res5 outputs.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from torch import nn

from detectron2_ext import load_config
from detectron2_ext.checkpoint import SafeDetectionCheckpointer
from detectron2_ext.convert import ConversionError, convert_resnet_state_dict
from detectron2_ext.transfer import (
    check_output_path,
    convert_checkpoint_file,
    convert_weights,
)
from detectron2_ext.verify import check_config
from detectron2_ext.vit_verify import check_backbone_run
from pretrain.checkpoint_io import (
    CheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "detectron2"
COCO = CONFIGS / "coco_segm_default_init_2x.yaml"
VOC = CONFIGS / "voc_det_default_init_24k.yaml"
LVIS_IMAGENET = CONFIGS / "lvis_segm_imagenet_init_2x.yaml"  # FrozenBN: no num_batches_tracked
BASIC_OPTS = {18: ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64],
              34: ["MODEL.RESNETS.DEPTH", 34, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]}
# relative to the largest activation of a stage; float32 through up to 50 conv+BN layers
TOLERANCE = 1e-4


def randomized_resnet(name: str, seed: int = 0) -> nn.Module:
    """A torchvision ResNet whose BN layers all have non-trivial statistics and affine terms."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.num_batches_tracked.fill_(123)
    return model.eval()


def meta_state_dict(name: str) -> dict:
    """Keys and shapes of a torchvision ResNet without allocating its weights."""
    with torch.device("meta"):
        return getattr(torchvision.models, name)().state_dict()


def torchvision_stages(model, x) -> dict:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    stages = {}
    for index, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=2):
        x = layer(x)
        stages[f"res{index}"] = x
    return stages


def c4_stages(model, x) -> dict:
    """res2..res4 from a C4 model's backbone and res5 from its ROI head's blocks (norm excluded)."""
    x = model.backbone.stem(x)
    stages = {}
    for name, stage in zip(model.backbone.stage_names, model.backbone.stages):
        x = stages[name] = stage(x)
    stages["res5"] = model.roi_heads.res5[:3](x)
    return stages


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, what
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= TOLERANCE * scale + 1e-6, f"{what}: max error {error:.3g} at scale {scale:.3g}"


def official_layout(state_dict) -> dict:
    """A checkpoint shaped like the official VirTex model zoo's (and ours)."""
    model = {f"visual.cnn.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
    model["textual.embedding.words.weight"] = torch.zeros(10, 4)
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "iteration": 500000}


LAYOUTS = {
    "official": official_layout,
    "ddp": lambda sd: {"model": {f"module.visual.cnn.{k}": v for k, v in sd.items()}},
    "torchvision_wrapped": lambda sd: {"state_dict": dict(sd)},
    "torchvision_plain": dict,
}


@pytest.mark.parametrize("name,depth,block", [("resnet18", 18, "basic"), ("resnet34", 34, "basic"),
                                              ("resnet50", 50, "bottleneck"), ("resnet101", 101, "bottleneck")])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_and_depths(name, depth, block, layout):
    source = meta_state_dict(name)
    converted = convert_resnet_state_dict(LAYOUTS[layout](source))
    assert (converted.depth, converted.block) == (depth, block)
    # every source tensor but the classifier, BN statistics included
    assert len(converted.state_dict) == len(source) - 2
    assert converted.filled_batch_counters == 0
    assert "stem.conv1.norm.running_var" in converted.state_dict
    assert "res5.0.shortcut.norm.num_batches_tracked" in converted.state_dict
    assert converted.source_prefix == {"official": "visual.cnn.", "ddp": "module.visual.cnn."}.get(layout, "")
    assert converted.ignored_keys == (["textual.embedding.words.weight"] if layout == "official" else [])


def test_not_a_resnet():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()
    with pytest.raises(ConversionError, match="no torchvision ResNet found"):
        convert_resnet_state_dict({"model": mlp})


def test_bad_resnets():
    source = dict(meta_state_dict("resnet50"))
    truncated = {k: v for k, v in source.items() if not k.startswith("layer4.2.")}
    with pytest.raises(ConversionError, match=r"unknown ResNet layout: bottleneck blocks \(3, 4, 6, 2\)"):
        convert_resnet_state_dict(truncated)
    no_stats = {k: v for k, v in source.items() if k != "layer2.1.bn2.running_var"}
    with pytest.raises(ConversionError, match=r"res3.1.conv2.norm.*running_var"):
        convert_resnet_state_dict(no_stats)
    with pytest.raises(ConversionError, match="'layer1.0.se.weight' is not a key of a torchvision ResNet"):
        convert_resnet_state_dict({**source, "layer1.0.se.weight": torch.zeros(1)})
    old = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    assert convert_resnet_state_dict(old).filled_batch_counters == 53


def test_config_mismatches_are_explained():
    r18 = convert_resnet_state_dict(meta_state_dict("resnet18"))
    with pytest.raises(ConversionError, match=r"MODEL.RESNETS.DEPTH is 50; the weights need 18; "
                                              r"MODEL.RESNETS.RES2_OUT_CHANNELS is 256; the weights need 64"):
        check_config(load_config(COCO), r18, COCO.name)
    with pytest.raises(ConversionError, match=r"MODEL.RESNETS.RES2_OUT_CHANNELS is 256; the weights need 64$"):
        check_config(load_config(COCO, ["MODEL.RESNETS.DEPTH", 18]), r18, COCO.name)
    r50 = convert_resnet_state_dict(meta_state_dict("resnet50"))
    with pytest.raises(ConversionError, match=r"MODEL.RESNETS.STRIDE_IN_1X1 is True; the weights need False$"):
        check_config(load_config(COCO, ["MODEL.RESNETS.STRIDE_IN_1X1", True]), r50, COCO.name)
    warnings = check_config(load_config(COCO, ["INPUT.FORMAT", "BGR"]), r50, COCO.name)
    assert any("INPUT.FORMAT is BGR" in w for w in warnings)


@pytest.mark.parametrize("name, widths, opts", [
    ("wide_resnet50_2", {"num_groups": 1, "width_per_group": 128}, ["MODEL.RESNETS.WIDTH_PER_GROUP", 128]),
    ("resnext50_32x4d", {"num_groups": 32, "width_per_group": 4},
     ["MODEL.RESNETS.NUM_GROUPS", 32, "MODEL.RESNETS.WIDTH_PER_GROUP", 4]),
])
def test_the_width_of_a_resnet_50_is_recorded_and_checked(name, widths, opts):
    """A wide ResNet-50-2 or a ResNeXt-50 has the blocks of a ResNet-50: the record said only
    "ResNet-50", and the standard R50 config built layers of other shapes, which stayed at random init."""
    backbone = convert_resnet_state_dict(meta_state_dict(name))
    assert backbone.metadata == {"backbone": "resnet", "depth": 50, "block": "bottleneck", "stem_out_channels": 64,
                                 "res2_out_channels": 256, **widths, "stride_in_1x1": False}
    expected = "; ".join(f"MODEL.RESNETS.{key} is {default}; the weights need {widths[field]}"
                         for key, field, default in (("NUM_GROUPS", "num_groups", 1),
                                                     ("WIDTH_PER_GROUP", "width_per_group", 64))
                         if widths[field] != default)
    with pytest.raises(ConversionError, match=rf"^{COCO.name}: {expected}$"):
        check_config(load_config(COCO), backbone, COCO.name)
    assert check_config(load_config(COCO, opts), backbone, COCO.name) == []


def narrow_resnet50(seed: int = 0) -> nn.Module:
    """A torchvision ResNet-50 a quarter as wide in its bottlenecks (width_per_group 16, as
    wide_resnet50_2 has 128): real bottleneck weights of a recorded width, 8 M parameters."""
    torch.manual_seed(seed)
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], width_per_group=16)


def test_a_run_refuses_a_converted_resnet_its_config_would_not_build(tmp_path):
    """Converted ResNet records were never compared with the run's config: R18 weights under an
    R50 config, R50 weights under an R18 config or a wider R50 under the standard config loaded
    the few tensors whose shapes agree and left the rest at random init, with only fvcore's
    warnings to tell; STRIDE_IN_1X1 True loaded all and computed something else."""
    r18_config = CONFIGS / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml"
    narrow, r18 = tmp_path / "narrow_r50.pth", tmp_path / "r18.pth"
    convert_weights(narrow_resnet50().state_dict(), "narrow", narrow,
                    [("coco", load_config(COCO, ["MODEL.RESNETS.WIDTH_PER_GROUP", 16]))])
    convert_weights(randomized_resnet("resnet18").state_dict(), "r18", r18, [("r18", load_config(r18_config))])
    assert torch.load(narrow, weights_only=True)["conversion"]["width_per_group"] == 16

    def run(config, weights, *opts):
        check_backbone_run(load_config(config, ["MODEL.WEIGHTS", str(weights), *opts]))

    run(COCO, narrow, "MODEL.RESNETS.WIDTH_PER_GROUP", 16)
    run(r18_config, r18)
    for config, weights, opts, message in [
        (COCO, narrow, [], "MODEL.RESNETS.WIDTH_PER_GROUP is 64; the weights need 16"),
        (COCO, narrow, ["MODEL.RESNETS.WIDTH_PER_GROUP", 16, "MODEL.RESNETS.STRIDE_IN_1X1", True],
         "MODEL.RESNETS.STRIDE_IN_1X1 is True; the weights need False"),
        (r18_config, narrow, ["MODEL.RESNETS.WIDTH_PER_GROUP", 16],
         "MODEL.RESNETS.DEPTH is 18; the weights need 50; MODEL.RESNETS.RES2_OUT_CHANNELS is 64; the weights need 256"),
        (COCO, r18, [], ("MODEL.RESNETS.DEPTH is 50; the weights need 18; "
                         "MODEL.RESNETS.RES2_OUT_CHANNELS is 256; the weights need 64")),
    ]:
        with pytest.raises(ConversionError) as refusal:
            run(config, weights, *opts)
        assert str(refusal.value) == f"{weights}: {message}"

    # Converted before the widths were recorded: the record has the depth, and only it is compared.
    for weights in (narrow, r18):
        old = torch.load(weights, weights_only=True)
        old["conversion"] = {k: old["conversion"][k] for k in ("source", "source_prefix", "depth", "block")}
        torch.save(old, weights)
    run(COCO, narrow)
    with pytest.raises(ConversionError, match=r"r18.pth: MODEL.RESNETS.DEPTH is 50; the weights need 18$"):
        run(COCO, r18)


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "resnet34"])
def test_equivalence_through_detectron2_checkpointer(name, tmp_path):
    source = randomized_resnet(name)
    depth = int(name[len("resnet"):])
    layout = {"resnet50": "official", "resnet18": "ddp", "resnet34": "torchvision_wrapped"}[name]
    torch.save(LAYOUTS[layout](source.state_dict()), tmp_path / "source.pth")
    configs = [COCO, VOC, LVIS_IMAGENET] if depth == 50 else [COCO]
    targets = [(path.name, load_config(path, BASIC_OPTS.get(depth, []))) for path in configs]
    output = tmp_path / "d2.pth"
    backbone, checks = convert_checkpoint_file(tmp_path / "source.pth", output, targets)
    assert backbone.depth == depth and len(checks) == len(configs)
    frozen_counters = 53 if depth == 50 else 0
    assert [check.loaded for check in checks] == [len(backbone.state_dict)] * (len(configs) - 1) + [
        len(backbone.state_dict) - frozen_counters]

    written = torch.load(output, map_location="cpu", weights_only=True)
    assert written["matching_heuristics"] is True and written["__author__"]
    assert all(isinstance(v, torch.Tensor) for v in written["model"].values())

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = torchvision_stages(source, x)
        for (config_name, cfg), check in zip(targets, checks):
            cfg.MODEL.DEVICE = "cpu"
            model = build_model(cfg).eval()
            SafeDetectionCheckpointer(model).load(str(output))
            if cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone":
                stages = model.backbone.bottom_up(x)
            else:  # C4: res2..res4 in the backbone, res5's blocks in the ROI head
                stages = c4_stages(model, x)
                norm = model.roi_heads.res5.norm
                assert isinstance(norm, nn.SyncBatchNorm) and norm.num_features == 2048
                assert check.untouched == ["roi_heads.res5.norm"]
                assert torch.equal(norm.running_mean, torch.zeros(2048)), "the extra norm has no pretrained weights"
            for stage in ("res2", "res3", "res4", "res5"):
                assert_close(stages[stage], expected[stage], f"{name} {config_name} {stage}")


class MkdirOnUnpickle:
    """Pickles to a call of os.mkdir: unpickling it runs code, which must never happen."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def run_converter(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_backbone.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_cli_converts_official_checkpoint_and_keeps_existing_output(tmp_path):
    torch.save(official_layout(randomized_resnet("resnet50").state_dict()), tmp_path / "virtex.pth")
    output = tmp_path / "virtex_d2.pth"
    result = run_converter("--input", tmp_path / "virtex.pth", "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Converted ResNet-50 (bottleneck blocks 3-4-6-3) from 'visual.cnn.*'" in result.stdout
    assert "318 tensors, 53 BatchNorm layers" in result.stdout
    assert "verified coco_segm_default_init_2x.yaml" in result.stdout
    assert "verified voc_det_default_init_24k.yaml" in result.stdout
    assert "roi_heads.res5.norm" in result.stdout
    written = output.read_bytes()
    assert len(torch.load(output, weights_only=True)["model"]) == 318

    again = run_converter("--input", tmp_path / "virtex.pth", "--output", output)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    assert output.read_bytes() == written


def test_cli_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"model": {"a": torch.zeros(1)}, "payload": MkdirOnUnpickle(marker)}, tmp_path / "evil.pth")
    result = run_converter("--input", tmp_path / "evil.pth", "--output", tmp_path / "out.pth")
    assert result.returncode == 2
    assert "refusing to load: reading it needs arbitrary unpickling" in result.stderr
    assert "posix.mkdir" in result.stderr and "--allow-unsafe-pickle" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_read_checkpoint_errors_and_opt_in(tmp_path):
    state = {"model": {"w": torch.ones(2)}}
    torch.save({**state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "namespace.pth")
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        read_checkpoint(tmp_path / "namespace.pth")
    assert read_checkpoint(tmp_path / "namespace.pth", allow_unsafe_pickle=True)["args"].lr == 0.1

    torch.save(state, tmp_path / "good.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth: corrupt or truncated checkpoint"):
        read_checkpoint(tmp_path / "truncated.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        read_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "missing.pth")


def test_outputs_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConversionError, match="write a .pth instead: detectron2 reads .pkl weights with plain pickle"):
        check_output_path(tmp_path / "weights.pkl", force=False)
    existing = tmp_path / "weights.pth"
    save_checkpoint({"x": torch.zeros(1)}, existing)
    with pytest.raises(FileExistsError, match="pass --force"):
        check_output_path(existing, force=False)
    with pytest.raises(FileExistsError, match="pass --force"):
        save_checkpoint({"x": torch.ones(1)}, existing)
    save_checkpoint({"x": torch.ones(1)}, existing, force=True)
    assert torch.equal(torch.load(existing, weights_only=True)["x"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"], "no temporary files left behind"


def test_checkpointer_refuses_pkl_weights_unless_opted_in(tmp_path):
    import pickle

    model = nn.Linear(3, 2)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": {"weight": np.full((2, 3), 0.5, np.float32), "bias": np.zeros(2, np.float32)},
                     "__author__": "someone"}, f)
    with pytest.raises(UnsafeCheckpointError, match="detectron2 reads .pkl files with plain pickle"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "zoo.pkl"))
    SafeDetectionCheckpointer(model, allow_unsafe_pickle=True).load(str(tmp_path / "zoo.pkl"))
    assert torch.equal(model.weight.data, torch.full((2, 3), 0.5))
