"""Compatibility with official VirTex checkpoints, checked against the reference manifest."""
import json
from pathlib import Path

import torch

from pretrain.checkpoint_io import load_model_weights
from pretrain.config import get_default_config
from pretrain.tasks import build_model

# Key names, shapes, dtypes and aliasing of an official VirTex checkpoint (bicaptioning_R_50_L1_H2048,
# official code at commit ae67b23), listed without the weights.
MANIFEST = Path(__file__).with_name("official_state_dict_bicaptioning_R_50_L1_H2048.json")


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def aliasing_groups(state: dict) -> list[list[str]]:
    """Keys grouped by the storage they share (groups of two or more), in key order."""
    by_storage: dict[int, list[str]] = {}
    for key, tensor in state.items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
    return [keys for keys in by_storage.values() if len(keys) > 1]


def test_full_h2048_model_has_the_official_state_dict_layout():
    manifest = load_manifest()
    torch.manual_seed(0)
    model = build_model(get_default_config())
    state = model.state_dict()
    assert list(state) == list(manifest["state_dict"])
    for key, entry in manifest["state_dict"].items():
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype) == "torch." + entry["dtype"], key
    assert sorted(map(sorted, aliasing_groups(state))) == sorted(map(sorted, manifest["shared_storage_groups"]))
    assert len(list(model.parameters())) == manifest["meta"]["num_unique_parameters"]
    assert len(list(model.named_buffers())) == manifest["meta"]["num_buffer_keys"]


def scaled_shape(key: str, shape: list[int], hidden: int, ffn: int) -> list[int]:
    """A manifest shape at H=2048/F=8192 rewritten for a head of width ``hidden``."""
    if key.startswith("visual."):
        return shape
    mapping = {2048: hidden, 3 * 2048: 3 * hidden, 8192: ffn}
    scaled = [mapping.get(d, d) for d in shape]
    if key.endswith("visual_projection.weight"):
        scaled[1] = shape[1]  # input: the 2048 ResNet-50 channels, independent of H
    return scaled


def official_checkpoint(manifest: dict, hidden: int, ffn: int) -> dict:
    """An official-format checkpoint with random weights in the manifest's layout and aliasing."""
    generator = torch.Generator().manual_seed(1)
    alias_of = {key: group[0] for group in manifest["shared_storage_groups"] for key in group}
    state = {}
    for key, entry in manifest["state_dict"].items():
        if alias_of.get(key, key) in state:
            state[key] = state[alias_of[key]]
            continue
        shape = scaled_shape(key, entry["shape"], hidden, ffn)
        if entry["dtype"] == "int64":
            state[key] = torch.randint(0, 1000, shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
            "iteration": 1234}


def test_official_layout_checkpoint_loads_strictly_into_a_scaled_down_model(tmp_path):
    manifest = load_manifest()
    cfg = get_default_config()
    cfg.MODEL.TEXTUAL.NAME = "transdec_postnorm::L1_H128_A2_F256"
    model = build_model(cfg)
    checkpoint = official_checkpoint(manifest, hidden=128, ffn=256)
    expected = {key: shape for key, shape in ((k, list(v.shape)) for k, v in checkpoint["model"].items())}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    path = tmp_path / "checkpoint_1234.pth"
    torch.save(checkpoint, path)
    load_model_weights(model, path)
    state = model.state_dict()
    for key, tensor in checkpoint["model"].items():
        assert torch.equal(state[key], tensor), key
    # Loading copies values in place: weight tying and head sharing survive.
    assert model.textual.output.weight is model.backward_textual.embedding.words.weight
    assert model.backward_textual.visual_projection is model.textual.visual_projection
    assert sorted(map(sorted, aliasing_groups(state))) == sorted(map(sorted, manifest["shared_storage_groups"]))
