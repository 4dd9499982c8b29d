"""Checks that a dataset root (``DETECTRON2_DATASETS``) has what a dataset name needs.

detectron2 and the COCO/LVIS tools fail deep inside their loaders on a missing or broken
file; checking first gives the user the file's path and what is wrong with it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.errors import InputError

# Files each layout needs, relative to the dataset root.
REQUIRED_FILES = {
    "coco_captions": ["coco/annotations/captions_train2017.json", "coco/annotations/captions_val2017.json"],
    "coco": ["coco/annotations/instances_train2017.json", "coco/annotations/instances_val2017.json"],
    "lvis": ["lvis/lvis_v1_train.json", "lvis/lvis_v1_val.json"],
    "voc2007": ["VOC2007/ImageSets/Main/trainval.txt", "VOC2007/ImageSets/Main/test.txt"],
    "voc2012": ["VOC2012/ImageSets/Main/trainval.txt"],
}
REQUIRED_FOLDERS = {
    "coco_captions": ["coco/train2017", "coco/val2017"],
    "coco": ["coco/train2017", "coco/val2017"],
    "lvis": ["coco/train2017", "coco/val2017"],
    "voc2007": ["VOC2007/Annotations", "VOC2007/JPEGImages"],
    "voc2012": ["VOC2012/Annotations", "VOC2012/JPEGImages"],
}
_JSON_KEYS = ("images", "annotations")


class DatasetLayoutError(InputError, FileNotFoundError):
    """A dataset root that lacks a file or holds a malformed one."""


def load_json(path: str | os.PathLike) -> dict:
    """Parse an annotation JSON file; errors name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DatasetLayoutError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not isinstance(data, dict) or any(k not in data for k in _JSON_KEYS):
        raise DatasetLayoutError(f"{path}: expected a JSON object with keys {list(_JSON_KEYS)}")
    return data


def check_dataset_root(root: str | os.PathLike, layouts: tuple[str, ...] = tuple(REQUIRED_FILES)) -> None:
    """Raise :class:`DatasetLayoutError` naming the first missing or malformed file under ``root``."""
    root = Path(root)
    for layout in layouts:
        if layout not in REQUIRED_FILES:
            raise ValueError(f"unknown layout {layout!r}; choose from {sorted(REQUIRED_FILES)}")
        for folder in REQUIRED_FOLDERS[layout]:
            if not (root / folder).is_dir():
                raise DatasetLayoutError(f"{root / folder}: folder not found (needed for {layout})")
        for name in REQUIRED_FILES[layout]:
            path = root / name
            if path.suffix == ".json":
                load_json(path)
            elif not path.is_file():
                raise DatasetLayoutError(f"{path}: file not found (needed for {layout})")
            elif path.stat().st_size == 0:
                raise DatasetLayoutError(f"{path}: empty split file")
