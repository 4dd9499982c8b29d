"""PASCAL VOC annotation files read once, as both of detectron2's readers need them, with the
VOC devkit's defaults for the optional fields.

detectron2 reads a VOC XML file in two places:

* its loader (``detectron2/data/datasets/pascal_voc.py``): ``size/width`` and ``size/height``
  with ``int()``, each object's ``name`` (looked up in the class list) and ``bndbox`` corners
  with ``float()``;
* its evaluator's ``parse_rec`` (``detectron2/evaluation/pascal_voc_evaluation.py``): each
  object's ``name``, ``pose``, ``truncated`` and ``difficult`` (``int()``), and the corners with
  ``int()``.

Annotation tools commonly omit ``truncated``, ``pose``, ``difficult`` or ``segmented`` and some
write corners with fractions ("48.5"): the loader trains on such files and the evaluator then
fails with a ``TypeError``/``ValueError`` after the whole fine-tuning. :func:`read_voc_annotation`
reads a file the way both need, fills the devkit's defaults (truncated 0, difficult 0, pose
"Unspecified", segmented 0) and lists what cannot be defaulted, naming the file and the field.

How the defaults reach the evaluator: inside :func:`evaluator_reads_with_defaults` (a context
manager around our VOC evaluation, :mod:`detectron2_ext.evaluation`) detectron2's ``parse_rec``,
which ``voc_eval`` looks up at call time, is :func:`parse_rec`; on leaving it is detectron2's
own again, so a program that imports ``detectron2_ext`` and evaluates VOC by itself gets
detectron2 as its users know it. On entering, the context manager checks that ``voc_eval``
still calls ``parse_rec`` by that name and fails loudly if a detectron2 release changed it
(the replacement would silently do nothing). Chosen over a normalised copy of the annotations
because a copy would need its own dataset names (detectron2's metadata for ``voc_2007_test``
fixes its folder), disk space and a rule for when it is stale, and it would still leave
``--eval-only`` on the original files failing; the user's files are never touched.

The evaluator's reader only fills defaults: it never refuses a file that detectron2's own
``parse_rec`` reads (a missing ``<size>``, a box reaching past the image or inverted, an empty
``<name>``: fields or checks its evaluator does not use), while the dataset check
(:mod:`detectron2_ext.dataset_checks`) still reports those before training. Corners are kept as
the numbers written, as the devkit reads them (its MATLAB reader uses ``str2double``) and as the
loader trains on them; detectron2's own ``parse_rec`` would truncate them with ``int()`` (and
fails on "48.5"). For integer corners both give the same values, so evaluation of standard VOC
files is unchanged.
"""
from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

from detectron2.utils.file_io import PathManager

from pretrain.errors import DatasetCheckError

logger = logging.getLogger(__name__)

# The VOC devkit's values for the fields annotation tools leave out.
OPTIONAL_DEFAULTS = {"truncated": 0, "difficult": 0, "pose": "Unspecified", "segmented": 0}
CORNERS = ("xmin", "ymin", "xmax", "ymax")
BOX_TOLERANCE_PX = 2.0  # corners may lie this far outside the image (or 1% of its side, if more)


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: what the loader and the evaluator read, defaults filled in."""

    name: str | None  # None: an empty <name>, which only the evaluator's reader accepts (as detectron2's)
    bbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax: 1-based pixel indices, as written
    pose: str
    truncated: int
    difficult: int


@dataclass
class VocAnnotation:
    """One annotation file: image size, objects, the optional fields it lacked and its problems."""

    path: str
    width: int | None = None
    height: int | None = None
    objects: list[VocObject] = field(default_factory=list)
    defaulted: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def box_tolerance(side: float) -> float:
    """How far (pixels) a box may reach outside an image side of ``side`` pixels."""
    return max(BOX_TOLERANCE_PX, 0.01 * side)


def _text(element: ET.Element, tag: str) -> str | None:
    """The text of ``element``'s child ``tag``; None when the child is missing or empty."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text


class _Reader:
    """Reads the fields of one file, recording problems and defaults on its annotation.

    ``evaluator``: read only what detectron2's ``parse_rec`` reads, and refuse only what it
    cannot read (no image size, no box geometry or class checks).
    """

    def __init__(self, annotation: VocAnnotation, evaluator: bool = False):
        self.annotation = annotation
        self.evaluator = evaluator

    def problem(self, where: str, what: str) -> None:
        self.annotation.problems.append(f"{self.annotation.path}: {where}: {what}")

    def integer(self, element: ET.Element, tag: str, where: str, fix: str) -> int | None:
        text = _text(element, tag)
        if text is None:
            self.problem(where, f"missing; {fix}")
            return None
        try:
            return int(text)  # as detectron2 reads it
        except ValueError:
            self.problem(where, f"{text.strip()!r} is not an integer; {fix}")
            return None

    def optional_int(self, element: ET.Element, tag: str, where: str) -> int:
        if _text(element, tag) is None:
            self.annotation.defaulted.add(tag)
            return OPTIONAL_DEFAULTS[tag]
        value = self.integer(element, tag, where, "write 0 or 1, or leave the field out (default 0)")
        return OPTIONAL_DEFAULTS[tag] if value is None else value

    def corner(self, box: ET.Element, tag: str, where: str) -> float | None:
        text = _text(box, tag)
        fix = "write the corner in pixels (1-based, as in VOC)"
        if text is None:
            self.problem(f"{where}/<{tag}>", f"missing; {fix}")
            return None
        try:
            value = float(text)
        except ValueError:
            self.problem(f"{where}/<{tag}>", f"{text.strip()!r} is not a number; {fix}")
            return None
        if not math.isfinite(value):
            self.problem(f"{where}/<{tag}>", f"{text.strip()!r} is not a finite number; {fix}")
            return None
        return value

    def box(self, obj: ET.Element, where: str) -> tuple[float, float, float, float] | None:
        box = obj.find("bndbox")
        if box is None:
            self.problem(f"{where} <bndbox>", "missing; add the box (xmin, ymin, xmax, ymax) or remove the object")
            return None
        corners = [self.corner(box, tag, f"{where} <bndbox>") for tag in CORNERS]
        if any(c is None for c in corners):
            return None
        xmin, ymin, xmax, ymax = corners
        if self.evaluator:
            return xmin, ymin, xmax, ymax
        if xmax < xmin - 1 or ymax < ymin - 1:
            self.problem(f"{where} <bndbox>", f"inverted box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}): "
                         "xmax must not be below xmin nor ymax below ymin; swap the corners")
            return None
        if xmax < xmin or ymax < ymin:  # corners are inclusive 1-based pixels: xmin = xmax is one pixel wide
            self.problem(f"{where} <bndbox>", f"box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) has no area (VOC "
                         "corners are inclusive: a box one pixel wide has xmax = xmin); correct or remove it")
            return None
        width, height = self.annotation.width, self.annotation.height
        if width and height:
            tx, ty = box_tolerance(width), box_tolerance(height)
            if xmin < 1 - tx or ymin < 1 - ty or xmax > width + tx or ymax > height + ty:
                self.problem(f"{where} <bndbox>", f"box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside the "
                             f"{width}x{height} image given by <size>; correct the box or <size>")
        return xmin, ymin, xmax, ymax

    def object(self, obj: ET.Element, index: int, class_names: Sequence[str] | None) -> VocObject | None:
        where = f"object {index}"
        name_element = obj.find("name")
        name = None if name_element is None else name_element.text  # raw: detectron2 does not strip it
        evaluator_takes_it = self.evaluator and name_element is not None  # any text, an empty one as None
        if not evaluator_takes_it and (name is None or not name.strip()):
            self.problem(f"{where} <name>", "missing; write the object's class name")
        elif class_names is not None and name not in class_names:
            self.problem(f"{where} <name>", f"class {name!r} is not one of the dataset's {len(class_names)} "
                         f"classes ({', '.join(class_names)}); rename it or remove the object")
        pose = _text(obj, "pose")
        if pose is None:
            self.annotation.defaulted.add("pose")
            pose = OPTIONAL_DEFAULTS["pose"]
        truncated = self.optional_int(obj, "truncated", f"{where} <truncated>")
        difficult = self.optional_int(obj, "difficult", f"{where} <difficult>")
        bbox = self.box(obj, where)
        if bbox is None or (name is None and not self.evaluator):
            return None
        return VocObject(name, bbox, pose, truncated, difficult)


def read_size(root: ET.Element, reader: _Reader) -> None:
    """``<size>``'s width and height into the reader's annotation, or a problem naming what is missing."""
    size = root.find("size")
    if size is None:
        reader.problem("<size>", "missing; add <size> with the image's <width> and <height> in pixels")
        return
    reader.annotation.width = reader.integer(size, "width", "<size>/<width>", "write the image's width in pixels")
    reader.annotation.height = reader.integer(size, "height", "<size>/<height>", "write the image's height in pixels")


def read_voc_annotation(path: str | os.PathLike, class_names: Sequence[str] | None = None,
                        evaluator: bool = False) -> VocAnnotation:
    """Read one VOC XML file; never raises for its content, which ``problems`` describes.

    With ``class_names``, an object of another class is a problem (detectron2's loader would
    fail on it). Objects with a problem are left out of ``objects``. ``evaluator``: as
    detectron2's evaluator reads it (see :class:`_Reader`); ``<size>`` is then not read.
    """
    annotation = VocAnnotation(str(path))
    reader = _Reader(annotation, evaluator)
    try:
        with PathManager.open(str(path), "rb") as handle:  # as detectron2 opens it, remote paths too
            content = handle.read()
        content.decode("utf-8")  # detectron2's loader reads the file as UTF-8 text, whatever it declares
        root = ET.fromstring(content)
    except FileNotFoundError:
        annotation.problems.append(f"{path}: annotation file not found")
        return annotation
    except UnicodeDecodeError as err:
        annotation.problems.append(f"{path}: not UTF-8 text (it has the byte {content[err.start]:#x}), which "
                                   "detectron2's VOC loader cannot read; save the file as UTF-8")
        return annotation
    except ET.ParseError as err:
        annotation.problems.append(f"{path}: malformed XML ({err}); fix or regenerate the file")
        return annotation
    if not evaluator:  # detectron2's evaluator does not read the size
        read_size(root, reader)
    if _text(root, "segmented") is None:
        annotation.defaulted.add("segmented")
    for index, obj in enumerate(root.findall("object"), start=1):
        voc_object = reader.object(obj, index, class_names)
        if voc_object is not None:
            annotation.objects.append(voc_object)
    return annotation


@cache
def parse_rec(filename: str) -> list[dict]:
    """detectron2's ``parse_rec`` with the devkit's defaults and the corners as written.

    Returns what detectron2's version returns (name, pose, truncated, difficult, bbox per
    object) for every file detectron2's reads, and more; raises :class:`DatasetCheckError`
    naming the file and field only for what detectron2's cannot read either (malformed XML, a
    missing box or corner, a corner or flag that is not a number). Cached, as detectron2's is:
    the evaluator asks for every file once per class and threshold.
    """
    annotation = read_voc_annotation(filename, evaluator=True)
    if annotation.problems:
        raise DatasetCheckError(annotation.problems)
    return [
        {"name": o.name, "pose": o.pose, "truncated": o.truncated, "difficult": o.difficult, "bbox": list(o.bbox)}
        for o in annotation.objects
    ]


def check_voc_eval_calls_parse_rec(module) -> None:
    """Fail loudly unless detectron2's ``voc_eval`` in ``module`` still looks ``parse_rec`` up
    by that name at call time: replacing the name would otherwise change nothing, silently."""
    voc_eval = getattr(module, "voc_eval", None)
    if not callable(getattr(module, "parse_rec", None)) or "parse_rec" not in getattr(
            getattr(voc_eval, "__code__", None), "co_names", ()):
        import detectron2

        raise RuntimeError(
            f"detectron2 {detectron2.__version__}: {module.__name__}.voc_eval no longer calls the module's "
            "parse_rec, so detectron2_ext.voc_annotations cannot give the VOC evaluator its defaults; "
            "update detectron2_ext/voc_annotations.py for this detectron2"
        )


@contextmanager
def evaluator_reads_with_defaults() -> Iterator[None]:
    """Within the block, detectron2's VOC evaluator reads annotations with :func:`parse_rec`;
    detectron2's own ``parse_rec`` is back afterwards, whatever happens in the block."""
    from detectron2.evaluation import pascal_voc_evaluation

    check_voc_eval_calls_parse_rec(pascal_voc_evaluation)
    original = pascal_voc_evaluation.parse_rec
    pascal_voc_evaluation.parse_rec = parse_rec
    logger.info("compat: the VOC evaluator reads annotations with detectron2_ext.voc_annotations.parse_rec "
                "during this evaluation (VOC devkit defaults for missing truncated/difficult/pose, box corners "
                "as written)")
    try:
        yield
    finally:
        pascal_voc_evaluation.parse_rec = original
