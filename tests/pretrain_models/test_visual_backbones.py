"""The ResNet backbones: names, output map, official init and key names, freezing."""
import pytest
import torch

from pretrain.models.factory import build_visual_backbone
from pretrain.models.visual_backbones import (
    TorchvisionVisualBackbone,
    parse_visual_name,
)

from .conftest import tiny_config


def test_output_is_stride_32_feature_map_and_no_fc_keys():
    backbone = TorchvisionVisualBackbone("resnet18", 512)
    features = backbone(torch.randn(2, 3, 64, 96))
    assert features.shape == (2, 512, 2, 3)
    keys = list(backbone.state_dict())
    assert keys[0] == "cnn.conv1.weight"
    assert not [k for k in keys if k.startswith("cnn.fc")]


def test_zero_init_residual_for_basic_and_bottleneck_blocks():
    basic = TorchvisionVisualBackbone("resnet18", 512)
    bottleneck = TorchvisionVisualBackbone("resnet50", 2048)
    assert all(block.bn2.weight.abs().sum() == 0 for layer in ("layer1", "layer4") for block in getattr(basic.cnn, layer))
    assert all(block.bn3.weight.abs().sum() == 0 for block in bottleneck.cnn.layer3)
    assert bottleneck.cnn.layer3[0].bn2.weight.eq(1).all()


def test_config_can_open_the_residual_branches_from_the_start():
    """MODEL.VISUAL.ZERO_INIT_RESIDUAL False (the built-in config's choice for short runs)
    starts every block's last BatchNorm at 1, like the stem's."""
    opened = build_visual_backbone(tiny_config(**{"MODEL.VISUAL.ZERO_INIT_RESIDUAL": False}))
    official = build_visual_backbone(tiny_config())
    for layer in ("layer1", "layer4"):
        for block_open, block_official in zip(getattr(opened.cnn, layer), getattr(official.cnn, layer)):
            assert block_open.bn2.weight.eq(1).all()
            assert block_official.bn2.weight.eq(0).all()


def test_channels_last_input_gives_same_features():
    backbone = TorchvisionVisualBackbone("resnet18", 512).eval()
    images = torch.randn(2, 3, 64, 64)
    reference = backbone(images)
    backbone.to(memory_format=torch.channels_last)
    out = backbone(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_frozen_backbone_has_no_gradients_and_stays_in_eval_mode():
    cfg = tiny_config(**{"MODEL.VISUAL.FROZEN": True})
    backbone = build_visual_backbone(cfg)
    backbone.train()
    assert not backbone.cnn.training and not backbone.cnn.bn1.training
    assert not any(p.requires_grad for p in backbone.parameters())
    before = backbone.cnn.bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, backbone.cnn.bn1.running_mean)


@pytest.mark.parametrize("name", ["resnet50", "torchvision:resnet50", "timm::resnet50", "torchvision::vgg16"])
def test_bad_names_are_rejected(name):
    with pytest.raises(ValueError, match="MODEL.VISUAL.NAME"):
        parse_visual_name(name)


def test_feature_size_must_match_architecture():
    with pytest.raises(ValueError, match="FEATURE_SIZE is 2048 but resnet18 produces 512"):
        TorchvisionVisualBackbone("resnet18", 2048)
