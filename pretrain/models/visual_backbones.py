"""Visual backbones: torchvision ResNets that return their last convolutional feature map
(the ViTs, which return their patch tokens in the same (B, C, h, w) layout, are in :mod:`.vit`).

The module path ``visual.cnn.<torchvision name>`` is what official VirTex checkpoints use, so
the ResNet lives in a submodule named ``cnn`` and keeps torchvision's parameter names.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torchvision
from torch import nn

from pretrain.errors import BadValueError, MissingInputError

#: torchvision constructors accepted after the ``torchvision::`` prefix of MODEL.VISUAL.NAME.
SUPPORTED_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")


def parse_library_name(name: str, library: str, supported: tuple[str, ...], error: type[Exception] = BadValueError,
                       other: str = "") -> str:
    """``"LIBRARY::ARCH"`` -> ``"ARCH"`` when ARCH is ``supported``; ``error`` naming
    ``MODEL.VISUAL.NAME`` (and ``other``, another accepted form) for anything else."""
    prefix, sep, arch = name.partition("::")
    if prefix != library or not sep or arch not in supported:
        raise error(
            f"MODEL.VISUAL.NAME '{name}' is not supported; use '{library}::<arch>' with "
            f"<arch> one of {', '.join(supported)}{other}"
        )
    return arch


def parse_visual_name(name: str) -> str:
    """``"torchvision::resnet50"`` -> ``"resnet50"``; anything else raises :class:`BadValueError`."""
    return parse_library_name(name, "torchvision", SUPPORTED_RESNETS,
                              other=" (or 'timm::<vit>', see pretrain.models.vit)")


#: torchvision's ImageNet weights of the ResNets: V1 is what official VirTex's ``pretrained=True``
#: loads (torchvision's only weights in 2020); V2 is torchvision's newer recipe.
IMAGENET_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")


def initial_resnet_state(arch: str, seed: int, zero_init_residual: bool = True) -> dict[str, torch.Tensor]:
    """The weights a randomly initialised pretraining backbone starts from: torchvision's
    ``arch`` built under ``torch.manual_seed(seed)`` with ``zero_init_residual`` (True, as the
    official random-init baseline of the paper, which converts this very network)."""
    if arch not in SUPPORTED_RESNETS:
        raise ValueError(f"unsupported ResNet '{arch}'; choose one of {SUPPORTED_RESNETS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cnn = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    return cnn.state_dict()


def check_torchvision_weights_file(path: str, arch: str, weights: str) -> None:
    """``ValueError`` unless ``path`` holds torchvision's ``weights`` of ``arch`` (a local copy of
    the file torchvision would download): its SHA-256 must begin with the hash in that file's name."""
    try:
        url = torchvision.models.get_model_weights(arch)[weights].url
    except KeyError:
        raise BadValueError(f"torchvision has no {weights} weights for {arch}") from None
    expected = url.rsplit("-", 1)[-1].split(".")[0]
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: file not found (expected torchvision's {weights} weights of {arch})")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(expected):
        raise BadValueError(
            f"{path}: not torchvision's {weights} weights of {arch} (expected the file {url.rsplit('/', 1)[-1]}, "
            f"whose SHA-256 begins with {expected}; this file's begins with {digest.hexdigest()[:8]})"
        )


class VisualBackbone(nn.Module):
    """What every visual backbone shares: its width must be ``MODEL.VISUAL.FEATURE_SIZE`` (the
    textual head is built for it), and ``frozen`` turns gradients off and keeps the network in
    eval mode even when the parent model is put in train mode."""

    def _set_up(self, network: nn.Module, arch: str, width: int, visual_feature_size: int, frozen: bool) -> None:
        if width != visual_feature_size:
            raise BadValueError(
                f"MODEL.VISUAL.FEATURE_SIZE is {visual_feature_size} but {arch} produces {width} channels"
            )
        self.visual_feature_size = visual_feature_size
        self.frozen = frozen
        if frozen:
            network.requires_grad_(False)
            network.eval()

    def train(self, mode: bool = True) -> VisualBackbone:
        """Switch train/eval mode; a frozen backbone always stays in eval mode."""
        return super().train(mode and not self.frozen)


class TorchvisionVisualBackbone(VisualBackbone):
    """A torchvision ResNet without its classifier, returning the stride-32 feature map.

    Built from scratch with torchvision's initialisation, by default with
    ``zero_init_residual=True`` (the last BatchNorm of every residual block starts at zero, as in
    official VirTex), unless ``pretrained`` asks for torchvision's ImageNet weights:
    ``pretrained_weights`` ``IMAGENET1K_V1`` (76.1 % top-1 for ResNet-50) is what the official
    ``pretrained=True`` loads; ``IMAGENET1K_V2`` (80.9 %, a newer recipe) is an explicit opt-in. Short runs
    should pass ``zero_init_residual=False``: in a few hundred steps those BatchNorm weights grow
    only to about 0.01-0.04, so the residual branches stay shut and the network that is
    transferred is little more than its stem and shortcuts.

    ``fc`` becomes an ``Identity`` so that no ``cnn.fc.*`` keys exist and the average pool is
    never applied: ``forward`` maps (B, 3, H, W) images to (B, feature_size, H/32, W/32).

    ``frozen=True`` turns gradients off and keeps the network in eval mode (BatchNorm uses its
    running statistics) even when the parent model is put in train mode.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        visual_feature_size: int = 2048,
        pretrained: bool = False,
        frozen: bool = False,
        zero_init_residual: bool = True,
        pretrained_weights: str = "IMAGENET1K_V1",
    ):
        super().__init__()
        if arch not in SUPPORTED_RESNETS:
            raise ValueError(f"unsupported ResNet '{arch}'; choose one of {SUPPORTED_RESNETS}")
        if pretrained_weights not in IMAGENET_WEIGHTS:
            raise BadValueError(
                f"MODEL.VISUAL.PRETRAINED_WEIGHTS '{pretrained_weights}' is not one of {', '.join(IMAGENET_WEIGHTS)}"
            )
        constructor = getattr(torchvision.models, arch)
        self.cnn = constructor(weights=pretrained_weights if pretrained else None, zero_init_residual=zero_init_residual)
        self._set_up(self.cnn, arch, self.cnn.fc.in_features, visual_feature_size, frozen)
        self.cnn.fc = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, C, H/32, W/32) layer4 features (any memory format)."""
        cnn = self.cnn
        x = cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(images))))
        return cnn.layer4(cnn.layer3(cnn.layer2(cnn.layer1(x))))
