"""The paper's baselines made as the official code makes them: the random-init ResNet (the
pretraining model's torchvision ResNet, zero_init_residual=True) and torchvision's ImageNet V1
weights, with V2 only on request."""
import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from pretrain.config import load_config
from pretrain.models import factory
from pretrain.models.visual_backbones import (
    check_torchvision_weights_file,
    initial_resnet_state,
)

REPO = Path(__file__).resolve().parents[2]
R18_TARGET = ["--config-file", str(REPO / "configs/detectron2/coco_segm_default_init_2x.yaml"),
              "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


def test_random_init_is_the_seeded_torchvision_resnet_with_shut_residual_branches():
    state = initial_resnet_state("resnet18", seed=3)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None, zero_init_residual=True).state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert state["layer1.0.bn2.weight"].abs().sum() == 0  # the last BN of each block starts at zero
    assert not torch.equal(initial_resnet_state("resnet18", seed=4)["conv1.weight"], state["conv1.weight"])


def test_convert_backbone_writes_the_random_init_baseline(tmp_path):
    output = tmp_path / "random_r18.pth"
    result = subprocess.run([sys.executable, str(REPO / "tools/convert_backbone.py"), "--init", "random", "--depth",
                             "18", "--seed", "3", "--output", str(output), *R18_TARGET],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = torch.load(output, weights_only=True)["model"]
    source = initial_resnet_state("resnet18", seed=3)
    assert torch.equal(weights["stem.conv1.weight"], source["conv1.weight"])
    assert torch.equal(weights["res2.0.conv2.norm.weight"], source["layer1.0.bn2.weight"])


def test_imagenet_files_are_checked_against_torchvision_hash(tmp_path, monkeypatch):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"weights")
    prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    urls = {"IMAGENET1K_V1": f"https://example.invalid/resnet50-{prefix}.pth",
            "IMAGENET1K_V2": "https://example.invalid/resnet50-00000000.pth"}
    monkeypatch.setattr(torchvision.models, "get_model_weights",
                        lambda arch: {k: SimpleNamespace(url=v) for k, v in urls.items()})
    check_torchvision_weights_file(str(path), "resnet50", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"resnet50.pth: not torchvision's IMAGENET1K_V2 weights of resnet50"):
        check_torchvision_weights_file(str(path), "resnet50", "IMAGENET1K_V2")


@pytest.mark.parametrize("overrides, expected", [([], "IMAGENET1K_V1"),
                                                 (["MODEL.VISUAL.PRETRAINED_WEIGHTS", "IMAGENET1K_V2"], "IMAGENET1K_V2")])
def test_pretrained_backbones_load_v1_unless_v2_is_asked_for(monkeypatch, overrides, expected):
    asked, build = [], torchvision.models.resnet50

    def resnet50(weights=None, zero_init_residual=False):
        asked.append(weights)
        return build(weights=None, zero_init_residual=zero_init_residual)

    monkeypatch.setattr(torchvision.models, "resnet50", resnet50)
    factory.build_visual_backbone(load_config(overrides=["MODEL.VISUAL.PRETRAINED", "True", *overrides]))
    assert asked == [expected]
