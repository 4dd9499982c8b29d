"""Caption-aware image transforms, built from the config's lists of official names.

Every step maps ``(image, caption) -> (image, caption)``. Only the horizontal flip reads the
caption: a mirrored image must say "right" where the original said "left". All other steps
wrap a ``torchvision.transforms.v2`` transform and pass the caption through. Randomness comes
from torch's global RNG, which the DataLoader seeds differently in every worker, so a run is
reproducible from ``RANDOM_SEED``.

Names (``DATA.IMAGE_TRANSFORM_TRAIN`` / ``_VAL``), with the official parameters; ``size`` is
``DATA.IMAGE_CROP_SIZE``:

* ``random_resized_crop``: crop of 20-100 % of the area, aspect ratio 3/4-4/3, resized to
  ``size`` x ``size``;
* ``horizontal_flip``: p = 0.5, swapping the words "left" and "right" in the caption;
* ``color_jitter``: brightness, contrast, saturation 0.4, hue 0.1, applied with p = 0.8;
* ``normalize``: to float in [0, 1], then ImageNet mean and std;
* ``smallest_resize``: shorter side resized to ``size``, aspect ratio kept;
* ``center_crop``: central ``size`` x ``size`` crop;
* ``global_resize``: resized to ``size`` x ``size``, aspect ratio not kept.

A name may carry its own size after ``@``: ``smallest_resize@256`` resizes the shorter side to
256 whatever ``DATA.IMAGE_CROP_SIZE`` is (the official captioning evaluation: 256, then a
central crop of 224).

Deliberate difference from the official code: the official flip replaces the substrings
"left"/"right" anywhere, turning "bright" into "bleft" and "leftover" into "rightover". Here
only whole words are swapped, in any letter case ("Left" -> "Right").
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pretrain.errors import BadValueError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Swap the whole words "left" and "right", keeping their letter case; "bright" is untouched."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(swap, caption)


class ImageOnly:
    """Applies an image transform and passes the caption through unchanged."""

    def __init__(self, transform: Callable[[Any], Any]):
        self.transform = transform

    def __call__(self, image: Any, caption: str) -> tuple[Any, str]:
        return self.transform(image), caption

    def __repr__(self) -> str:
        return f"ImageOnly({self.transform!r})"


class HorizontalFlipWithCaption:
    """Mirrors the image with probability ``p`` and then swaps "left"/"right" in the caption."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Any, caption: str) -> tuple[Any, str]:
        if torch.rand(()) < self.p:
            return F.horizontal_flip(image), swap_left_right(caption)
        return image, caption

    def __repr__(self) -> str:
        return f"HorizontalFlipWithCaption(p={self.p})"


class CaptionCompose:
    """Runs ``(image, caption)`` through the steps in order, then makes the image a float tensor.

    The input image is a PIL image or a CHW tensor; the output is a plain float32 CHW tensor
    (scaled to [0, 1] first if no ``normalize`` step did it already).
    """

    def __init__(self, steps: Sequence[Callable[[Any, str], tuple[Any, str]]]):
        self.steps = list(steps)
        self._to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])

    def __call__(self, image: Any, caption: str) -> tuple[torch.Tensor, str]:
        for step in self.steps:
            image, caption = step(image, caption)
        return self._to_float(image), caption

    def __repr__(self) -> str:
        return "CaptionCompose(\n" + "".join(f"  {step!r},\n" for step in self.steps) + ")"


TRANSFORMS: dict[str, Callable[[int], Callable[[Any, str], tuple[Any, str]]]] = {
    "random_resized_crop": lambda size: ImageOnly(
        v2.RandomResizedCrop((size, size), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
    ),
    "horizontal_flip": lambda size: HorizontalFlipWithCaption(p=0.5),
    "color_jitter": lambda size: ImageOnly(
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8)
    ),
    "normalize": lambda size: ImageOnly(
        v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ),
    "smallest_resize": lambda size: ImageOnly(v2.Resize(size, antialias=True)),
    "center_crop": lambda size: ImageOnly(v2.CenterCrop(size)),
    "global_resize": lambda size: ImageOnly(v2.Resize((size, size), antialias=True)),
}
"""Official transform name -> factory taking ``DATA.IMAGE_CROP_SIZE``."""


def make_transform(names: Sequence[str], size: int, source: str = "transform list") -> CaptionCompose:
    """The pipeline for ``names`` (official transform names, in order) at crop size ``size``.

    Unknown names raise ``ValueError`` naming ``source`` (e.g. the config key) and the name.
    """
    parsed = [(name, *name.partition("@")[::2]) for name in names]
    unknown = [name for name, base, own_size in parsed if base not in TRANSFORMS or not (own_size or "0").isdigit()]
    if unknown:
        raise BadValueError(f"{source}: unknown image transform(s) {unknown}; known: {sorted(TRANSFORMS)}, "
                            "each optionally with @<size>")
    return CaptionCompose([TRANSFORMS[base](int(own_size) if own_size else size) for _, base, own_size in parsed])


#: transforms that make every image the same square size, and the one that fixes the shorter side
SQUARE_OUTPUT = ("random_resized_crop", "global_resize", "center_crop")
SHORTER_SIDE = "smallest_resize"


def output_size(names: Sequence[str], size: int) -> tuple[int | None, str | None]:
    """The square side of the images a transform list (known names) ends with, None when it
    varies with the input; and a description of a centre crop larger than the image it crops
    (torchvision pads it with black borders), None when there is none."""
    side, shorter, padded = None, None, None
    for name in names:
        base, _, own = name.partition("@")
        step = int(own) if own else size
        if base == SHORTER_SIDE:
            side, shorter = None, step
        elif base in SQUARE_OUTPUT:
            smaller = side if side is not None else shorter
            if base == "center_crop" and smaller is not None and step > smaller and padded is None:
                padded = f"{name} ({step} px) crops an image resized to {smaller} px: the rest is black borders"
            side, shorter = step, None
    return side, padded


def build_transform(cfg, split: str) -> CaptionCompose:
    """The pipeline for ``split`` ("train" or "val") from ``DATA.IMAGE_TRANSFORM_TRAIN/VAL``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    key = "IMAGE_TRANSFORM_TRAIN" if split == "train" else "IMAGE_TRANSFORM_VAL"
    return make_transform(cfg.DATA[key], cfg.DATA.IMAGE_CROP_SIZE, source=f"DATA.{key}")
