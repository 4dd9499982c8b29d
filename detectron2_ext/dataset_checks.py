"""The datasets of a detectron2 config, checked in the form training and evaluation read them,
before the first iteration.

Without these checks a defect surfaces late: a VOC file without ``<difficult>`` fails in the
evaluator after the whole fine-tuning, a polygon of two points is dropped by the loader with a
warning, an annotation of an image the file does not list is silently ignored, a category table
that is not detectron2's builtin one fails an assertion deep in the loader. :func:`check_datasets`
reads every dataset a run will train and evaluate on and raises one
:class:`~pretrain.errors.DatasetCheckError` listing what it found, each problem naming the
file, the key or field and what to do; it returns warnings (defaults applied).

Per format (chosen from the dataset's metadata: ``evaluator_type``, or VOC's ``dirname`` and
``split``, so datasets registered with ``register_coco_instances``/``register_pascal_voc`` are
checked too):

* VOC (:func:`check_voc_split`): the split's ``ImageSets/Main/<split>.txt`` (two or more ids, one
  per line: detectron2's ``np.loadtxt`` fails on one), each id's XML and JPEG, every field the
  loader and the evaluator read (:mod:`detectron2_ext.voc_annotations`, whose defaults for the
  optional fields also reach the evaluator), class names against the dataset's class list, box
  corners numeric, ordered and inside the image, ``<size>`` against the image file.
* COCO and LVIS JSON (:func:`check_instances_json`): categories against detectron2's builtin
  class table of the dataset name (COCO's 80 ids, LVIS v1's 1203), images (ids, sizes, the file
  present and of that size), annotations (unique ids, an existing image, a listed category,
  ``bbox`` inside the image, polygons of even length >= 6 or an RLE of the image's size, RLE
  objects only where ``INPUT.MASK_FORMAT`` is ``bitmask``, at least one object that is not a
  crowd region in a file that is trained on; ``area``, COCO's ``iscrowd`` and LVIS's per-image
  category lists where the dataset is evaluated). Every COCO-format file a run trains or
  evaluates on must give the same classes in order of id (:func:`check_same_classes`):
  detectron2 numbers each file's categories on its own.

Image files are checked from their headers (size, after EXIF orientation as detectron2's
``read_image`` applies it), not decoded: a header costs about 0.1 ms, so COCO train2017's 118K
images take seconds.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.lvis_v0_5_categories import (
    LVIS_CATEGORIES as LVIS_V0_5_CATEGORIES,
)
from detectron2.data.datasets.lvis_v1_categories import (
    LVIS_CATEGORIES as LVIS_V1_CATEGORIES,
)
from PIL import Image
from tqdm import tqdm

from pretrain.data.dataset_root import DatasetLayoutError, load_json
from pretrain.errors import CheckReport, is_machine_fault

from .datasets import check_dataset_files
from .voc_annotations import OPTIONAL_DEFAULTS, box_tolerance, read_voc_annotation

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def image_header(path: str | os.PathLike) -> tuple[tuple[int, int], str]:
    """``(width, height)`` of an image as detectron2's ``read_image`` returns it (EXIF
    orientation applied), and its PIL mode, read from the header only. Raises ``OSError`` for a
    non-image, or when the machine fails the read (:func:`~pretrain.errors.is_machine_fault`)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
            return (height, width), image.mode
        return (width, height), image.mode


class ImageFiles:
    """Presence (one listing per folder) and header size of the image files a dataset names."""

    def __init__(self, report: CheckReport):
        self.report = report
        self._listings: dict[str, set[str]] = {}

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._listings:
            self._listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in self._listings[folder]

    def check(self, expected: Iterable[tuple[str, int | None, int | None, str, str]], desc: str) -> None:
        """``expected``: (image path, width, height, what names the image, what gives its size)
        per image; a width and height of None check the file's presence only. A machine fault
        while a header is read (EIO, a stale NFS handle) is raised as it is: it is no fault of the
        file, which the report would tell the user to replace."""
        expected = list(expected)
        for path, width, height, named_by, source in tqdm(expected, desc=desc, unit="img", leave=False,
                                                          mininterval=1.0, disable=len(expected) < 2000):
            if not self.exists(path):
                self.report.problem(f"{path}: image file not found (named by {named_by}); add the image or "
                                    "remove its entry")
                continue
            if width is None or height is None:
                continue
            try:
                actual, mode = image_header(path)
            except OSError as err:
                if is_machine_fault(err):  # a disk or network file system error: the file may be fine
                    raise
                self.report.problem(f"{path}: not a readable image ({err}); replace the file")
                continue
            if mode.startswith("I;16"):
                self.report.problem(f"{path}: a 16-bit image, which detectron2 reads clipped to white; save it "
                                    "with 8 bits per channel")
            if actual != (width, height):
                upright = " upright (its EXIF orientation turns it, as detectron2 does)" if actual == (height, width) else ""
                self.report.problem(f"{path}: image is {actual[0]}x{actual[1]}{upright} but {source} says "
                                    f"{width}x{height} (detectron2 stops on the mismatch); correct the size")


# --- VOC ---------------------------------------------------------------------------------------


_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".xml")  # what a split id written as a file name ends with


def read_split_ids(split_file: Path, report: CheckReport) -> list[str]:
    """The ids of a VOC split file as detectron2's loader and evaluator both read them."""
    if not split_file.is_file():
        report.problem(f"{split_file}: split file not found; list the image ids of the split, one per line")
        return []
    ids, with_suffix = [], []
    text = split_file.read_text(encoding="utf-8", errors="replace")
    if text.startswith("\ufeff"):
        report.problem(f"{split_file}: starts with a byte-order mark, which detectron2 reads as part of the first "
                       "id; save the file without it (UTF-8 without BOM)")
        text = text[1:]
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if len(fields) != 1:
            what = "is blank" if not fields else f"has {len(fields)} fields"
            report.problem(f"{split_file}: line {number} {what}; write exactly one image id per line")
            continue
        if Path(fields[0]).suffix.lower() in _FILE_SUFFIXES:
            with_suffix.append(fields[0])
            continue
        ids.append(fields[0])
    if with_suffix:
        report.problem(f"{split_file}: {len(with_suffix)} ids are written as file names (e.g. {with_suffix[0]!r}); "
                       f"write the bare id ({Path(with_suffix[0]).stem!r}), from which the XML and JPEG names follow")
    if len(ids) == 1:
        report.problem(f"{split_file}: lists a single image id; detectron2's loader (np.loadtxt) needs two or more")
    elif not ids and split_file.stat().st_size == 0:
        report.problem(f"{split_file}: lists no image ids; a dataset needs images")
    return ids


def check_voc_split(dirname: str, split: str, class_names: Sequence[str], report: CheckReport,
                    defaulted: dict[str, set[str]]) -> int:
    """Check one VOC split into ``report``; records in ``defaulted`` the optional fields each
    annotation file lacks. Returns the number of images."""
    base = Path(dirname)
    split_file = base / "ImageSets" / "Main" / f"{split}.txt"
    ids = read_split_ids(split_file, report)
    files = ImageFiles(report)
    sizes = []
    for voc_id in ids:
        xml, jpeg = base / "Annotations" / f"{voc_id}.xml", base / "JPEGImages" / f"{voc_id}.jpg"
        if not files.exists(str(xml)):
            report.problem(f"{xml}: annotation file not found (id {voc_id} listed in {split_file}); add it or "
                           "remove the id from the split file")
            continue
        annotation = read_voc_annotation(xml, class_names)
        for problem in annotation.problems:
            report.problem(problem)
        if annotation.defaulted:
            defaulted[str(xml)] = annotation.defaulted
        sizes.append((str(jpeg), annotation.width, annotation.height, f"id {voc_id} of {split_file}", f"{xml} <size>"))
    files.check(sizes, f"checking {base.name} {split} images")
    return len(ids)


def defaults_warning(defaulted: dict[str, set[str]]) -> str | None:
    """One summary of the VOC files that lacked optional fields: how many, which fields."""
    if not defaulted:
        return None
    counts = Counter(tag for tags in defaulted.values() for tag in tags)
    fields = ", ".join(f"{tag} ({counts[tag]} files)" for tag in OPTIONAL_DEFAULTS if counts[tag])
    values = ", ".join(f"{tag} {value!r}" for tag, value in OPTIONAL_DEFAULTS.items())
    example = next(iter(defaulted))
    return (f"{len(defaulted)} VOC annotation files lack optional fields: {fields}, e.g. {example}; "
            f"training and evaluation use the VOC devkit's defaults ({values}); the files are left as they are")


# --- COCO and LVIS -----------------------------------------------------------------------------


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(value, lowest: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def builtin_class_table(dataset_name: str, lvis: bool) -> dict[int, set[str]] | None:
    """Category id -> the names detectron2's builtin tables accept for ``dataset_name`` (None:
    the JSON file defines the classes). COCO maps its ids through the metadata's
    ``thing_dataset_id_to_contiguous_id`` and names must match ``thing_classes``; LVIS takes class
    ``id - 1`` and its names are compared with the name and synonyms of detectron2's table of that
    LVIS version (the metadata's class names are the first synonyms, e.g. 'horned_cow' for 'bull')."""
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("thing_classes", None)
    if lvis and "cocofied" not in dataset_name and ("v1" in dataset_name or "v0.5" in dataset_name):
        categories = LVIS_V1_CATEGORIES if "v1" in dataset_name else LVIS_V0_5_CATEGORIES
        return {c["id"]: {c["name"], *c["synonyms"]} for c in categories}
    if classes is None:
        return None
    if lvis:
        return {index + 1: {name} for index, name in enumerate(classes)}
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    return None if id_map is None else {dataset_id: {classes[index]} for dataset_id, index in id_map.items()}


class _InstancesChecker:
    """One COCO or LVIS instances file, as detectron2's loader and evaluator read it."""

    def __init__(self, json_file: str, report: CheckReport, lvis: bool, evaluated: bool, need_masks: bool,
                 mask_format: str | None):
        self.json_file, self.report = json_file, report
        self.lvis, self.evaluated, self.need_masks = lvis, evaluated, need_masks
        self.mask_format = mask_format  # INPUT.MASK_FORMAT where the file's masks are trained, else None
        self.format = "LVIS" if lvis else "COCO"
        self.empty_boxes: list[str] = []  # where: annotations whose box has no area
        # LVIS, evaluated: image id -> (where, its neg_category_ids), and the categories annotated on it
        self.negatives: dict[int, tuple[str, set]] = {}
        self.annotated: dict[int, set] = {}

    def problem(self, where: str, what: str) -> None:
        self.report.problem(f"{self.json_file}: {where}: {what}")

    def categories(self, data: dict, table: dict[int, str] | None, dataset_name: str) -> dict[int, str]:
        """The listed categories (id -> name), checked against the builtin table of ``dataset_name``."""
        categories = data.get("categories")
        if not isinstance(categories, list) or not categories:
            self.problem("'categories'", "missing or empty; list the dataset's categories (id, name)")
            return set()
        names: dict[int, str] = {}
        # A dataset of one's own may number its classes from 0 (Roboflow does); detectron2 maps ids
        # to its own contiguous ones. Builtin tables and LVIS (class = id - 1) start at 1.
        lowest = 0 if table is None and not self.lvis else 1
        for i, category in enumerate(categories):
            if not (isinstance(category, dict) and _int_at_least(category.get("id"), lowest)
                    and isinstance(category.get("name"), str)):
                what = "a positive" if lowest else "a non-negative"
                self.problem(f"categories[{i}]", f"needs {what} integer 'id' and a string 'name'")
                continue
            if category["id"] in names:
                self.problem(f"categories[{i}]", f"id {category['id']} is listed twice; give each category one entry")
            names[category["id"]] = category["name"]
            if self.lvis and self.evaluated and category.get("frequency") not in ("r", "c", "f"):
                self.problem(f"categories[{i}] (id {category['id']}) 'frequency'",
                             "must be 'r', 'c' or 'f' (the LVIS evaluator groups AP by it)")
        if table is not None:
            self._against_table(names, table, dataset_name)
        return names

    def _against_table(self, names: dict[int, str], table: dict[int, set[str]], dataset_name: str) -> None:
        what = f"detectron2's builtin table of {dataset_name} ({len(table)} classes)"
        for category_id in sorted(set(names) - set(table)):
            self.problem(f"categories (id {category_id})", f"id {category_id} is not in {what}; use the "
                         f"{self.format} category ids, or name your own classes' dataset in VIRTEX.COCO_DATASETS")
        renamed = {i: name for i, name in names.items() if i in table and name not in table[i]}
        if not self.lvis:  # detectron2 sets thing_classes from the file: all 80, exactly as named
            for category_id, name in sorted(renamed.items()):
                self.problem(f"categories (id {category_id})", f"named {name!r} but {what} names it "
                             f"{min(table[category_id])!r}; use the COCO category table (own classes: "
                             "VIRTEX.COCO_DATASETS)")
            for category_id in sorted(set(table) - set(names)):
                self.problem(f"categories (id {category_id})", f"{min(table[category_id])!r} is missing; {what} "
                             "needs every category listed (annotating only some of them is fine)")
        elif len(renamed) > 0.1 * len(names):  # LVIS maps classes by id: many other names = another table
            for category_id, name in sorted(renamed.items()):
                self.problem(f"categories (id {category_id})", f"named {name!r} but {what} has "
                             f"{sorted(table[category_id])} at this id; use the LVIS category table of that version")
        elif renamed:
            category_id, name = next(iter(sorted(renamed.items())))
            self.report.warn(f"{self.json_file}: {len(renamed)} category names differ from {what}, e.g. id "
                             f"{category_id} {name!r} (table: {sorted(table[category_id])}); classes follow the ids")

    def entries(self, data: dict, key: str):
        """``(where, entry)`` for each entry of ``data[key]`` with an integer id; entries without
        one and ids used twice (detectron2 asserts unique annotation ids) are problems."""
        seen: set[int] = set()
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
                self.problem(f"{key}[{i}]", "needs an integer 'id'")
                continue
            where = f"{key}[{i}] (id {entry['id']})"
            if entry["id"] in seen:
                self.problem(where, "id used twice; give each entry its own id")
            seen.add(entry["id"])
            yield where, entry

    def images(self, data: dict, image_root: str, category_ids: set[int]) -> dict[int, tuple[int, int]]:
        """``{image id: (width, height)}``; also queues each file for the presence/size check and,
        for the LVIS evaluator, checks that the per-image category lists name listed categories."""
        sizes: dict[int, tuple[int, int]] = {}
        self.expected_files = []
        for where, image in self.entries(data, "images"):
            width, height = image.get("width"), image.get("height")
            if not (_int_at_least(width) and _int_at_least(height)):
                self.problem(where, f"'width' {width!r} and 'height' {height!r} must be positive integers (pixels)")
                continue
            sizes[image["id"]] = (width, height)
            path = self._image_path(image, image_root, where)
            if path is not None:
                source = f"{self.json_file} {where}"
                self.expected_files.append((path, width, height, source, source))
            if self.lvis and self.evaluated:
                for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                    listed = image.get(key)
                    if not isinstance(listed, list):
                        self.problem(f"{where} '{key}'", "missing; the LVIS evaluator needs it (a list, may be empty)")
                        continue
                    unknown = [c for c in listed if c not in category_ids]
                    if category_ids and unknown:
                        self.problem(f"{where} '{key}'", f"{unknown[0]!r} is not in 'categories'; list category ids")
                    if key == "neg_category_ids":
                        self.negatives[image["id"]] = (where, set(listed))
        return sizes

    def warn_contradicted_negatives(self) -> None:
        """An LVIS image listing in ``neg_category_ids`` a class annotated on it is reported in a
        warning, since the evaluator then scores the class there as on any image that shows it."""
        contradicted = []
        for image_id, (where, negative) in self.negatives.items():
            both = negative & self.annotated.get(image_id, set())
            if both:
                contradicted.append(f"{where} lists {min(both)} and annotates it")
        if contradicted:
            count = len(contradicted)
            self.report.warn(f"{self.json_file}: {count} image{'s list' if count > 1 else ' lists'} in "
                             f"'neg_category_ids' a class {'they annotate' if count > 1 else 'it annotates'} "
                             f"(e.g. {contradicted[0]}); the evaluator scores it there as a class the image shows")

    def _image_path(self, image: dict, image_root: str, where: str) -> str | None:
        if not self.lvis:
            if not isinstance(image.get("file_name"), str) or not image["file_name"]:
                self.problem(f"{where} 'file_name'", "missing; name the image file (relative to the image folder)")
                return None
            return os.path.join(image_root, image["file_name"])
        url = image.get("coco_url")
        if not isinstance(url, str) or url.count("/") < 1:
            self.problem(f"{where} 'coco_url'", "missing; LVIS locates images by the last two parts of "
                         "coco_url (e.g. http://images.cocodataset.org/val2017/000000000139.jpg)")
            return None
        split_folder, file_name = url.split("/")[-2:]
        return os.path.join(image_root + split_folder, file_name)  # as detectron2's LVIS loader joins them

    def annotations(self, data: dict, sizes: dict[int, tuple[int, int]], category_ids: set[int]) -> None:
        for where, ann in self.entries(data, "annotations"):
            if self.evaluated and not self.lvis and ann.get("iscrowd", None) not in (0, 1):
                value = repr(ann["iscrowd"]) if "iscrowd" in ann else "missing"
                self.problem(f"{where} 'iscrowd'", f"{value}; the COCO evaluator needs it: 0, or 1 for a crowd region")
            if self.lvis and self.evaluated:  # for warn_contradicted_negatives
                self.annotated.setdefault(ann.get("image_id"), set()).add(ann.get("category_id"))
            size = sizes.get(ann.get("image_id"))
            if size is None:
                self.problem(f"{where} 'image_id'", f"{ann.get('image_id')!r} is not an image of 'images' (it "
                             "would be dropped); add the image or remove the annotation")
            if category_ids and ann.get("category_id") not in category_ids:
                self.problem(f"{where} 'category_id'", f"{ann.get('category_id')!r} is not in 'categories'; use a "
                             "listed id")
            if not self.lvis and ann.get("ignore", 0):
                self.problem(f"{where} 'ignore'", "detectron2's COCO loader rejects 'ignore'; use 'iscrowd' 1")
            if self.evaluated and not (_number(ann.get("area")) and ann["area"] >= 0):
                self.problem(f"{where} 'area'", f"{ann.get('area')!r}; the evaluator needs the area (pixels)")
            if size is not None:
                self._bbox(ann.get("bbox"), size, where)
                self._segmentation(ann, size, where)

    def _bbox(self, bbox, size: tuple[int, int], where: str) -> None:
        where = f"{where} 'bbox'"
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            self.problem(where, f"{bbox!r} must be [x, y, width, height], four finite numbers in pixels")
            return
        x, y, w, h = bbox
        width, height = size
        if w < 0 or h < 0:
            self.problem(where, f"{bbox} has a negative width or height; boxes are [x, y, width, height]")
        elif w == 0 or h == 0:
            self.empty_boxes.append(where)
        elif (x < -box_tolerance(width) or y < -box_tolerance(height) or x + w > width + box_tolerance(width)
              or y + h > height + box_tolerance(height)):
            self.problem(where, f"{bbox} lies outside the {width}x{height} image; correct the box (or the image size)")

    def _segmentation(self, ann: dict, size: tuple[int, int], where: str) -> None:
        segm = ann.get("segmentation")
        where = f"{where} 'segmentation'"
        if not segm:
            # LVIS's loader needs polygons; mask training skips crowd regions, mask evaluation does not
            if self.lvis or (self.need_masks and (self.evaluated or not ann.get("iscrowd", 0))):
                self.problem(where, "missing or empty; the masks are trained on: add the object's polygons")
            return
        if isinstance(segm, dict):
            if self.mask_format == "polygon" and not self.lvis and not ann.get("iscrowd", 0):  # crowds: not trained
                self.problem(where, "an RLE mask, but INPUT.MASK_FORMAT is 'polygon' (detectron2 would stop at "
                             "the first batch); set INPUT.MASK_FORMAT bitmask, or export polygons")
            self._rle(segm, size, where)
            return
        if not isinstance(segm, list):
            self.problem(where, "must be a list of polygons or an RLE object")
            return
        if segm and all(_number(v) for v in segm):
            self.problem(where, "a flat list of coordinates; a segmentation is a list of polygons, "
                         "[[x1, y1, x2, y2, ...], ...]: put the coordinates in a list of their own")
            return
        for k, polygon in enumerate(segm):
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                length = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
                self.problem(f"{where}[{k}]", f"a polygon needs an even number (>= 6) of coordinates x1, y1, x2, "
                             f"y2, ..., got {length} (detectron2 drops it); fix or remove the polygon")

    def _rle(self, segm: dict, size: tuple[int, int], where: str) -> None:
        if self.lvis:
            self.problem(where, "an RLE; detectron2's LVIS loader takes polygons only")
            return
        width, height = size
        counts = segm.get("counts")
        if segm.get("size") != [height, width]:
            self.problem(f"{where} 'size'", f"{segm.get('size')!r} is not the image's [height, width] "
                         f"[{height}, {width}]")
        elif isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                self.problem(f"{where} 'counts'", f"run lengths must be non-negative integers summing to "
                             f"height x width = {height * width}")
        elif not isinstance(counts, str):
            self.problem(f"{where} 'counts'", "must be a list of run lengths or a compressed RLE string")


def check_instances_json(json_file: str, image_root: str, report: CheckReport, *, lvis: bool = False,
                         evaluated: bool = True, need_masks: bool = False, trained: bool = True,
                         mask_format: str = "polygon",
                         dataset_name: str | None = None) -> tuple[int, int | None, dict[int, str] | None]:
    """Check a COCO (or LVIS) instances file and its images into ``report``.

    ``evaluated``: the file is also read by an evaluator (``area``, COCO's ``iscrowd`` and
    LVIS's per-image lists are then required); ``need_masks``: the model uses masks;
    ``trained``: a run trains on the file (it then needs an object that is not a crowd region,
    and its masks must be polygons unless ``mask_format`` is ``bitmask``). Returns (images,
    number of classes, the classes by category id (:func:`numbered_classes`)); the last two are
    None when the file could not be read.
    """
    checker = _InstancesChecker(json_file, report, lvis, evaluated, need_masks,
                                mask_format if need_masks and trained else None)
    try:
        data = load_json(json_file)
    except DatasetLayoutError as err:
        report.problem(f"{err}; fix the file ({checker.format} instances format)")
        return 0, None, None
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        checker.problem("'images' and 'annotations'", "must be lists")
        return 0, None, None
    table = builtin_class_table(dataset_name, lvis) if dataset_name else None
    listed = checker.categories(data, table, dataset_name)
    category_ids = set(listed)
    sizes = checker.images(data, image_root, category_ids)
    checker.annotations(data, sizes, category_ids)
    checker.warn_contradicted_negatives()
    if trained and checker.empty_boxes:
        count = len(checker.empty_boxes)
        report.warn(f"{json_file}: {count} annotation{'s have' if count > 1 else ' has'} a box of zero width or "
                    f"height (e.g. {checker.empty_boxes[0]}); detectron2 leaves them out of training")
    if trained and not any(isinstance(a, dict) and not a.get("iscrowd", 0) for a in data["annotations"]):
        checker.problem("'annotations'", f"no object to train on ({len(data['annotations'])} annotations, all "
                        "crowd regions or none); annotate objects with 'iscrowd' 0")
    ImageFiles(report).check(checker.expected_files, f"checking {Path(json_file).name} images")
    return len(data["images"]), len(table) if table is not None else len(listed), numbered_classes(listed, table, lvis)


def numbered_classes(listed: dict[int, str], table: dict[int, set[str]] | None, lvis: bool) -> dict[int, str] | None:
    """Category id -> name of the classes detectron2 numbers 0, 1, ... in order of id for a COCO
    file: its builtin table where the dataset has one (the file must match it), else the file's
    own ``listed`` categories. None for LVIS, whose classes are the builtin table's ids."""
    if lvis:
        return None
    return listed if table is None else {category_id: min(names) for category_id, names in table.items()}


# --- all datasets of a config --------------------------------------------------------------------


def check_dataset(name: str, report: CheckReport, defaulted: dict[str, set[str]], *, evaluated: bool,
                  need_masks: bool, trained: bool = True,
                  mask_format: str = "polygon") -> tuple[int | None, dict[int, str] | None]:
    """Check one registered dataset by its ``evaluator_type``; returns its number of classes
    (None when unknown) and, for a COCO-format file, its classes by category id
    (:func:`numbered_classes`; else None)."""
    meta = MetadataCatalog.get(name)
    kind = meta.get("evaluator_type", None)
    if kind == "pascal_voc" or meta.get("dirname", None) and meta.get("split", None):  # register_pascal_voc
        count = check_voc_split(meta.dirname, meta.split, meta.thing_classes, report, defaulted)
        logger.info("checked %s: %d images", name, count)
        return len(meta.thing_classes), None
    if kind in ("coco", "lvis") and meta.get("json_file", None):
        count, classes, by_id = check_instances_json(meta.json_file, meta.image_root, report, lvis=kind == "lvis",
                                                     evaluated=evaluated, need_masks=need_masks, trained=trained,
                                                     mask_format=mask_format, dataset_name=name)
        logger.info("checked %s: %d images", name, count)
        return classes, by_id
    report.warn(f"{name}: no content check for evaluator_type {kind!r}; only its files' presence was checked")
    return None, None


def class_difference(here: dict[int, str], there: dict[int, str]) -> str | None:
    """How two files' classes (category id -> name) differ as detectron2 numbers them, in order
    of id: a class only one file lists, else the first number whose class differs, else their
    counts (a name listed twice); None when they agree (ids may differ: a file numbered from 0
    and one from 1 give the same classes)."""
    ours, theirs = [here[i] for i in sorted(here)], [there[i] for i in sorted(there)]
    if ours == theirs:
        return None
    for category_id, name in sorted(there.items()):
        if name not in ours:
            return f"{name!r} (id {category_id} there) is missing here"
    for category_id, name in sorted(here.items()):
        if name not in theirs:
            return f"{name!r} (id {category_id}) is only here"
    pairs = zip(sorted(here.items()), sorted(there.items()))
    for number, ((id_here, name_here), (id_there, name_there)) in enumerate(pairs):
        if name_here == name_there:
            continue
        if id_here == id_there:
            return f"id {id_here} is {name_here!r} here but {name_there!r} there"
        return f"class {number} (by sorted id) is {name_here!r} (id {id_here}) here but {name_there!r} (id {id_there}) there"
    return f"{len(here)} categories here, {len(there)} there"


def check_same_classes(classes_by_file: dict[str, dict[int, str]], report: CheckReport) -> None:
    """Every COCO-format file of a run must give detectron2 the classes of the first one.

    detectron2 numbers each file's categories by their sorted ids on its own: a val file listing
    only the classes it annotates (as FiftyOne exports) or numbering them otherwise trains one
    class and scores it as another, or fails the evaluator after the whole training."""
    files = list(classes_by_file)
    for json_file in files[1:]:
        difference = class_difference(classes_by_file[json_file], classes_by_file[files[0]])
        if difference is not None:
            report.problem(f"{json_file}: 'categories' differ from {files[0]}'s: {difference}; detectron2 numbers "
                           "each file's classes in order of category id, so predictions would be scored as other "
                           "classes: give every file of the run the same categories (id and name), also classes "
                           "a file does not annotate")


def check_datasets(train: Sequence[str], test: Sequence[str], num_classes: int | None = None,
                   need_masks: bool = False, mask_format: str = "polygon") -> list[str]:
    """Check the datasets a run trains on (``train``) and evaluates on (``test``).

    Missing roots or annotation files raise ``FileNotFoundError``
    (:func:`detectron2_ext.datasets.check_dataset_files`); every other problem is collected and
    raised as one :class:`~pretrain.errors.DatasetCheckError`. The COCO-format files must all
    have the classes of the first (:func:`check_same_classes`). ``num_classes``: the
    model's class count (``MODEL.ROI_HEADS.NUM_CLASSES``), compared with each dataset's;
    ``mask_format``: ``INPUT.MASK_FORMAT``, the form the training masks must be in.
    Returns the warnings, among them one summary of the VOC fields that were defaulted.
    """
    names = list(dict.fromkeys([*train, *test]))
    check_dataset_files(names)
    report = CheckReport()
    defaulted: dict[str, set[str]] = {}
    classes_of = defaultdict(list)
    classes_by_file: dict[str, dict[int, str]] = {}  # COCO-format files: category id -> class name
    for name in names:
        classes, by_id = check_dataset(name, report, defaulted, evaluated=name in test, need_masks=need_masks,
                                       trained=name in train, mask_format=mask_format)
        if classes is not None:
            classes_of[classes].append(name)
        if by_id is not None:
            classes_by_file[MetadataCatalog.get(name).json_file] = by_id
    check_same_classes(classes_by_file, report)
    if num_classes is not None:
        for classes, datasets in sorted(classes_of.items()):
            if classes > num_classes:
                report.problem(f"{', '.join(datasets)}: {classes} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                               f"{num_classes} (labels would overflow the classifier); set it to {classes}")
            elif classes < num_classes:
                report.warn(f"{', '.join(datasets)}: {classes} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                            f"{num_classes}; the extra outputs are never trained")
    warning = defaults_warning(defaulted)
    if warning:
        report.warn(warning)
    report.raise_if_problems()
    return report.warnings


def check_config_datasets(cfg, eval_only: bool = False) -> list[str]:
    """:func:`check_datasets` for a detectron2 config: ``DATASETS.TRAIN`` and ``DATASETS.TEST``
    (only ``TEST`` with ``eval_only``), its class count and whether it trains masks."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" else None
    return check_datasets(() if eval_only else cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, num_classes,
                          need_masks=cfg.MODEL.MASK_ON, mask_format=cfg.INPUT.MASK_FORMAT)
