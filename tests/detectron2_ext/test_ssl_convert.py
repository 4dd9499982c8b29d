"""The ResNet releases VirTex is compared with (MoCo v1/v2/v3, SwAV, DINO, DenseCL, MMSelfSup,
Barlow Twins, ...), in their real key layouts (tests/detectron2_ext/ssl_releases.py): the
converter takes the encoder each project transfers, drops its heads and says what it passed
over; train_net's check of MODEL.WEIGHTS finds the same encoder; a file whose ResNets cannot be
told apart is refused in one line naming them and the flag that chooses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from detectron2_ext import load_config
from detectron2_ext.convert import (
    ConversionError,
    convert_resnet_state_dict,
    rename_key,
)
from detectron2_ext.transfer import describe
from detectron2_ext.vit_verify import check_backbone_run
from tests.detectron2_ext.ssl_releases import RELEASES, backbone
from tests.tool_main import Tool

R18_BUILTIN = Path(__file__).resolve().parents[2] / "configs" / "detectron2" / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml"
# Refused before (two encoders, a head under the ResNet's prefix, or DINO's student/teacher entries).
FIXED = ["moco_v1", "moco_v2", "moco_v3", "swav", "swav_training", "dino_training", "densecl_training",
         "mmselfsup_mocov2", "mmselfsup_byol"]


@pytest.fixture(scope="module")
def encoders() -> tuple[dict, dict]:
    """Two ResNet-18 state dicts with different values: the encoder a project transfers and the other one."""
    torch.manual_seed(0)
    kept = torchvision.models.resnet18().state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in kept.items()}
    return kept, other


@pytest.mark.parametrize("layout", FIXED)
def test_each_release_converts_the_encoder_its_project_transfers(encoders, layout):
    """MoCo's query encoder (not the key encoder), MoCo v3's base encoder, DINO's teacher,
    MMSelfSup's backbone; heads under the prefix (MoCo's MLP ``fc``, SwAV's projection head and
    prototypes) dropped. Each of these layouts was refused before."""
    kept, other = encoders
    build, (entry, prefix) = RELEASES[layout]
    converted = convert_resnet_state_dict(build(kept, other))
    assert (converted.source_entry, converted.source_prefix) == (entry, prefix)
    expected = {rename_key(k): v for k, v in kept.items() if not k.startswith("fc.")}
    assert converted.state_dict.keys() == expected.keys()
    assert all(torch.equal(converted.state_dict[k], v) for k, v in expected.items()), "another encoder's values"


# layout -> what the summary must say of the encoder, what it passed over, and what it dropped
SUMMARIES = {
    "moco_v2": ["from 'module.encoder_q.*' of the 'state_dict' entry of f.pth",
                ("not converted: 'module.encoder_k.*' (the key encoder of MoCo v1/v2, DenseCL and MMSelfSup, a "
                 "momentum copy of the query encoder)"), "dropped the head: module.encoder_q.fc.* (4 keys)",
                "left out 126 keys outside the ResNet: module.encoder_k.* (124 keys), module.queue, module.queue_ptr"],
    "moco_v3": ["not converted: 'module.momentum_encoder.*' (MoCo v3's momentum copy of base_encoder)",
                "dropped the head: module.base_encoder.fc.* (10 keys)",
                "module.momentum_encoder.* (130 keys), module.predictor.* (10 keys)"],
    "dino_training": ["from 'module.backbone.*' of the 'teacher' entry",
                      "not converted: the 'student' entry (DINO's student; its evaluation reads the teacher)",
                      "left out 8 keys outside the ResNet: module.head.* (8 keys)"],
    "densecl_training": ["from 'backbone.*'", "'encoder_q.0.*' (the same tensors as 'backbone.*')",
                         "'encoder_k.0.*' (the key encoder"],
    "swav": ["from 'module.*' of f.pth", "dropped the head: module.projection_head.* (9 keys), module.prototypes.weight"],
    "barlow_training": ["left out 10 keys outside the ResNet: module.projector.* (7 keys), module.bn.* (3 keys)"],
}


@pytest.mark.parametrize("layout", sorted(SUMMARIES))
def test_the_summary_names_the_encoder_and_what_was_passed_over_or_dropped(encoders, layout):
    kept, other = encoders
    text = describe(convert_resnet_state_dict(RELEASES[layout][0](kept, other)), "f.pth")
    for part in SUMMARIES[layout]:
        assert part in text, text


def two_unknown_encoders(kept, other):
    """BYOL as lucidrains/byol-pytorch names it: nothing says which network is the online one."""
    return {"state_dict": {**backbone(kept, "online_encoder.net."), **backbone(other, "target_encoder.net.")}}


def densecl_with_a_backbone_unlike_its_query_encoder(kept, other):
    """DenseCL's layout, but ``backbone`` is not ``encoder_q.0``: no longer two names of one ResNet."""
    state = RELEASES["densecl_training"][0](kept, other)["state_dict"]
    return {"state_dict": {**state, **backbone(other, "backbone.")}}


@pytest.mark.parametrize("build, prefixes", [
    (two_unknown_encoders, ["online_encoder.net.", "target_encoder.net."]),
    (densecl_with_a_backbone_unlike_its_query_encoder, ["backbone.", "encoder_q.0."]),
], ids=["byol_pytorch", "densecl_altered"])
def test_resnets_that_cannot_be_told_apart_are_refused_naming_both_and_chosen_by_flag(
        tmp_path, capsys, encoders, build, prefixes):
    """One line, exit status 2, naming every candidate and --backbone-prefix; with the flag the
    chosen ResNet converts (a prefix that holds none is refused, naming those that do)."""
    kept, other = encoders
    source = tmp_path / "two.pth"
    torch.save(build(kept, other), source)
    tool = Tool("convert_backbone")
    assert tool.main(["--input", str(source), "--output", str(tmp_path / "out.pth")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(source) in lines[0]
    assert all(f"'{p}*'" in lines[0] for p in prefixes) and f"--backbone-prefix '{prefixes[0]}'" in lines[0]
    assert not (tmp_path / "out.pth").exists()
    chosen = convert_resnet_state_dict(build(kept, other), prefixes[0])
    assert chosen.source_prefix == prefixes[0]
    with pytest.raises(ConversionError, match=r"no ResNet under the chosen prefix 'module\.'; ResNets are under"):
        convert_resnet_state_dict(build(kept, other), "module.")


@pytest.mark.parametrize("layout, found", [
    ("moco_v2", "keys 'module.encoder_q.*'"),
    ("dino_training", "keys 'module.backbone.*' of the 'teacher' entry"),
    ("densecl_training", "keys 'backbone.*'"),
])
def test_train_net_finds_the_backbone_the_converter_converts(tmp_path, encoders, layout, found):
    """The pre-run check names the one encoder the converter takes (it named both of MoCo's, and
    let DINO's training checkpoint through, to train from random init)."""
    kept, other = encoders
    weights = tmp_path / f"{layout}.pth"
    torch.save(RELEASES[layout][0](kept, other), weights)
    with pytest.raises(ConversionError) as refusal:
        check_backbone_run(load_config(R18_BUILTIN, ["MODEL.WEIGHTS", str(weights)]))
    assert f": a ResNet in torchvision's names ({found}) with no conversion record" in str(refusal.value)
