"""Writers for the three on-disk formats: COCO 2017, LVIS v1 and PASCAL VOC 2007/2012.

Each writer takes the same per-image records and lays files out exactly where detectron2's
builtin datasets (and the official COCO, LVIS and VOC tools) look for them.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from pretrain.data.voc_classes import VOC_CLASSES
from pretrain.files import write_json_atomic, write_text_atomic

from .categories import (
    COCO_CATEGORIES,
    WORLD_CLASSES,
    lvis_v1_categories,
)


@dataclass
class GeneratedImage:
    """One generated image and everything known about it."""

    image_id: int
    split: str  # "train" or "val" (COCO 2017 split)
    path: Path  # the JPEG under coco/{split}2017/
    width: int
    height: int
    captions: list[str]
    objects: list[dict]  # {"class_index", "segmentation", "area", "bbox"}

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def coco_url(self) -> str:
        return f"http://images.cocodataset.org/{self.split}2017/{self.file_name}"


def _dump(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload, indent=None)


def _coco_image(rec: GeneratedImage) -> dict:
    return {"id": rec.image_id, "file_name": rec.file_name, "height": rec.height, "width": rec.width,
            "license": 1, "coco_url": rec.coco_url, "flickr_url": "", "date_captured": "2026-01-01 00:00:00"}


_INFO = {"description": "virtex-d2 built-in dataset (synthetic scenes)", "version": "1.0", "year": 2026,
         "contributor": "virtex-d2", "url": "", "date_created": "2026-01-01"}
_LICENSES = [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]


def write_coco(root: Path, split: str, records: list[GeneratedImage]) -> None:
    """``coco/annotations/{captions,instances}_{split}2017.json``."""
    images = [_coco_image(r) for r in records]
    captions, instances = [], []
    for r in records:
        for text in r.captions:
            captions.append({"id": len(captions) + 1, "image_id": r.image_id, "caption": text})
        for o in r.objects:
            instances.append({"id": len(instances) + 1, "image_id": r.image_id,
                              "category_id": WORLD_CLASSES[o["class_index"]].coco_id,
                              "segmentation": o["segmentation"], "area": o["area"], "bbox": o["bbox"],
                              "iscrowd": 0})
    common = {"info": _INFO, "licenses": _LICENSES, "images": images}
    _dump(root / "coco" / "annotations" / f"captions_{split}2017.json", {**common, "annotations": captions})
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]
    _dump(root / "coco" / "annotations" / f"instances_{split}2017.json",
          {**common, "annotations": instances, "categories": categories})


def lvis_frequency(image_count: int) -> str:
    """LVIS's frequency groups by the number of training images: rare 1-10, common 11-100."""
    return "r" if image_count <= 10 else "c" if image_count <= 100 else "f"


def write_lvis(root: Path, train: list[GeneratedImage], val: list[GeneratedImage]) -> dict[str, int]:
    """``lvis/lvis_v1_{train,val}.json`` over the COCO images; returns the frequency histogram.

    All 1203 categories are listed with their real ids; frequencies, image and instance counts
    come from the training split, as in LVIS. Categories absent from training are 'r' with a
    count of zero. ``neg_category_ids`` are world classes verified absent from the image.
    """
    image_count, instance_count = Counter(), Counter()
    for r in train:
        ids = [WORLD_CLASSES[o["class_index"]].lvis_id for o in r.objects]
        image_count.update(set(ids))
        instance_count.update(ids)
    categories = [{**c, "frequency": lvis_frequency(image_count[c["id"]]), "image_count": image_count[c["id"]],
                   "instance_count": instance_count[c["id"]]} for c in lvis_v1_categories()]
    world_ids = sorted(c.lvis_id for c in WORLD_CLASSES)
    for split, records in (("train", train), ("val", val)):
        images, annotations = [], []
        for r in records:
            present = {WORLD_CLASSES[o["class_index"]].lvis_id for o in r.objects}
            image = _coco_image(r)
            del image["file_name"]  # LVIS locates images through coco_url
            images.append({**image, "neg_category_ids": [i for i in world_ids if i not in present],
                           "not_exhaustive_category_ids": []})
            for o in r.objects:
                annotations.append({"id": len(annotations) + 1, "image_id": r.image_id,
                                    "category_id": WORLD_CLASSES[o["class_index"]].lvis_id,
                                    "segmentation": o["segmentation"], "area": o["area"], "bbox": o["bbox"]})
        _dump(root / "lvis" / f"lvis_v1_{split}.json",
              {"info": _INFO, "licenses": _LICENSES, "images": images, "annotations": annotations,
               "categories": categories})
    return dict(Counter(lvis_frequency(image_count[i]) for i in world_ids))


def _voc_xml(voc_id: str, year: str, rec: GeneratedImage) -> ET.Element:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = f"VOC{year}"
    ET.SubElement(ann, "filename").text = f"{voc_id}.jpg"
    source = ET.SubElement(ann, "source")
    ET.SubElement(source, "database").text = "virtex-d2 built-in dataset"
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", rec.width), ("height", rec.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for o in rec.objects:
        x, y, w, h = o["bbox"]
        # VOC boxes are 1-based inclusive pixel indices.
        xmin, ymin, xmax, ymax = int(x) + 1, int(y) + 1, round(x + w), round(y + h)
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[o["class_index"]]
        ET.SubElement(obj, "pose").text = "Unspecified"
        touches = xmin <= 1 or ymin <= 1 or xmax >= rec.width or ymax >= rec.height
        ET.SubElement(obj, "truncated").text = "1" if touches else "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(ann)
    return ann


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_voc(root: Path, year: str, splits: dict[str, list[GeneratedImage]], id_format: str) -> None:
    """``VOC{year}/`` with Annotations, JPEGImages and ImageSets/Main split and per-class files.

    ``splits`` maps split names (train, val, test) to records; ``trainval`` is written as
    train + val. Images are hard links to the COCO JPEGs where the file system allows.
    """
    base = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[tuple[str, GeneratedImage]]] = {}
    counter = 0
    for split in ("train", "val", "test"):
        ids[split] = []
        for rec in splits.get(split, []):
            counter += 1
            voc_id = id_format.format(counter)
            ET.ElementTree(_voc_xml(voc_id, year, rec)).write(base / "Annotations" / f"{voc_id}.xml")
            _link_or_copy(rec.path, base / "JPEGImages" / f"{voc_id}.jpg")
            ids[split].append((voc_id, rec))
    if ids["train"] or ids["val"]:
        ids["trainval"] = ids["train"] + ids["val"]
    main = base / "ImageSets" / "Main"
    for split, items in ids.items():
        if not items:
            continue
        write_text_atomic(main / f"{split}.txt", "".join(f"{i}\n" for i, _ in items))
        for k, name in enumerate(VOC_CLASSES):
            lines = [f"{i} {1 if any(o['class_index'] == k for o in r.objects) else -1:2d}\n" for i, r in items]
            write_text_atomic(main / f"{name}_{split}.txt", "".join(lines))
