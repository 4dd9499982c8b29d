"""Random scenes of the built-in world: objects drawn as silhouettes on varied backgrounds.

A scene is sampled from its own seeded generator, so image ``k`` of a split is the same
whatever the number of images asked for. Each object keeps the mask of the pixels it still
shows after the objects drawn over it, which is what COCO-style annotations describe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_fill_holes

from .categories import WORLD_CLASSES

COLOURS = {
    "red": (206, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 210, 40),
    "orange": (240, 140, 30), "purple": (130, 50, 170), "white": (245, 245, 245),
    "black": (25, 25, 25), "pink": (240, 130, 180), "brown": (120, 75, 40),
}
BACKGROUNDS = ("plain", "gradient", "stripes", "checks", "noise")


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(0.5 + 0.5 * math.cos(phase + 2 * math.pi * i / n), 0.5 + 0.5 * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        r = 0.5 if i % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + math.pi * i / points
        out.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return out


# One silhouette per class (VOC order), as a simple polygon in the unit square (y grows down).
SILHOUETTES = {
    "aeroplane": [(0.0, 0.4), (0.4, 0.4), (0.45, 0.0), (0.6, 0.0), (0.6, 0.4), (1.0, 0.4), (1.0, 0.6),
                  (0.6, 0.6), (0.6, 1.0), (0.45, 1.0), (0.4, 0.6), (0.0, 0.6)],
    "bicycle": [(0.0, 0.0), (1.0, 0.0), (0.6, 0.5), (1.0, 1.0), (0.0, 1.0), (0.4, 0.5)],
    "bird": [(0.0, 0.0), (0.5, 0.55), (1.0, 0.0), (1.0, 0.45), (0.5, 1.0), (0.0, 0.45)],
    "boat": [(0.0, 0.3), (1.0, 0.3), (0.8, 1.0), (0.2, 1.0)],
    "bottle": [(0.35, 0.0), (0.65, 0.0), (0.65, 0.3), (1.0, 0.45), (1.0, 1.0), (0.0, 1.0), (0.0, 0.45), (0.35, 0.3)],
    "bus": [(0.0, 0.15), (1.0, 0.15), (1.0, 0.85), (0.0, 0.85)],
    "car": [(0.0, 0.5), (0.25, 0.5), (0.35, 0.1), (0.7, 0.1), (0.8, 0.5), (1.0, 0.5), (1.0, 0.9), (0.0, 0.9)],
    "cat": [(0.0, 0.0), (0.3, 0.3), (0.7, 0.3), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "chair": [(0.0, 0.0), (0.35, 0.0), (0.35, 0.6), (1.0, 0.6), (1.0, 1.0), (0.0, 1.0)],
    "cow": _regular(8, math.pi / 8),
    "diningtable": [(0.0, 0.0), (1.0, 0.0), (1.0, 0.3), (0.62, 0.3), (0.62, 1.0), (0.38, 1.0), (0.38, 0.3), (0.0, 0.3)],
    "dog": _regular(6),
    "horse": [(0.3, 0.0), (1.0, 0.0), (0.7, 1.0), (0.0, 1.0)],
    "motorbike": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "person": [(0.5 + 0.3 * math.cos(a), 0.5 + 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)],
    "pottedplant": _star(5, 0.45),
    "sheep": _regular(32),
    "sofa": [(0.0, 0.0), (0.25, 0.0), (0.25, 0.55), (0.75, 0.55), (0.75, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "train": [(0.0, 0.2), (0.65, 0.2), (0.65, 0.0), (1.0, 0.5), (0.65, 1.0), (0.65, 0.8), (0.0, 0.8)],
    "tvmonitor": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
}


@dataclass
class SceneObject:
    """An object placed in a scene; ``mask`` holds the pixels it shows once the scene is drawn."""

    class_index: int  # index into WORLD_CLASSES
    colour: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the full silhouette
    polygon: list[tuple[float, float]]
    mask: np.ndarray = field(repr=False)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def size(self) -> float:
        x0, y0, x1, y1 = self.box
        return math.sqrt((x1 - x0) * (y1 - y0))


@dataclass
class Scene:
    image: Image.Image
    background: str
    background_colour: str
    objects: list[SceneObject]


def class_weights(num_classes: int, seed: int) -> np.ndarray:
    """A long-tailed class distribution (fixed per seed), so LVIS gets rare, common and frequent classes."""
    order = np.random.RandomState(seed).permutation(num_classes)
    weights = np.empty(num_classes)
    weights[order] = (1.0 / 80.0) ** (np.arange(num_classes) / (num_classes - 1))  # head/tail ratio 80
    return weights / weights.sum()


def _background(rng: np.random.RandomState, width: int, height: int) -> tuple[np.ndarray, str, str]:
    kind = BACKGROUNDS[rng.randint(len(BACKGROUNDS))]
    names = list(COLOURS)
    name = names[rng.randint(len(names))]
    base = np.array(COLOURS[name], dtype=np.float32) * 0.55 + 60  # muted, so objects stand out
    other = np.array(COLOURS[names[rng.randint(len(names))]], dtype=np.float32) * 0.55 + 60
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "plain":
        img = np.broadcast_to(base, (height, width, 3)).copy()
    elif kind == "gradient":
        t = (xx / max(width - 1, 1) if rng.rand() < 0.5 else yy / max(height - 1, 1))[..., None]
        img = base * (1 - t) + other * t
    elif kind == "stripes":
        period = rng.randint(8, 24)
        img = np.where(((xx + yy * rng.randint(0, 2)) // period % 2 == 0)[..., None], base, other)
    elif kind == "checks":
        period = rng.randint(10, 28)
        img = np.where(((xx // period + yy // period) % 2 == 0)[..., None], base, other)
    else:
        img = base + rng.normal(0, 25, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8), kind, name


def _rasterise(polygon: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _spoils(mask: np.ndarray, cover: np.ndarray, max_hidden: float) -> bool:
    """Whether drawing ``cover`` over ``mask`` hides too much of it or punches a hole in it
    (COCO polygons cannot describe holes)."""
    left = mask & ~cover
    return ((mask & cover).sum() > max_hidden * mask.sum() or left.sum() < 48
            or bool((binary_fill_holes(left) != left).any()))


def sample_scene(rng: np.random.RandomState, width: int, height: int, weights: np.ndarray,
                 max_objects: int = 4, max_hidden: float = 0.4) -> Scene:
    """Draw 1..max_objects objects; a new object may hide at most ``max_hidden`` of an earlier one."""
    pixels, background, bg_colour = _background(rng, width, height)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    objects: list[SceneObject] = []
    wanted = rng.randint(1, max_objects + 1)
    short = min(width, height)
    for _ in range(wanted * 6):  # a few tries per object to respect the occlusion bound
        if len(objects) == wanted:
            break
        cls = int(rng.choice(len(weights), p=weights))
        size = short * rng.uniform(0.18, 0.5)
        aspect = rng.uniform(0.75, 1.33)
        w, h = size * aspect, size / aspect
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        polygon = [(x0 + u * w, y0 + v * h) for u, v in SILHOUETTES[WORLD_CLASSES[cls].voc_name]]
        full = _rasterise(polygon, width, height)
        if full.sum() < 64:
            continue
        if any(_spoils(o.mask, full, max_hidden) for o in objects):
            continue
        colour = list(COLOURS)[rng.randint(len(COLOURS))]
        for o in objects:
            o.mask &= ~full
        draw.polygon(polygon, fill=COLOURS[colour], outline=(10, 10, 10))
        objects.append(SceneObject(cls, colour, (x0, y0, x0 + w, y0 + h), polygon, full))
    return Scene(image, background, bg_colour, objects)
