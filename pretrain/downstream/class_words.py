"""Which object classes a caption names, and how well generated captions name what is there.

The paper's claim is that the words of a caption name the objects of the image; this module
measures that of a captioner: for each val image, whether its caption names a class that is in
the image and whether it names one that is not, and per class the precision and recall of its
words. A class is named by its COCO category name or, in the built-in world, by any word its
captions use for it ("plane", "kitten", "woman"), singular or plural, matched as whole words,
longest phrase first ("dining table" is one mention, not also a "table").
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pretrain.data.dataset_root import load_json
from pretrain.data.synthetic.categories import WORLD_CLASSES
from pretrain.errors import BadValueError


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def class_vocabulary(instances_json: str | os.PathLike) -> dict[int, str]:
    """Every phrase that names a category of ``instances_json``, mapped to its category id.

    Only categories with at least one instance in the file count: one it lists but never
    annotates is no class of that data (the built-in world lists all 80 COCO categories for
    their ids and draws 20), and its name would catch other words, such as the colour "orange".
    """
    data = load_json(instances_json)
    world = {c.coco_id: c for c in WORLD_CLASSES}
    annotated = {annotation["category_id"] for annotation in data["annotations"]}
    phrases: dict[int, str] = {}
    for category in (c for c in data["categories"] if c["id"] in annotated):
        name = category["name"].lower()
        words = {name, _plural(name)}
        if category["id"] in world:
            words |= set(world[category["id"]].words) | set(world[category["id"]].plurals)
        phrases.update({word: category["id"] for word in words})
    return phrases


def named_classes(caption: str, vocabulary: Mapping[str, int]) -> set[int]:
    """The category ids whose phrases occur in ``caption`` as whole words."""
    text = f" {' '.join(re.findall(r'[a-z]+', caption.lower()))} "
    found = set()
    for phrase in sorted(vocabulary, key=len, reverse=True):
        if f" {phrase} " in text:
            found.add(vocabulary[phrase])
            text = text.replace(f" {phrase} ", " | ")
    return found


def present_classes(instances_json: str | os.PathLike) -> dict[int, set[int]]:
    """The category ids of the instances of each image of ``instances_json`` (images without
    any instance map to an empty set)."""
    data = load_json(instances_json)
    present: dict[int, set[int]] = {image["id"]: set() for image in data["images"]}
    for annotation in data["annotations"]:
        present[annotation["image_id"]].add(annotation["category_id"])
    return present


@dataclass
class ClassWords:
    """How one class's words were used in the captions of a split."""

    name: str
    named: int  # images whose caption names the class
    present: int  # images that show it
    named_and_present: int

    @property
    def precision(self) -> float | None:
        return self.named_and_present / self.named if self.named else None

    @property
    def recall(self) -> float | None:
        return self.named_and_present / self.present if self.present else None


def class_naming(captions: Mapping[int, str], present: Mapping[int, set[int]], vocabulary: Mapping[str, int],
                 names: Mapping[int, str]) -> dict:
    """Over the captioned images: the share whose caption names a class the image shows
    (``names_present``), the share whose caption names a class it does not show
    (``names_absent``), and per class (``names``: category id to name) precision and recall."""
    per_class = {cid: ClassWords(name, 0, 0, 0) for cid, name in names.items()}
    hits = misses = 0
    for image_id, caption in captions.items():
        said, shown = named_classes(caption, vocabulary), present[image_id]
        hits += bool(said & shown)
        misses += bool(said - shown)
        for cid in said | shown:
            entry = per_class[cid]
            entry.named += cid in said
            entry.present += cid in shown
            entry.named_and_present += cid in said and cid in shown
    total = max(len(captions), 1)
    return {
        "images": len(captions),
        "names_present": hits / total,
        "names_absent": misses / total,
        "per_class": {c.name: {"precision": c.precision, "recall": c.recall, "named": c.named, "present": c.present}
                      for c in per_class.values() if c.named or c.present},
    }


def category_names(instances_json: str | os.PathLike) -> dict[int, str]:
    """Category id to name, as ``instances_json`` lists them."""
    return {c["id"]: c["name"] for c in load_json(instances_json)["categories"]}


def evaluate_class_naming(captions: Mapping[int, str], instances_json: str | os.PathLike) -> dict:
    """:func:`class_naming` of ``captions`` against the instances of ``instances_json``."""
    present = present_classes(instances_json)
    unknown = sorted(set(captions) - set(present))
    if unknown:
        raise BadValueError(f"{instances_json}: lists no image {unknown[0]} (of {len(unknown)} captioned images "
                            "it does not list); give the instances file of the captioned split")
    return class_naming(captions, present, class_vocabulary(instances_json), category_names(instances_json))
