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


def _arc(cx: float, cy: float, r: float, start: float, stop: float, n: int) -> list[tuple[float, float]]:
    """``n`` points on a circle from angle ``start`` to ``stop`` (radians; y grows down)."""
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(start, stop, n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        r = 0.5 if i % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + math.pi * i / points
        out.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return out


def _scalloped(lobes: int, depth: float) -> list[tuple[float, float]]:
    return [(0.5 + (0.5 - depth + depth * math.cos(lobes * a)) * math.cos(a),
             0.5 + (0.5 - depth + depth * math.cos(lobes * a)) * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 8 * lobes, endpoint=False)]


def _crescent() -> list[tuple[float, float]]:
    """A moon opening to the right: the unit disc less a disc shifted right."""
    inner_c, inner_r = 0.75, 0.42
    cut = math.acos((0.25 + (inner_c - 0.5) ** 2 - inner_r ** 2) / (2 * 0.5 * (inner_c - 0.5)))  # outer angle of the tips
    tip = math.atan2(0.5 * math.sin(cut), 0.5 + 0.5 * math.cos(cut) - inner_c)  # the same tip seen from the inner centre
    return _arc(0.5, 0.5, 0.5, cut, 2 * math.pi - cut, 24) + _arc(inner_c, 0.5, inner_r, 2 * math.pi - tip, tip, 16)


def _wheeled_box() -> list[tuple[float, float]]:
    """A box on two wheels (half discs below its floor)."""
    return ([(0.0, 0.05), (1.0, 0.05), (1.0, 0.72)] + _arc(0.78, 0.72, 0.14, 0.0, math.pi, 9)
            + _arc(0.22, 0.72, 0.14, 0.0, math.pi, 9) + [(0.0, 0.72)])


# One silhouette per class (VOC order), as a simple polygon in the unit square (y grows down).
# They are told apart by their outline, not their proportions: objects are stretched by up to
# 15 % either way, and images resized and flipped (a flipped silhouette is no other class's).
SILHOUETTES = {
    "aeroplane": [(0.0, 0.4), (0.4, 0.4), (0.45, 0.0), (0.6, 0.0), (0.6, 0.4), (1.0, 0.4), (1.0, 0.6),
                  (0.6, 0.6), (0.6, 1.0), (0.45, 1.0), (0.4, 0.6), (0.0, 0.6)],
    "bicycle": [(0.0, 0.0), (1.0, 0.0), (0.6, 0.5), (1.0, 1.0), (0.0, 1.0), (0.4, 0.5)],
    "bird": [(0.0, 0.0), (0.5, 0.55), (1.0, 0.0), (1.0, 0.45), (0.5, 1.0), (0.0, 0.45)],
    "boat": [(0.45, 0.0), (0.9, 0.6), (1.0, 0.6), (0.8, 1.0), (0.2, 1.0), (0.0, 0.6), (0.45, 0.6)],
    "bottle": [(0.35, 0.0), (0.65, 0.0), (0.65, 0.3), (1.0, 0.45), (1.0, 1.0), (0.0, 1.0), (0.0, 0.45), (0.35, 0.3)],
    "bus": _wheeled_box(),
    "car": [(0.0, 0.5), (0.25, 0.5), (0.35, 0.1), (0.7, 0.1), (0.8, 0.5), (1.0, 0.5), (1.0, 0.9), (0.0, 0.9)],
    "cat": [(0.0, 0.0), (0.3, 0.3), (0.7, 0.3), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "chair": [(0.0, 0.0), (0.35, 0.0), (0.35, 0.6), (1.0, 0.6), (1.0, 1.0), (0.0, 1.0)],
    "cow": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.85, 1.0), (0.85, 0.55), (0.7, 0.55), (0.7, 1.0), (0.58, 1.0),
            (0.58, 0.55), (0.42, 0.55), (0.42, 1.0), (0.3, 1.0), (0.3, 0.55), (0.15, 0.55), (0.15, 1.0), (0.0, 1.0)],
    "diningtable": [(0.0, 0.0), (1.0, 0.0), (1.0, 0.3), (0.62, 0.3), (0.62, 1.0), (0.38, 1.0), (0.38, 0.3), (0.0, 0.3)],
    "dog": _crescent(),
    "horse": [(0.3, 0.0), (1.0, 0.0), (0.7, 1.0), (0.0, 1.0)],
    "motorbike": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "person": [(0.5 + 0.3 * math.cos(a), 0.5 + 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)],
    "pottedplant": _star(5, 0.45),
    "sheep": _scalloped(6, 0.12),
    "sofa": [(0.0, 0.0), (0.25, 0.0), (0.25, 0.55), (0.75, 0.55), (0.75, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "train": [(0.0, 0.2), (0.65, 0.2), (0.65, 0.0), (1.0, 0.5), (0.65, 1.0), (0.65, 0.8), (0.0, 0.8)],
    "tvmonitor": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
}


# Each class also has its own markings, as a zebra has stripes: a pattern over its silhouette in
# a darker shade of its colour (lighter on black), laid out in the object's own box so that it scales with it. Two
# classes share a pattern only where their outlines differ most; a horizontal flip maps every
# pattern onto itself (the diagonal stripes run both ways), so flipping keeps the class.
MARKINGS = {
    "aeroplane": "none", "bicycle": "hstripes", "bird": "dots", "boat": "vstripes", "bottle": "checks",
    "bus": "grid", "car": "spot", "cat": "diagonal", "chair": "dots", "cow": "spot",
    "diningtable": "checks", "dog": "hstripes", "horse": "grid", "motorbike": "vstripes", "person": "none",
    "pottedplant": "diagonal", "sheep": "grid", "sofa": "spot", "train": "hstripes", "tvmonitor": "dots",
}


def _marking(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where ``pattern`` is dark, at box coordinates ``u``, ``v`` in [0, 1]."""
    if pattern == "hstripes":
        return np.floor(v * 7) % 2 == 0
    if pattern == "vstripes":
        return np.floor(u * 7) % 2 == 0
    if pattern == "diagonal":
        return (np.floor((u + v) * 5) % 2 == 0) & (np.floor((u - v) * 5) % 2 == 0)
    if pattern == "checks":
        return (np.floor(u * 4) + np.floor(v * 4)) % 2 == 0
    if pattern == "dots":
        return ((u * 4) % 1 - 0.5) ** 2 + ((v * 4) % 1 - 0.5) ** 2 < 0.06
    if pattern == "grid":
        return ((u * 4) % 1 < 0.3) | ((v * 4) % 1 < 0.3)
    if pattern == "spot":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.05
    return np.zeros_like(u, dtype=bool)


def _draw_markings(image: Image.Image, full: np.ndarray, box: tuple[float, float, float, float],
                   pattern: str, colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:full.shape[0], 0:full.shape[1]]
    dark = full & _marking(pattern, (xx + 0.5 - x0) / (x1 - x0), (yy + 0.5 - y0) / (y1 - y0))
    if dark.any():
        dark_colour = sum(colour) < 150  # markings in a lighter shade, where a darker one would not show
        shade = tuple(int(c + (255 - c) * 0.4) if dark_colour else int(c * 0.5) for c in colour)
        image.paste(shade, mask=Image.fromarray(dark.astype(np.uint8) * 255))


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


# How many classes of the 20 fall in each LVIS tier, and their weights relative to the most
# frequent class. With the default 4000 training images of 1-3 objects, a rare class is drawn
# about 7 times (LVIS: 1-10 training images), a common one 45-90 times (11-100) and a frequent
# one 300-900 times: a long tail with every tier present, but a head of fourteen classes, so that
# no class word is a safe guess for every image and most classes can be learnt in the budget.
TIERS = (("frequent", 14, 1.0, 0.35), ("common", 4, 0.1, 0.05), ("rare", 2, 0.008, 0.008))


def class_weights(num_classes: int, seed: int) -> np.ndarray:
    """The long-tailed training distribution of the classes (which class gets which weight
    is fixed per seed): fourteen frequent classes, four common and two rare (:data:`TIERS`)."""
    if num_classes != sum(count for _, count, _, _ in TIERS):
        raise ValueError(f"the tiers describe {sum(c for _, c, _, _ in TIERS)} classes, not {num_classes}")
    order = np.random.RandomState(seed).permutation(num_classes)
    weights = np.empty(num_classes)
    weights[order] = np.concatenate([np.geomspace(high, low, count) for _, count, high, low in TIERS])
    return weights / weights.sum()


def flattened(weights: np.ndarray, power: float = 0.25) -> np.ndarray:
    """A flatter version of ``weights`` for the val split: every tier gets enough val objects
    to be measured (about 10 per rare class in 300 images), still in the training order."""
    flat = weights ** power
    return flat / flat.sum()


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


def rasterise(polygon: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """The pixels a polygon covers in a ``width`` x ``height`` image, as a boolean mask."""
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
                 max_objects: int = 3, max_hidden: float = 0.25) -> Scene:
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
        size = short * rng.uniform(0.28, 0.55)
        aspect = rng.uniform(0.87, 1.15)
        w, h = size * aspect, size / aspect
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        polygon = [(x0 + u * w, y0 + v * h) for u, v in SILHOUETTES[WORLD_CLASSES[cls].voc_name]]
        full = rasterise(polygon, width, height)
        if full.sum() < 64:
            continue
        if any(_spoils(o.mask, full, max_hidden) for o in objects):
            continue
        colour = list(COLOURS)[rng.randint(len(COLOURS))]
        for o in objects:
            o.mask &= ~full
        draw.polygon(polygon, fill=COLOURS[colour])
        _draw_markings(image, full, (x0, y0, x0 + w, y0 + h), MARKINGS[WORLD_CLASSES[cls].voc_name], COLOURS[colour])
        draw.polygon(polygon, outline=(10, 10, 10))
        objects.append(SceneObject(cls, colour, (x0, y0, x0 + w, y0 + h), polygon, full))
    return Scene(image, background, bg_colour, objects)
