"""Convert the ResNet of a torchvision-style state dict into detectron2 backbone weights.

Works from state-dict keys alone, so it needs no model code. The state dict is the checkpoint's
``model``, ``state_dict`` or ``teacher`` entry (DINO's training checkpoint: its evaluation reads
the teacher, never the ``student``), or the checkpoint itself. The ResNet is found through its
``layer1.0.conv1.weight`` key, under any prefix. Accepted, as each project's own transfer reads
them: ours and the official VirTex model zoo (``visual.cnn.``), a DDP wrapper (``module.``),
torchvision and timm ResNets, the released DINO, Barlow Twins, DenseCL and MMSelfSup backbones,
SwAV's release (its ``projection_head`` and ``prototypes`` dropped), PyTorch Lightning
(``model.``), and training checkpoints that hold a momentum copy beside the encoder that is
transferred: MoCo v1/v2 ``encoder_q`` (not ``encoder_k``), MoCo v3 ``base_encoder`` (not
``momentum_encoder``), MMSelfSup ``backbone`` (not ``encoder_k.module.0`` nor BYOL's
``target_net``). The same tensors registered twice (DenseCL's ``backbone`` is ``encoder_q.0``)
are one ResNet. Any other file with several ResNets is refused, naming them: the caller chooses
one by its prefix (``tools/convert_backbone.py --backbone-prefix``).

The depth comes from the number of blocks per stage and the block type, the groups and widths
from the first block's shapes. The converted file records them (:attr:`ConvertedBackbone.metadata`):
what ``MODEL.RESNETS`` must say, checked at conversion and before a fine-tuning run.

Renaming (torchvision -> detectron2): ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layerN.i`` -> ``res{N+1}.i``, ``bnK`` -> ``convK.norm``, ``downsample.0``/``downsample.1`` ->
``shortcut``/``shortcut.norm``. BatchNorm affine parameters and running statistics are all
kept, for SyncBN fine-tuning; the heads under the ResNet's prefix (``fc``: torchvision's
classifier or the projection MLP MoCo puts in its place; SwAV's ``projection_head`` and
``prototypes``) are dropped, and every key outside the ResNet is left out, all named in the summary.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from pretrain.errors import InputError

ANCHOR_KEY = "layer1.0.conv1.weight"
BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# First components of the keys under a ResNet's prefix that are heads, not backbone: torchvision's
# classifier and the projection MLP that MoCo v1-v3 put in its place (fc), SwAV's projection head
# and prototypes. Dropped; any other unknown key is refused.
HEAD_MODULES = ("fc", "projection_head", "prototypes")
# Entries of a checkpoint dict that hold the state dict, in the order they are looked for: a
# wrapper around the one model, or one network chosen among several (DINO's training checkpoint
# holds a "student" and a "teacher"; its evaluation reads the teacher).
WRAPPER_ENTRIES = ("model", "state_dict")
CHOSEN_ENTRIES = ("teacher",)
STATE_DICT_ENTRIES = WRAPPER_ENTRIES + CHOSEN_ENTRIES
PASSED_OVER_ENTRIES = {"student": "DINO's student; its evaluation reads the teacher"}
# Prefix components that name the momentum copy a method keeps beside the encoder it transfers.
MOMENTUM_COPIES = {
    "encoder_k": "the key encoder of MoCo v1/v2, DenseCL and MMSelfSup, a momentum copy of the query encoder",
    "momentum_encoder": "MoCo v3's momentum copy of base_encoder",
    "target_net": "MMSelfSup BYOL's target network, a momentum copy of backbone",
}

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
    dropped_keys: list = field(default_factory=list)  # head keys under the prefix (HEAD_MODULES)
    ignored_keys: list = field(default_factory=list)  # keys outside the ResNet (e.g. the textual head)
    filled_batch_counters: int = 0  # BN layers without num_batches_tracked in the source
    source_entry: str | None = None  # the checkpoint entry holding the state dict (STATE_DICT_ENTRIES)
    passed_over: dict = field(default_factory=dict)  # other ResNets / entries in the file -> why not these

    @property
    def metadata(self) -> dict:
        """What ``MODEL.RESNETS`` must say to hold these weights, as recorded in the converted
        file and compared with the config at conversion and before a fine-tuning run."""
        bottleneck = {"stride_in_1x1": False} if self.block == "bottleneck" else {}  # torchvision strides in the 3x3
        return {"backbone": "resnet", "depth": self.depth, "block": self.block, **self.widths, **bottleneck}


def state_dict_entry(checkpoint) -> str | None:
    """The entry of a loaded checkpoint that holds its state dict (STATE_DICT_ENTRIES), or None
    when the checkpoint is a state dict itself."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    return next((key for key in STATE_DICT_ENTRIES if isinstance(checkpoint.get(key), dict)), None)


def extract_state_dict(checkpoint) -> dict:
    """The model state dict inside a loaded checkpoint (``model``/``state_dict``/``teacher`` or itself)."""
    entry = state_dict_entry(checkpoint)
    return checkpoint if entry is None else checkpoint[entry]


def anchor_prefixes(state_dict: dict, anchor: str) -> list[str]:
    """The prefixes (sorted; ``""`` for top-level keys) of the keys that are ``anchor`` or end
    with ``"." + anchor``: where the backbones that this key identifies live in a state dict."""
    return sorted(k[: -len(anchor)] for k in state_dict if isinstance(k, str) and (k == anchor or k.endswith("." + anchor)))


@dataclass
class ResNetSource:
    """Where the ResNet to convert is in a loaded checkpoint, found the same way by the converter
    and by train_net's check of ``MODEL.WEIGHTS``."""

    entry: str | None  # the checkpoint entry holding the state dict, None for the checkpoint itself
    candidates: list  # every prefix with a ResNet anchor key
    prefix: str | None  # the one to convert; None when there is none or it cannot be known
    passed_over: dict = field(default_factory=dict)  # "'prefix*'" or "the 'entry' entry" -> why not it
    first_keys: str = ""  # the state dict's first keys, to name in an error

    def require(self) -> str:
        """The prefix to convert, or a ConversionError saying why there is none."""
        if self.prefix is not None:
            return self.prefix
        if not self.candidates:
            raise ConversionError(
                f"no torchvision ResNet found: no key ends with '{ANCHOR_KEY}' (keys start with: {self.first_keys})"
            )
        named = " and ".join(f"'{p}*'" for p in self.candidates)
        raise ConversionError(
            f"several ResNets found, under {named}, and none is a momentum copy this converter knows "
            f"({', '.join(MOMENTUM_COPIES)}) or the same tensors as another: choose the one to convert with "
            f"--backbone-prefix {self.candidates[0]!r} (or another of those prefixes)"
        )


def _same_tensors(state_dict: dict, prefix: str, other: str) -> bool:
    """Whether two prefixes hold the same ResNet: one module registered under two names (DenseCL's
    ``backbone`` is its ``encoder_q.0``), same keys, equal tensors."""
    mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    theirs = {k[len(other):]: v for k, v in state_dict.items() if k.startswith(other)}
    names = {n for n in mine if rename_key(n)}
    return names == {n for n in theirs if rename_key(n)} and all(
        isinstance(mine[n], torch.Tensor) and isinstance(theirs[n], torch.Tensor) and mine[n].shape == theirs[n].shape
        and (mine[n] is theirs[n] or torch.equal(mine[n], theirs[n])) for n in names)


def _momentum_copy(prefix: str) -> str | None:
    """Why the ResNet under ``prefix`` is a momentum copy (MOMENTUM_COPIES), or None."""
    return next((MOMENTUM_COPIES[c] for c in prefix.split(".") if c in MOMENTUM_COPIES), None)


def choose_resnet(state_dict: dict, candidates: list) -> tuple[str | None, dict]:
    """The prefix of the ResNet a project transfers among ``candidates``, and why each other one
    is not it: momentum copies go first, then names of the same tensors (the shortest name stays,
    ``backbone`` before others, as MMSelfSup's extraction takes it). None when several remain."""
    copies = {p: _momentum_copy(p) for p in candidates if _momentum_copy(p)}
    remaining = [p for p in candidates if p not in copies]
    if not remaining:  # only copies: none of them is known to be the one transferred
        remaining, copies = list(candidates), {}
    passed = {f"'{p}*'": why for p, why in copies.items()}
    if len(remaining) > 1 and all(_same_tensors(state_dict, remaining[0], p) for p in remaining[1:]):
        keep = min(remaining, key=lambda p: (not p.endswith("backbone."), len(p), p))
        passed.update({f"'{p}*'": f"the same tensors as '{keep}*'" for p in remaining if p != keep})
        remaining = [keep]
    return (remaining[0] if len(remaining) == 1 else None), passed


def locate_resnet(checkpoint, prefix: str | None = None) -> ResNetSource:
    """Where the ResNet to convert is in a loaded checkpoint: its entry and prefix (``prefix``
    when the caller chose one, which must be a ResNet's), and what else was passed over."""
    entry = state_dict_entry(checkpoint)
    state_dict = checkpoint if entry is None else checkpoint[entry]
    candidates = anchor_prefixes(state_dict, ANCHOR_KEY)
    if prefix is not None:
        if prefix not in candidates:
            raise ConversionError(f"no ResNet under the chosen prefix {prefix!r}; ResNets are under {candidates}")
        chosen, passed = prefix, {f"'{p}*'": "not the chosen prefix" for p in candidates if p != prefix}
    else:
        chosen, passed = choose_resnet(state_dict, candidates)
    if entry == "teacher":
        passed.update({f"the '{k}' entry": why for k, why in PASSED_OVER_ENTRIES.items() if k in checkpoint})
    first_keys = ", ".join(list(map(str, state_dict))[:5]) or "no keys"
    return ResNetSource(entry, candidates, chosen, passed, first_keys)


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


def _belongs_to(key, prefix: str, source: ResNetSource) -> bool:
    """Whether ``key`` is under ``prefix`` and not under another ResNet nested in it."""
    return isinstance(key, str) and key.startswith(prefix) and not any(
        len(other) > len(prefix) and key.startswith(other) for other in source.candidates)


def convert_resnet_state_dict(checkpoint, prefix: str | None = None) -> ConvertedBackbone:
    """Convert a loaded checkpoint (any of the accepted layouts) to detectron2 ResNet weights;
    ``prefix`` chooses the ResNet where the file holds several that :func:`locate_resnet` cannot
    tell apart."""
    source = locate_resnet(checkpoint, prefix)
    prefix = source.require()
    state_dict = extract_state_dict(checkpoint)
    converted, dropped, ignored = OrderedDict(), [], []
    for key, value in state_dict.items():
        if not _belongs_to(key, prefix, source):
            ignored.append(key)
            continue
        name = key[len(prefix):]
        if name.split(".")[0] in HEAD_MODULES:
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
    return ConvertedBackbone(converted, depth, block, counts, prefix, _widths(converted, block), dropped, ignored,
                             filled, source.entry, source.passed_over)


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
