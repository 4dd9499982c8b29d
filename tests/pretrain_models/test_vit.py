"""The timm ViT backbone of pretraining: names, the token map the heads read, no class token or
LayerScale, drop path, and the ViT optimiser settings (parameter groups, no decay)."""
import pytest
import torch

from pretrain.config import ConfigError
from pretrain.engine.optim import build_param_groups
from pretrain.errors import BadValueError
from pretrain.models.factory import build_visual_backbone
from pretrain.models.vit import TimmViTBackbone, parse_vit_name
from pretrain.tasks import build_model

from .conftest import caption_batch, tiny_config

VIT = {"MODEL.VISUAL.NAME": "timm::vit_tiny_patch16_224", "MODEL.VISUAL.FEATURE_SIZE": 192, "DATA.IMAGE_CROP_SIZE": 32}
NO_DECAY = ".*(norm|bias|pos_embed|positions)"


def test_output_is_the_normed_patch_grid_of_timm():
    backbone = TimmViTBackbone("vit_tiny_patch16_224", 192, image_size=32).eval()
    images = torch.randn(2, 3, 32, 48)  # another size than the pretraining one: resampled pos_embed
    out = backbone(images)
    assert out.shape == (2, 192, 2, 3)
    tokens = backbone.vit.forward_features(images)  # (B, 6, D) after the final LayerNorm
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), tokens, rtol=0, atol=0)
    normed = backbone.vit.norm(backbone.vit.blocks(backbone.vit._pos_embed(backbone.vit.patch_embed(images))))
    torch.testing.assert_close(out[:, :, 1, 2], normed[:, 5])  # row-major: row 1, column 2 is token 5


def test_no_class_token_no_layerscale_no_head_and_drop_path_from_the_config():
    backbone = build_visual_backbone(tiny_config(**VIT, **{"MODEL.VISUAL.DROP_PATH": 0.1}))
    keys = set(backbone.state_dict())
    assert "vit.cls_token" not in keys and not any(k.startswith("vit.head") for k in keys)
    assert not any(".ls1." in k or ".ls2." in k or "gamma" in k for k in keys)
    assert backbone.vit.pos_embed.shape == (1, 4, 192)  # 2 x 2 grid at 32 px, no class slot
    assert {"vit.norm.weight", "vit.patch_embed.proj.weight", "vit.blocks.11.mlp.fc2.bias"} <= keys
    blocks = backbone.vit.blocks  # timm's linear rule over depth: 0 for the first block, 0.1 for the last
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity) and blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_bad_names_and_settings_are_config_errors():
    assert parse_vit_name("timm::vit_small_patch16_224") == "vit_small_patch16_224"
    for name in ("timm::resnet50", "timm::vit_tiny", "vit::vit_base_patch16_224"):
        with pytest.raises(ConfigError, match="is not supported"):
            parse_vit_name(name)
    with pytest.raises(BadValueError, match="FEATURE_SIZE is 768 but vit_tiny_patch16_224 produces 192"):
        build_visual_backbone(tiny_config(**{**VIT, "MODEL.VISUAL.FEATURE_SIZE": 768}))
    with pytest.raises(ConfigError, match="DROP_PATH is for timm ViTs"):
        build_visual_backbone(tiny_config(**{"MODEL.VISUAL.DROP_PATH": 0.1}))
    with pytest.raises(ConfigError, match="PRETRAINED loads torchvision ResNet weights"):
        build_visual_backbone(tiny_config(**VIT, **{"MODEL.VISUAL.PRETRAINED": True}))


def test_frozen_vit_has_no_gradients_and_stays_in_eval_mode():
    backbone = build_visual_backbone(tiny_config(**VIT, **{"MODEL.VISUAL.FROZEN": True}))
    backbone.train()
    assert not backbone.vit.training and not any(p.requires_grad for p in backbone.parameters())


def test_the_vit_is_the_visual_group_and_norms_biases_positions_do_not_decay():
    cfg = tiny_config(**VIT, **{"OPTIM.NO_DECAY": NO_DECAY, "OPTIM.CNN_LR": 0.002, "OPTIM.OPTIMIZER_NAME": "adamw"})
    model = build_model(cfg)
    groups = {g["name"]: g for g in build_param_groups(cfg, model)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {name: {names[id(p)] for p in g["params"]} for name, g in groups.items()}
    assert groups["cnn"]["lr"] == groups["cnn_no_decay"]["lr"] == 0.002
    assert groups["cnn"]["weight_decay"] == cfg.OPTIM.WEIGHT_DECAY and groups["cnn_no_decay"]["weight_decay"] == 0.0
    assert members["cnn"] == {n for n in names.values() if n.startswith("visual.vit.") and n.endswith("weight")
                              and "norm" not in n}
    assert {"visual.vit.pos_embed", "visual.vit.norm.weight", "visual.vit.blocks.0.attn.qkv.bias"} <= members["cnn_no_decay"]
    assert "textual.embedding.positions.weight" in members["textual_no_decay"]
    assert "textual.visual_projection.weight" in members["textual"]


def test_a_vit_captioner_trains_one_step_and_its_loss_falls():
    torch.manual_seed(0)
    cfg = tiny_config(**VIT)
    model = build_model(cfg)
    batch = caption_batch()
    batch["image"] = torch.randn(3, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
