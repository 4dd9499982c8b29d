"""Human-like captions for built-in scenes.

Five captions per image, each from a different template family and with varied wording:
object lists with colours and sizes, counts, left/right and above/below relations, and the
background. Left and right are image directions, so a horizontal flip that does not swap
them in the caption makes the caption wrong.
"""
from __future__ import annotations

import numpy as np

from .categories import WORLD_CLASSES
from .scenes import Scene, SceneObject

NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
PICTURE = ("picture", "photo", "image")
BACKGROUND_WORDS = {"plain": "", "gradient": "fading ", "stripes": "striped ", "checks": "checkered ", "noise": "noisy "}


def _word(obj: SceneObject, rng: np.random.RandomState) -> str:
    words = WORLD_CLASSES[obj.class_index].words
    return words[rng.randint(len(words))]


def _size_word(obj: SceneObject, scene: Scene) -> str:
    ratio = obj.size / min(scene.image.size)
    return "small" if ratio < 0.27 else "large" if ratio > 0.4 else ""


def _with_article(text: str) -> str:
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def _phrase(obj: SceneObject, scene: Scene, rng: np.random.RandomState, with_size: bool = True) -> str:
    size = _size_word(obj, scene) if with_size else ""
    return _with_article(" ".join(w for w in (size, obj.colour, _word(obj, rng)) if w))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _counts(scene: Scene) -> str:
    by_class: dict[int, int] = {}
    for o in scene.objects:
        by_class[o.class_index] = by_class.get(o.class_index, 0) + 1
    parts = []
    for cls, n in sorted(by_class.items(), key=lambda kv: -kv[1]):
        c = WORLD_CLASSES[cls]
        if n == 1:
            parts.append(_with_article(c.words[0]))
        else:
            parts.append(f"{NUMBERS[n]} {c.plurals[0]}")
    return _join(parts)


def _relation(a: SceneObject, b: SceneObject, scene: Scene, rng: np.random.RandomState) -> str:
    """How ``a`` sits relative to ``b``, in image directions."""
    (ax, ay), (bx, by) = a.centre, b.centre
    pa, pb = _phrase(a, scene, rng, with_size=False), _phrase(b, scene, rng, with_size=False)
    if abs(ax - bx) >= abs(ay - by):
        side = "left" if ax < bx else "right"
        form = rng.randint(3)
        if form == 0:
            return f"{pa} to the {side} of {pb}"
        if form == 1:
            return f"{pa} on the {side} side of {pb}"
        return f"{pa} is {side} of {pb}"
    return f"{pa} {'above' if ay < by else 'below'} {pb}"


def write_captions(scene: Scene, rng: np.random.RandomState) -> list[str]:
    """Five distinct captions of ``scene``."""
    objs = sorted(scene.objects, key=lambda o: o.centre[0])  # left to right
    pic = PICTURE[rng.randint(len(PICTURE))]
    bg = f"{scene.background_colour} {BACKGROUND_WORDS[scene.background]}background"
    listing = _join([_phrase(o, scene, rng) for o in objs])
    caps = [f"{_with_article(pic).capitalize()} of {listing} on {_with_article(bg)}."]
    n = len(objs)
    counts = _counts(scene)
    caps.append(f"There {'is' if counts.startswith('a') else 'are'} {counts} in this {pic}.")
    if n >= 2:
        i, j = rng.choice(n, size=2, replace=False)
        caps.append(_relation(objs[i], objs[j], scene, rng).capitalize() + ".")
        caps.append(f"On the left there is {_phrase(objs[0], scene, rng)}, and on the right {_phrase(objs[-1], scene, rng)}.")
        biggest = max(objs, key=lambda o: o.size)
        caps.append(f"The biggest thing here is {_phrase(biggest, scene, rng, with_size=False)}, with "
                    f"{_join([_phrase(o, scene, rng) for o in objs if o is not biggest])} nearby.")
    else:
        o = objs[0]
        x = o.centre[0] / scene.image.size[0]
        where = "on the left" if x < 0.4 else "on the right" if x > 0.6 else "in the middle"
        caps.append(f"{_phrase(o, scene, rng).capitalize()} {where} of the {pic}.")
        caps.append(f"Only one {o.colour} {_word(o, rng)} against {_with_article(bg)}.")
        caps.append(f"A single {_word(o, rng)} sits {where}, painted {o.colour}.")
    return caps
