"""Category tables of the built-in world.

detectron2's builtin dataset names carry fixed class tables (COCO's 80 thing classes with
their original ids, LVIS v1's 1203, VOC's 20 names), so the built-in dataset must use real
ids and names. Its objects are the 20 VOC classes, which exist in all three vocabularies;
each is drawn as its own simple silhouette.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pretrain.data.voc_classes import VOC_CLASSES

# (id, name, supercategory) of the 80 COCO thing categories; ids have gaps as in COCO.
COCO_CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"),
    (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"),
    (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]


@dataclass(frozen=True)
class WorldClass:
    """One object class of the built-in world and its identity in each format."""

    voc_name: str
    coco_id: int
    lvis_id: int
    words: tuple[str, ...]  # how captions name it (singular); the first is the usual word
    plurals: tuple[str, ...]  # plural of each entry of ``words``


# The 20 VOC classes in VOC's own order, with their COCO and LVIS v1 ids.
WORLD_CLASSES = (
    WorldClass("aeroplane", 5, 3, ("airplane", "plane"), ("airplanes", "planes")),
    WorldClass("bicycle", 2, 94, ("bicycle", "bike"), ("bicycles", "bikes")),
    WorldClass("bird", 16, 99, ("bird",), ("birds",)),
    WorldClass("boat", 9, 118, ("boat",), ("boats",)),
    WorldClass("bottle", 44, 133, ("bottle",), ("bottles",)),
    WorldClass("bus", 6, 173, ("bus",), ("buses",)),
    WorldClass("car", 3, 207, ("car",), ("cars",)),
    WorldClass("cat", 17, 225, ("cat", "kitten"), ("cats", "kittens")),
    WorldClass("chair", 62, 232, ("chair",), ("chairs",)),
    WorldClass("cow", 21, 80, ("cow",), ("cows",)),
    WorldClass("diningtable", 67, 367, ("table", "dining table"), ("tables", "dining tables")),
    WorldClass("dog", 18, 378, ("dog", "puppy"), ("dogs", "puppies")),
    WorldClass("horse", 19, 569, ("horse",), ("horses",)),
    WorldClass("motorbike", 4, 703, ("motorcycle", "motorbike"), ("motorcycles", "motorbikes")),
    WorldClass("person", 1, 793, ("person", "man", "woman"), ("people", "men", "women")),
    WorldClass("pottedplant", 64, 837, ("potted plant", "plant"), ("potted plants", "plants")),
    WorldClass("sheep", 20, 943, ("sheep",), ("sheep",)),
    WorldClass("sofa", 63, 982, ("couch", "sofa"), ("couches", "sofas")),
    WorldClass("train", 7, 1115, ("train",), ("trains",)),
    WorldClass("tvmonitor", 72, 1077, ("tv", "television"), ("tvs", "televisions")),
)

if tuple(c.voc_name for c in WORLD_CLASSES) != VOC_CLASSES:
    raise AssertionError("WORLD_CLASSES must list the VOC classes in the devkit's order")


@lru_cache(maxsize=1)
def lvis_v1_categories() -> list[dict]:
    """The 1203 LVIS v1 categories (id, name, synset, synonyms, def), sorted by id."""
    path = Path(__file__).with_name("lvis_v1_categories.json")
    return json.loads(path.read_text(encoding="utf-8"))
