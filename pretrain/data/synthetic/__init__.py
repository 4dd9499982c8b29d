"""The built-in dataset: seeded synthetic scenes written as COCO 2017, LVIS v1 and VOC 2007/2012.

Real COCO, LVIS and VOC take days to fetch and train on; this world of simple silhouettes
lets a user (and the tests) run the whole pipeline in minutes with the real file formats and
the real category ids, under one root usable as ``DETECTRON2_DATASETS``. It is made to be
learnable within the demo's budget (each class its own outline and markings) while keeping
LVIS's long tail: the training split draws classes from :func:`~.scenes.class_weights`, the
val split from a flatter version of it, so that val holds enough objects of every tier.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.errors import BadValueError, OutputExistsError
from pretrain.files import write_json_atomic

from .annotations import object_annotation
from .captions import write_captions
from .categories import VOC_CLASSES, WORLD_CLASSES
from .formats import GeneratedImage, write_coco, write_lvis, write_voc
from .scenes import class_weights, flattened, sample_scene

__all__ = ["MANIFEST_NAME", "VOC_CLASSES", "WORLD_CLASSES", "is_complete", "make_synthetic_dataset", "read_manifest"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "builtin_dataset.json"
# Raised whenever the same parameters would give other files (version 2: "an" before vowels in
# the captions; version 3: the learnable world of docs/demo.md, with distinct silhouettes,
# markings, three LVIS tiers and a val split that holds every tier), so that a dataset written
# by older code is not kept as complete.
FORMAT_VERSION = 3
_OUTPUTS = ("coco", "lvis", "VOC2007", "VOC2012", MANIFEST_NAME)
_ASPECTS = ((4, 3), (3, 4), (1, 1))  # width:height, varied like photos
_VAL_ID_OFFSET = 1_000_000  # COCO image ids are unique across splits


def _render_split(root: Path, split: str, count: int, image_size: int, seed: int,
                  weights: np.ndarray) -> list[GeneratedImage]:
    folder = root / "coco" / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    first_id = 1 if split == "train" else _VAL_ID_OFFSET + 1
    records = []
    for k in tqdm(range(count), desc=f"built-in {split} images", unit="img", leave=False):
        image_id = first_id + k
        # One generator per image: image k does not depend on how many images are made.
        rng = np.random.RandomState([seed, 0 if split == "train" else 1, k])
        aw, ah = _ASPECTS[rng.randint(len(_ASPECTS))]
        scale = image_size / max(aw, ah)
        width, height = round(aw * scale), round(ah * scale)
        scene = sample_scene(rng, width, height, weights)
        objects = []
        for obj in scene.objects:
            ann = object_annotation(obj, height, width)
            if ann is not None:
                objects.append({"class_index": obj.class_index, **ann})
        path = folder / f"{image_id:012d}.jpg"
        scene.image.save(path, quality=92)
        records.append(GeneratedImage(image_id, split, path, width, height, write_captions(scene, rng), objects))
    return records


def _parameters(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"format_version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed}


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a complete built-in dataset under ``root``, or None if there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadValueError(f"{path}: malformed manifest ({err}); regenerate with --force") from None


def is_complete(root: str | os.PathLike, num_train: int = 1000, num_val: int = 100,
                image_size: int = 256, seed: int = 0) -> bool:
    """Whether ``root`` holds a complete built-in dataset made with exactly these parameters
    (what :func:`make_synthetic_dataset` keeps instead of rebuilding)."""
    manifest = read_manifest(root)
    return manifest is not None and manifest.get("parameters") == _parameters(num_train, num_val, image_size, seed)


def check_sizes(num_train: int, num_val: int) -> None:
    """``ValueError`` unless there are enough images for every split file of every format."""
    if num_train < 8 or num_val < 2:
        raise BadValueError(f"need at least 8 training and 2 validation images (got {num_train}, {num_val}): "
                            "VOC split files must list two or more images")


def make_synthetic_dataset(root: str | os.PathLike, num_train: int = 1000, num_val: int = 100,
                           image_size: int = 256, seed: int = 0, force: bool = False) -> dict:
    """Write the built-in dataset under ``root`` and return its manifest.

    A complete dataset with the same parameters is kept as it is (the manifest is written
    last, so an interrupted run is never mistaken for a complete one). Anything else already
    in the way is an error unless ``force`` is set, in which case the dataset is rebuilt.
    """
    check_sizes(num_train, num_val)
    if image_size < 64:
        raise BadValueError(f"image_size must be at least 64 pixels (got {image_size})")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise BadValueError(f"{root}: not a folder; give a folder (new or holding the built-in dataset) as the root")
    if not force and is_complete(root, num_train, num_val, image_size, seed):
        logger.info("built-in dataset at %s is complete; keeping it", root)
        return read_manifest(root)
    existing = read_manifest(root)
    in_the_way = [root / name for name in _OUTPUTS if (root / name).exists()]
    if in_the_way and not force:
        written_by = existing.get("parameters", {}).get("format_version") if existing else None
        if not existing:
            what = "files of an incomplete dataset"
        elif written_by != FORMAT_VERSION:
            what = f"a built-in dataset of format version {written_by} (this version writes {FORMAT_VERSION})"
        else:
            what = "a built-in dataset with other parameters"
        raise OutputExistsError(f"{root} already holds {what} ({', '.join(p.name for p in in_the_way)}); "
                                "pass force=True (--force) to replace it")
    for path in in_the_way:
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    weights = class_weights(len(WORLD_CLASSES), seed)
    train = _render_split(root, "train", num_train, image_size, seed, weights)
    val = _render_split(root, "val", num_val, image_size, seed, flattened(weights))
    write_coco(root, "train", train)
    write_coco(root, "val", val)
    frequencies = write_lvis(root, train, val)
    half = num_train // 2
    write_voc(root, "2007", {"train": train[:half // 2], "val": train[half // 2:half], "test": val}, "{:06d}")
    write_voc(root, "2012", {"train": train[half:half + (num_train - half) // 2],
                             "val": train[half + (num_train - half) // 2:]}, "2012_{:06d}")
    manifest = {"parameters": _parameters(num_train, num_val, image_size, seed), "images": {"train": num_train, "val": num_val},
                "instances": {"train": sum(len(r.objects) for r in train), "val": sum(len(r.objects) for r in val)},
                "lvis_frequency_groups": frequencies}
    write_json_atomic(root / MANIFEST_NAME, manifest)
    logger.info("built-in dataset written to %s: %s", root, manifest)
    return manifest
