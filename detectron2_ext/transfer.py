"""Checkpoint -> detectron2 backbone weights, verified: the library side of tools/convert_backbone.py.

A ResNet becomes detectron2 ResNet weights (:mod:`.convert`, :mod:`.verify`); a ViT (found by its
``patch_embed.proj.weight``) becomes exact ``backbone.net.*`` keys of ViTDet's ``ViT``
(:mod:`.vit_convert`, :mod:`.vit_verify`).

The output is a ``.pth`` of tensors that ``torch.load(weights_only=True)`` reads and that
detectron2's ``DetectionCheckpointer`` accepts as ``MODEL.WEIGHTS``. detectron2 also reads
``.pkl`` files, but only with plain pickle (arbitrary code on load), so that format is refused.
The file is written under a temporary name, verified against every target config, and only
then renamed to the output path: a failed check leaves nothing behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from pretrain.checkpoint_io import read_checkpoint, save_checkpoint
from pretrain.errors import OutputExistsError
from pretrain.models.vit import requested_vit, vit_num_heads

from .convert import (
    ConversionError,
    ConvertedBackbone,
    convert_resnet_state_dict,
    extract_state_dict,
    to_detectron2_checkpoint,
)
from .verify import verify_target
from .vit_convert import (
    ConvertedViT,
    convert_vit_state_dict,
    describe_vit,
    find_vit_prefix,
    to_detectron2_vit_checkpoint,
)
from .vit_verify import verify_vit_target


def check_output_path(output, force: bool) -> Path:
    """The output path, after refusing ``.pkl`` and other suffixes and existing files without force."""
    output = Path(output)
    if output.suffix == ".pkl":
        raise ConversionError(
            f"{output}: write a .pth instead: detectron2 reads .pkl weights with plain pickle, which "
            f"can run arbitrary code, while a .pth of tensors loads with torch.load(weights_only=True) "
            f"and is accepted by DetectionCheckpointer and MODEL.WEIGHTS alike"
        )
    if output.suffix != ".pth":
        raise ConversionError(f"{output}: the output must be a .pth file")
    if output.exists() and not force:
        raise OutputExistsError(f"{output}: already exists; pass --force to overwrite it")
    return output


def convert_checkpoint_file(input_path, output_path, targets, force=False, allow_unsafe_pickle=False,
                            resnet_prefix: str | None = None):
    """Convert ``input_path`` into verified detectron2 weights at ``output_path``.

    ``targets`` is a list of ``(name, cfg)``: the detectron2 configs the weights must load
    into. Returns ``(ConvertedBackbone, [TargetCheck, ...])``.
    """
    check_output_path(output_path, force)
    state = read_checkpoint(input_path, allow_unsafe_pickle)
    return convert_weights(state, str(input_path), output_path, targets, force, resnet_prefix=resnet_prefix)


def holds_vit(state) -> bool:
    """Whether a loaded checkpoint (any accepted layout) holds a ViT rather than a ResNet."""
    try:
        return find_vit_prefix(extract_state_dict(state)) is not None
    except ConversionError:  # several ViTs: convert_weights names them
        return True


def pretraining_vit_arch(state) -> str | None:
    """The timm ViT that a pretraining checkpoint of ours was made with (its saved config's
    MODEL.VISUAL.NAME), or None for any other file."""
    text = state.get("config") if isinstance(state, dict) else None
    if not isinstance(text, str):
        return None
    try:
        name = yaml.safe_load(text)["MODEL"]["VISUAL"]["NAME"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return requested_vit(name) if isinstance(name, str) else None


def convert_weights(state, source: str, output_path, targets, force=False, vit_arch: str | None = None,
                    resnet_prefix: str | None = None):
    """:func:`convert_checkpoint_file` for weights already in memory (``source`` names them in
    errors and in the output's ``__author__``), e.g. a freshly initialised ResNet. A ViT's head
    count, which its weights do not show, is recorded from ``vit_arch`` (timm's name) or from the
    pretraining config the checkpoint holds, where either is known. ``resnet_prefix`` chooses the
    ResNet of a file that holds several the converter cannot tell apart."""
    output = check_output_path(output_path, force)
    if not targets:
        raise ConversionError("no target config to verify the converted weights against")
    try:
        state_dict = extract_state_dict(state)
        vit_prefix = find_vit_prefix(state_dict)
        if vit_prefix is None:
            backbone: ConvertedBackbone | ConvertedViT = convert_resnet_state_dict(state, resnet_prefix)
            checkpoint, verify = to_detectron2_checkpoint(backbone, Path(source).name), verify_target
        elif resnet_prefix is not None:
            raise ConversionError(f"a ResNet prefix was chosen ({resnet_prefix!r}), but the file holds a ViT")
        else:
            backbone = convert_vit_state_dict(state_dict, vit_prefix)
            arch = vit_arch or pretraining_vit_arch(state)
            backbone.num_heads = vit_num_heads(arch) if arch else None
            checkpoint, verify = to_detectron2_vit_checkpoint(backbone, Path(source).name), verify_vit_target
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    staging = output.with_name(f".{output.name}.unverified")
    save_checkpoint(checkpoint, staging, force=True)
    try:
        checks = [verify(cfg, backbone, staging, name) for name, cfg in targets]
        if output.exists() and not force:  # appeared while we were verifying
            raise OutputExistsError(f"{output}: already exists; pass --force to overwrite it")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return backbone, checks


def key_groups(keys, prefix: str) -> dict:
    """``keys`` grouped by the module where they part from ``prefix``: the components they share
    with it and one more (beside ``module.encoder_q.``, ``module.encoder_k.conv1.weight`` goes to
    ``module.encoder_k`` and ``module.queue`` to itself), in the order first seen."""
    shared = prefix.split(".")[:-1]
    groups: dict = {}
    for key in map(str, keys):
        parts = key.split(".")
        depth = 0
        while depth < min(len(shared), len(parts) - 1) and parts[depth] == shared[depth]:
            depth += 1
        groups.setdefault(".".join(parts[: depth + 1]), []).append(key)
    return groups


def describe_keys(keys, prefix: str, shown: int = 6) -> str:
    """``keys`` in a few words: each module of :func:`key_groups` with its count (a lone key by name)."""
    groups = [found[0] if len(found) == 1 else f"{group}.* ({len(found)} keys)"
              for group, found in key_groups(keys, prefix).items()]
    more = f" and {len(groups) - shown} more" if len(groups) > shown else ""
    return ", ".join(groups[:shown]) + more


def describe(backbone: ConvertedBackbone | ConvertedViT, source) -> str:
    """One-line summary of what a conversion took from the source checkpoint: which ResNet (the
    entry and key prefix, and the other ResNets passed over, with why) and which keys it dropped."""
    if isinstance(backbone, ConvertedViT):
        return describe_vit(backbone, source)
    norms = sum(1 for k in backbone.state_dict if k.endswith(".norm.running_mean"))
    prefix = f"'{backbone.source_prefix}*'" if backbone.source_prefix else "top-level keys"
    entry = f"the '{backbone.source_entry}' entry of " if backbone.source_entry else ""
    text = (
        f"ResNet-{backbone.depth} ({backbone.block} blocks {'-'.join(map(str, backbone.blocks_per_stage))}) "
        f"from {prefix} of {entry}{source}: {len(backbone.state_dict)} tensors, {norms} BatchNorm layers with "
        f"affine parameters and running statistics"
    )
    if backbone.passed_over:
        text += "; not converted: " + ", ".join(f"{what} ({why})" for what, why in backbone.passed_over.items())
    if backbone.dropped_keys:
        text += f"; dropped the head: {describe_keys(backbone.dropped_keys, backbone.source_prefix)}"
    if backbone.ignored_keys:
        text += (f"; left out {len(backbone.ignored_keys)} keys outside the ResNet: "
                 f"{describe_keys(backbone.ignored_keys, backbone.source_prefix)}")
    if backbone.filled_batch_counters:
        text += f"; {backbone.filled_batch_counters} BN layers had no num_batches_tracked (set to 0)"
    return text
