"""Convert the ResNet of a torchvision-style state dict into detectron2 backbone weights.

Works from state-dict keys alone, so it needs no model code: a checkpoint of ours or one from
the official VirTex model zoo (``{"model": {"visual.cnn.<resnet>": ...}}``), a DDP-wrapped one
(``module.`` prefix), a ``{"state_dict": ...}`` wrapper or a plain torchvision ResNet state dict.
The ResNet is found through its ``layer1.0.conv1.weight`` key; its depth comes from the number
of blocks per stage and the block type, its groups and widths from the first block's shapes. The
converted file records them (:attr:`ConvertedBackbone.metadata`): what ``MODEL.RESNETS`` must say,
checked at conversion and before a fine-tuning run.

Renaming (torchvision -> detectron2): ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layerN.i`` -> ``res{N+1}.i``, ``bnK`` -> ``convK.norm``, ``downsample.0``/``downsample.1`` ->
``shortcut``/``shortcut.norm``. BatchNorm affine parameters and running statistics are all
kept, for SyncBN fine-tuning; the classifier (``fc``) is dropped.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from pretrain.errors import InputError

ANCHOR_KEY = "layer1.0.conv1.weight"
BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")

# (block type, blocks per stage) -> depth, for the standard torchvision ResNets.
RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

_BN = "(?P<field>" + "|".join(BN_FIELDS) + ")"
_BLOCK = r"layer(?P<stage>[1-4])\.(?P<block>\d+)\."
_RULES = [
    (re.compile(r"conv1\.weight"), lambda m: "stem.conv1.weight"),
    (re.compile(r"bn1\." + _BN), lambda m: f"stem.conv1.norm.{m['field']}"),
    (re.compile(_BLOCK + r"conv(?P<k>[1-3])\.weight"), lambda m: f"{_res(m)}.conv{m['k']}.weight"),
    (re.compile(_BLOCK + r"bn(?P<k>[1-3])\." + _BN), lambda m: f"{_res(m)}.conv{m['k']}.norm.{m['field']}"),
    (re.compile(_BLOCK + r"downsample\.0\.weight"), lambda m: f"{_res(m)}.shortcut.weight"),
    (re.compile(_BLOCK + r"downsample\.1\." + _BN), lambda m: f"{_res(m)}.shortcut.norm.{m['field']}"),
]


def _res(match) -> str:
    return f"res{int(match['stage']) + 1}.{match['block']}"


class ConversionError(InputError, ValueError):
    """The input is not a convertible ResNet checkpoint."""


@dataclass
class ConvertedBackbone:
    """detectron2-named ResNet weights and what was learned about the source."""

    state_dict: OrderedDict[str, torch.Tensor]
    depth: int
    block: str  # "bottleneck" or "basic"
    blocks_per_stage: tuple
    source_prefix: str  # e.g. "visual.cnn." or "module.visual.cnn." or ""
    widths: dict = field(default_factory=dict)  # record field -> value, from the tensor shapes (_widths)
    dropped_keys: list = field(default_factory=list)  # classifier keys under the prefix
    ignored_keys: int = 0  # keys outside the ResNet (e.g. the textual head)
    filled_batch_counters: int = 0  # BN layers without num_batches_tracked in the source

    @property
    def metadata(self) -> dict:
        """What ``MODEL.RESNETS`` must say to hold these weights, as recorded in the converted
        file and compared with the config at conversion and before a fine-tuning run."""
        bottleneck = {"stride_in_1x1": False} if self.block == "bottleneck" else {}  # torchvision strides in the 3x3
        return {"backbone": "resnet", "depth": self.depth, "block": self.block, **self.widths, **bottleneck}


def extract_state_dict(checkpoint) -> dict:
    """The model state dict inside a loaded checkpoint (``model``/``state_dict`` or itself)."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def anchor_prefixes(state_dict: dict, anchor: str) -> list[str]:
    """The prefixes (sorted; ``""`` for top-level keys) of the keys that are ``anchor`` or end
    with ``"." + anchor``: where the backbones that this key identifies live in a state dict."""
    return sorted(k[: -len(anchor)] for k in state_dict if isinstance(k, str) and (k == anchor or k.endswith("." + anchor)))


def find_resnet_prefix(state_dict: dict) -> str:
    """The key prefix under which a torchvision ResNet lives (``""`` for a plain one)."""
    prefixes = anchor_prefixes(state_dict, ANCHOR_KEY)
    if not prefixes:
        sample = ", ".join(list(map(str, state_dict))[:5]) or "no keys"
        raise ConversionError(
            f"no torchvision ResNet found: no key ends with '{ANCHOR_KEY}' (keys start with: {sample})"
        )
    if len(prefixes) > 1:
        raise ConversionError(f"several ResNets found, under prefixes {prefixes}; expected exactly one")
    return prefixes[0]


def rename_key(name: str) -> str | None:
    """The detectron2 name of a torchvision ResNet key, or None if it is not a backbone key."""
    for pattern, make in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return make(match)
    return None


_D2_BLOCK = re.compile(r"res(?P<stage>[2-5])\.(?P<block>\d+)\.(?P<rest>.+)")


def _architecture(names) -> tuple[str, tuple, int]:
    """(block type, blocks per stage, depth) from detectron2 ResNet key names."""
    blocks = {stage: set() for stage in range(2, 6)}
    has_conv3 = False
    for name in names:
        match = _D2_BLOCK.fullmatch(name)
        if match:
            blocks[int(match["stage"])].add(int(match["block"]))
            has_conv3 |= match["rest"] == "conv3.weight"
    for stage, indices in blocks.items():
        if not indices or indices != set(range(len(indices))):
            raise ConversionError(
                f"layer{stage - 1} has blocks {sorted(indices)}; expected 0..n-1 with n >= 1"
            )
    block = "bottleneck" if has_conv3 else "basic"
    counts = tuple(len(blocks[s]) for s in range(2, 6))
    depth = RESNET_DEPTHS.get((block, counts))
    if depth is None:
        known = ", ".join(f"ResNet-{d}: {b} {c}" for (b, c), d in RESNET_DEPTHS.items())
        raise ConversionError(f"unknown ResNet layout: {block} blocks {counts} per stage (known: {known})")
    return block, counts, depth


def _shape(converted: dict, key: str) -> tuple:
    """The shape of the converted tensor ``key`` (ConversionError if it is missing)."""
    if key not in converted:
        raise ConversionError(f"'{key}' is missing: every torchvision ResNet has it")
    return tuple(converted[key].shape)


def _widths(converted: dict, block: str) -> dict:
    """The ``MODEL.RESNETS`` widths that detectron2 must build for these tensors, by record field.

    The depth does not fix them: torchvision's wide_resnet50_2 is a ResNet-50 with bottlenecks
    twice as wide (WIDTH_PER_GROUP 128), ResNeXts group the 3x3 convolution (NUM_GROUPS). Basic
    blocks have no bottleneck, and detectron2 builds them ungrouped.
    """
    widths = {"stem_out_channels": _shape(converted, "stem.conv1.weight")[0]}
    if block == "basic":
        return {**widths, "res2_out_channels": _shape(converted, "res2.0.conv2.weight")[0], "num_groups": 1}
    bottleneck = _shape(converted, "res2.0.conv1.weight")[0]
    groups = bottleneck // _shape(converted, "res2.0.conv2.weight")[1]  # (out, in / groups, 3, 3)
    return {**widths, "res2_out_channels": _shape(converted, "res2.0.conv3.weight")[0],
            "num_groups": groups, "width_per_group": bottleneck // groups}


def _check_norms(converted: dict) -> int:
    """Require complete BatchNorm layers; add missing ``num_batches_tracked`` counters as 0.

    Old torchvision files lack the counter; torch's own BatchNorm loading treats it the same way.
    Returns how many counters were added.
    """
    norms = {k.rsplit(".", 1)[0] for k in converted if ".norm." in k}
    filled = 0
    for norm in sorted(norms):
        missing = [f for f in BN_FIELDS[:4] if f"{norm}.{f}" not in converted]
        if missing:
            raise ConversionError(
                f"BatchNorm '{norm}' lacks {missing}: the source must hold BN affine parameters and "
                f"running statistics"
            )
        if f"{norm}.num_batches_tracked" not in converted:
            converted[f"{norm}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
            filled += 1
    return filled


def convert_resnet_state_dict(checkpoint) -> ConvertedBackbone:
    """Convert a loaded checkpoint (any of the accepted layouts) to detectron2 ResNet weights."""
    state_dict = extract_state_dict(checkpoint)
    prefix = find_resnet_prefix(state_dict)
    converted, dropped, ignored = OrderedDict(), [], 0
    for key, value in state_dict.items():
        if not (isinstance(key, str) and key.startswith(prefix)):
            ignored += 1
            continue
        name = key[len(prefix):]
        if name in CLASSIFIER_KEYS:
            dropped.append(key)
            continue
        new_name = rename_key(name)
        if new_name is None:
            raise ConversionError(f"'{key}' is not a key of a torchvision ResNet")
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"'{key}' holds a {type(value).__name__}, not a tensor")
        # clone: a view would make torch.save write the whole storage it belongs to
        converted[new_name] = value.detach().clone().contiguous()
    block, counts, depth = _architecture(converted)
    filled = _check_norms(converted)
    return ConvertedBackbone(converted, depth, block, counts, prefix, _widths(converted, block), dropped, ignored, filled)


def to_detectron2_checkpoint(backbone: ConvertedBackbone, source: str) -> dict:
    """The dict that detectron2's checkpointer loads, with name-matching heuristics enabled.

    ``matching_heuristics`` lets detectron2 place ``res2.0.conv1.weight`` at
    ``backbone.bottom_up.res2...`` (FPN) or ``res5.*`` at ``roi_heads.res5.*`` (C4).
    """
    return {
        "model": backbone.state_dict,
        "__author__": "virtex-d2 tools/convert_backbone.py",
        "matching_heuristics": True,
        "conversion": {"source": str(source), "source_prefix": backbone.source_prefix, **backbone.metadata},
    }
