"""Dataset checks before fine-tuning (detectron2_ext.dataset_checks, detectron2_ext.voc_annotations).

Each defect is made in a copy of the built-in dataset and must be reported naming the file and
the field; VOC files without the optional fields and with fractional corners must train and
evaluate (the issue: detectron2's VOC evaluator crashed after the whole fine-tuning). The last
tests run tools/train_net.py twice (once to the end, once stopped by the check) and
tools/check_dataset.py.
"""
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from detectron2.data.datasets import load_voc_instances, register_pascal_voc
from detectron2.evaluation import pascal_voc_evaluation
from PIL import Image

from detectron2_ext import dataset_checks
from detectron2_ext.dataset_checks import (
    check_datasets,
    check_instances_json,
    check_voc_split,
    defaults_warning,
    image_header,
)
from detectron2_ext.datasets import register_coco_datasets
from detectron2_ext.voc_annotations import (
    evaluator_reads_with_defaults,
    parse_rec,
    read_voc_annotation,
)
from pretrain.data.voc_classes import VOC_CLASSES
from pretrain.errors import CheckReport, DatasetCheckError
from tests.detectron2_ext.test_d2_train_net import own_coco_export

REPO = Path(__file__).resolve().parents[2]
VOC_CPU_CONFIG = REPO / "configs" / "detectron2" / "cpu" / "voc_det_default_init_cpu.yaml"
OPTIONAL = ("truncated", "pose", "difficult")
D2_PARSE_REC = pascal_voc_evaluation.parse_rec.__wrapped__  # detectron2's own reader, whatever is patched later


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def voc(synthetic_root, tmp_path) -> Path:
    """A copy of the built-in VOC2007 (trainval: 8 images, test: 4) that a test may damage."""
    shutil.copytree(synthetic_root / "VOC2007", tmp_path / "VOC2007")
    return tmp_path / "VOC2007"


def split_ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def edit_xml(path: Path, edit) -> Path:
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)
    return path


def strip_optional_and_use_fractions(root: ET.Element) -> None:
    """What annotation tools write: no truncated/pose/difficult/segmented, corners like 48.5."""
    root.remove(root.find("segmented"))
    for obj in root.findall("object"):
        for tag in OPTIONAL:
            obj.remove(obj.find(tag))
        box = obj.find("bndbox")
        for tag in ("xmin", "ymin"):
            box.find(tag).text = f"{int(box.find(tag).text) + 0.5}"


def first_object(voc: Path, split: str = "trainval") -> tuple[Path, str]:
    for voc_id in split_ids(voc, split):
        path = voc / "Annotations" / f"{voc_id}.xml"
        if ET.parse(path).getroot().find("object") is not None:
            return path, voc_id
    raise AssertionError("no annotated image")


def voc_report(voc: Path, split: str = "trainval") -> tuple[CheckReport, dict]:
    report, defaulted = CheckReport(), {}
    check_voc_split(str(voc), split, VOC_CLASSES, report, defaulted)
    return report, defaulted


def only_problem(report: CheckReport) -> str:
    assert report.total == len(report.problems) == 1, report.problems
    return report.problems[0]


# --- VOC -----------------------------------------------------------------------------------------


def test_builtin_voc_is_clean(voc):
    for split in ("trainval", "test"):
        report, defaulted = voc_report(voc, split)
        assert report.problems == [] and report.warnings == [] and defaulted == {}


def test_missing_optional_fields_get_the_devkit_defaults_with_one_summary(voc):
    ids = split_ids(voc, "trainval")
    for voc_id in ids[:3]:
        edit_xml(voc / "Annotations" / f"{voc_id}.xml", strip_optional_and_use_fractions)
    report, defaulted = voc_report(voc)
    assert report.problems == []
    assert len(defaulted) == 3 and all(fields == {*OPTIONAL, "segmented"} for fields in defaulted.values())
    warning = defaults_warning(defaulted)
    assert warning.startswith("3 VOC annotation files lack optional fields: truncated (3 files), difficult (3 files), "
                              "pose (3 files), segmented (3 files)")
    assert "truncated 0, difficult 0, pose 'Unspecified', segmented 0" in warning
    objects = read_voc_annotation(voc / "Annotations" / f"{ids[0]}.xml").objects
    assert objects and all((o.truncated, o.difficult, o.pose) == (0, 0, "Unspecified") for o in objects)
    assert all(o.bbox[0] % 1 == 0.5 and o.bbox[1] % 1 == 0.5 for o in objects)


def test_fractional_corners_train_and_evaluate_as_written(voc):
    """detectron2's loader reads corners with float(), its parse_rec with int(), which fails on
    '48.5'; the patched parse_rec keeps 48.5, as the loader trains on it."""
    path, voc_id = first_object(voc)
    edit_xml(path, strip_optional_and_use_fractions)
    with pytest.raises(AttributeError):  # detectron2's own reader: no <truncated> element
        D2_PARSE_REC(str(path))
    loaded = next(d for d in load_voc_instances(str(voc), "trainval", VOC_CLASSES) if d["image_id"] == voc_id)
    ours = parse_rec(str(path))
    assert [o["bbox"][:2] for o in ours] == [[a["bbox"][0] + 1, a["bbox"][1] + 1] for a in loaded["annotations"]]
    assert all(o["bbox"][0] % 1 == 0.5 for o in ours)


def test_parse_rec_matches_detectron2_on_complete_files(voc):
    for voc_id in split_ids(voc, "test"):
        path = str(voc / "Annotations" / f"{voc_id}.xml")
        assert parse_rec(path) == D2_PARSE_REC(path)


def set_size(width: str | None):
    """Remove ``<size>`` (None) or write its width."""
    def edit(root: ET.Element) -> None:
        if width is None:
            root.remove(root.find("size"))
        else:
            root.find("size").find("width").text = width
    return edit


def move_box(dx: int, invert: bool = False):
    """Shift the first object's box right by ``dx`` pixels (past the image), or swap its x corners."""
    def edit(root: ET.Element) -> None:
        box = root.find("object").find("bndbox")
        xmin, xmax = int(box.find("xmin").text), int(box.find("xmax").text)
        box.find("xmin").text, box.find("xmax").text = (str(xmax), str(xmin)) if invert else (str(xmin + dx), str(xmax + dx))
    return edit


@pytest.mark.parametrize("edit", [set_size(None), set_size("ten"), move_box(10_000), move_box(0, invert=True)],
                         ids=["no size", "bad size", "box past the image", "inverted box"])
def test_the_evaluator_reader_accepts_what_detectron2_accepts(voc, edit):
    """The dataset check reports these before training; detectron2's evaluator never reads the
    size or judges the box, so neither does ours: both readers return the same objects."""
    path, _ = first_object(voc, "test")
    edit_xml(path, edit)
    assert read_voc_annotation(path).problems  # the dataset check still says so
    assert parse_rec(str(path)) == D2_PARSE_REC(str(path))


def test_the_replacement_is_scoped_to_our_evaluation():
    original = pascal_voc_evaluation.parse_rec
    with evaluator_reads_with_defaults():
        assert pascal_voc_evaluation.parse_rec is parse_rec
    assert pascal_voc_evaluation.parse_rec is original
    with pytest.raises(KeyError), evaluator_reads_with_defaults():
        raise KeyError("an evaluator's bug")
    assert pascal_voc_evaluation.parse_rec is original


def test_a_detectron2_that_no_longer_calls_parse_rec_fails_loudly(monkeypatch):
    def voc_eval(detpath, annopath, imagesetfile, classname, ovthresh=0.5, use_07_metric=False):
        return read_annotations(annopath)  # some other reader: replacing parse_rec would do nothing

    read_annotations = None
    monkeypatch.setattr(pascal_voc_evaluation, "voc_eval", voc_eval)
    original = pascal_voc_evaluation.parse_rec
    with pytest.raises(RuntimeError, match=r"voc_eval no longer calls the module's parse_rec"), \
            evaluator_reads_with_defaults():
        pass
    assert pascal_voc_evaluation.parse_rec is original


def test_patched_evaluator_scores_files_without_optional_fields(voc, tmp_path):
    """detectron2's voc_eval, inside our context, on test files lacking the optional fields and
    with fractional corners: detections equal to the ground truth score AP 1 for every class."""
    ids = split_ids(voc, "test")
    for voc_id in ids:
        edit_xml(voc / "Annotations" / f"{voc_id}.xml", strip_optional_and_use_fractions)
    truth = {voc_id: read_voc_annotation(voc / "Annotations" / f"{voc_id}.xml").objects for voc_id in ids}
    classes = sorted({o.name for objects in truth.values() for o in objects})
    assert classes
    for name in classes:
        lines = [f"{voc_id} 0.9 {' '.join(map(str, o.bbox))}" for voc_id, objects in truth.items()
                 for o in objects if o.name == name]
        (tmp_path / f"{name}.txt").write_text("\n".join(lines))
        with evaluator_reads_with_defaults():
            _, _, ap = pascal_voc_evaluation.voc_eval(
                str(tmp_path / "{}.txt"), str(voc / "Annotations" / "{}.xml"), str(voc / "ImageSets/Main/test.txt"),
                name, ovthresh=0.5, use_07_metric=True)
        assert ap == pytest.approx(1.0), name


def remove(tag):
    def edit(root):
        obj = root.find("object")
        parent = obj.find("bndbox") if tag in ("xmin", "ymin", "xmax", "ymax") else obj
        parent.remove(parent.find(tag))
    return edit


def set_text(tag, text):
    def edit(root):
        root.find("object").find(".//" + tag).text = text
    return edit


@pytest.mark.parametrize("edit, field, message", [
    (remove("name"), "object 1 <name>", "missing"),
    (remove("bndbox"), "object 1 <bndbox>", "missing"),
    (remove("xmax"), "object 1 <bndbox>/<xmax>", "missing"),
    (set_text("ymin", "abc"), "object 1 <bndbox>/<ymin>", "'abc' is not a number"),
    (set_text("xmin", "nan"), "object 1 <bndbox>/<xmin>", "not a finite number"),
    (set_text("name", "doggo"), "object 1 <name>", "class 'doggo' is not one of the dataset's 20 classes"),
    (set_text("difficult", "yes"), "object 1 <difficult>", "'yes' is not an integer"),
    (set_text("xmin", "9999"), "object 1 <bndbox>", "inverted box"),
    (set_text("xmax", "9999"), "object 1 <bndbox>", "lies outside the"),
    (lambda root: setattr(root.find("object/bndbox/xmax"), "text", str(float(root.find("object/bndbox/xmin").text) - 1)),
     "object 1 <bndbox>", "has no area (VOC corners are inclusive"),
    (lambda root: root.find("size").remove(root.find("size/width")), "<size>/<width>", "missing"),
    (lambda root: setattr(root.find("size/height"), "text", "12.5"), "<size>/<height>", "'12.5' is not an integer"),
])
def test_defects_that_cannot_be_defaulted_name_file_and_field(voc, edit, field, message):
    path, _ = first_object(voc)
    edit_xml(path, edit)
    problem = only_problem(voc_report(voc)[0])
    assert problem.startswith(f"{path}: {field}: ") and message in problem


def test_image_size_must_match_size_in_the_xml(voc):
    path, voc_id = first_object(voc)
    edit_xml(path, lambda root: setattr(root.find("size/width"), "text", str(int(root.find("size/width").text) + 8)))
    problem = only_problem(voc_report(voc)[0])
    assert problem.startswith(f"{voc / 'JPEGImages' / voc_id}.jpg: image is ") and f"{path} <size> says" in problem


@pytest.mark.parametrize("folder, suffix", [("Annotations", "xml"), ("JPEGImages", "jpg")])
def test_files_named_by_the_split_must_exist(voc, folder, suffix):
    voc_id = split_ids(voc, "trainval")[2]
    (voc / folder / f"{voc_id}.{suffix}").unlink()
    problem = only_problem(voc_report(voc)[0])
    assert problem.startswith(f"{voc / folder / voc_id}.{suffix}: ") and "not found" in problem


def test_malformed_xml_is_named(voc):
    path = voc / "Annotations" / f"{split_ids(voc, 'trainval')[0]}.xml"
    path.write_text(path.read_text()[:-30])
    assert only_problem(voc_report(voc)[0]).startswith(f"{path}: malformed XML")


def test_xml_in_another_encoding_than_utf8_is_named(voc):
    """LabelImg on Windows may write Latin-1 and declare it; detectron2's loader reads UTF-8 only."""
    path = voc / "Annotations" / f"{split_ids(voc, 'trainval')[0]}.xml"
    text = path.read_text().replace("<annotation>", "<annotation><folder>Caf\u00e9</folder>", 1)
    path.write_bytes(('<?xml version="1.0" encoding="ISO-8859-1"?>\n' + text).encode("latin-1"))
    assert only_problem(voc_report(voc)[0]) == (f"{path}: not UTF-8 text (it has the byte 0xe9), which detectron2's "
                                                "VOC loader cannot read; save the file as UTF-8")


@pytest.mark.parametrize("content, message", [
    ("000001\n", "lists a single image id; detectron2's loader (np.loadtxt) needs two or more"),
    ("000001\n\n000002\n", "line 2 is blank"),
    ("000001 1\n000002\n", "line 1 has 2 fields"),
    ("\ufeff{ids}", "starts with a byte-order mark, which detectron2 reads as part of the first id"),
    ("{jpgs}", "{n} ids are written as file names (e.g. '{first}.jpg'); write the bare id ('{first}')"),
])
def test_split_file_format(voc, content, message):
    ids = split_ids(voc, "trainval")
    content = content.format(ids="\n".join(ids) + "\n", jpgs="".join(f"{i}.jpg\n" for i in ids))
    message = message.format(first=ids[0], n=len(ids))
    split_file = voc / "ImageSets" / "Main" / "trainval.txt"
    split_file.write_text(content)
    assert any(p == f"{split_file}: {message}" or p.startswith(f"{split_file}: {message}")
               for p in voc_report(voc)[0].problems)


def test_check_datasets_one_warning_and_class_count(voc, tmp_path):
    """The entry point on a registered VOC dataset: one summary warning for the defaults; a model
    with fewer classes than the dataset is an error, with more a warning."""
    name = f"virtex_check_voc_{tmp_path.name}"
    register_pascal_voc(name, str(voc), "trainval", 2007)
    for voc_id in split_ids(voc, "trainval")[:2]:
        edit_xml(voc / "Annotations" / f"{voc_id}.xml", strip_optional_and_use_fractions)
    warnings = check_datasets([name], [], num_classes=20)
    assert len(warnings) == 1 and warnings[0].startswith("2 VOC annotation files lack optional fields")
    assert len(check_datasets([name], [], num_classes=30)) == 2
    with pytest.raises(DatasetCheckError, match="20 classes but MODEL.ROI_HEADS.NUM_CLASSES is 10"):
        check_datasets([name], [], num_classes=10)


def test_builtin_datasets_of_every_cpu_config_are_clean(synthetic_root):
    for train, test, classes, masks in [(["voc_2007_trainval", "voc_2012_trainval"], ["voc_2007_test"], 20, False),
                                        (["coco_2017_train"], ["coco_2017_val"], 80, True),
                                        (["lvis_v1_train"], ["lvis_v1_val"], 1203, True)]:
        assert check_datasets(train, test, classes, need_masks=masks) == []


# --- COCO and LVIS -------------------------------------------------------------------------------


@pytest.fixture
def coco(synthetic_root, tmp_path):
    """A copy of the built-in COCO val2017 (instances JSON and 4 images) and its checker."""
    shutil.copytree(synthetic_root / "coco" / "val2017", tmp_path / "val2017")
    json_file = tmp_path / "instances_val2017.json"
    shutil.copy(synthetic_root / "coco" / "annotations" / "instances_val2017.json", json_file)
    return json_file


def check_coco(json_file: Path, edit=None, lvis=False, evaluated=True, need_masks=True, trained=True,
               mask_format="polygon") -> CheckReport:
    if edit is not None:
        data = json.loads(json_file.read_text())
        edit(data)
        json_file.write_text(json.dumps(data))
    report = CheckReport()
    image_root = str(json_file.parent) + "/" if lvis else str(json_file.parent / "val2017")
    check_instances_json(str(json_file), image_root, report, lvis=lvis, evaluated=evaluated, need_masks=need_masks,
                         trained=trained, mask_format=mask_format,
                         dataset_name="lvis_v1_val" if lvis else "coco_2017_val")
    return report


def category(data, category_id):
    return next(c for c in data["categories"] if c["id"] == category_id)


def polygon_annotation(data):
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list))


def rle_of(data):
    """The first annotation turned into an uncompressed RLE of its image's size."""
    ann = data["annotations"][0]
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    h, w = image["height"], image["width"]
    ann["segmentation"] = {"size": [h, w], "counts": [h * w // 2, h * w - h * w // 2]}
    ann["iscrowd"] = 1
    return ann


COCO_DEFECTS = {
    "renamed category": (lambda d: category(d, 18).update(name="doggy"), "categories (id 18)",
                         "named 'doggy' but detectron2's builtin table of coco_2017_val (80 classes) names it 'dog'"),
    "missing category": (lambda d: d["categories"].remove(category(d, 44)), "categories (id 44)", "'bottle' is missing"),
    "foreign category id": (lambda d: d["categories"].append({"id": 95, "name": "x"}), "categories (id 95)",
                            "id 95 is not in detectron2's builtin table"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=123456), "annotations[0] (id 1) 'image_id'",
                      "123456 is not an image of 'images'"),
    "unlisted category": (lambda d: d["annotations"][0].update(category_id=12), "annotations[0] (id 1) 'category_id'",
                          "12 is not in 'categories'"),
    "short polygon": (lambda d: polygon_annotation(d)["segmentation"].append([1, 2, 3, 4]), "'segmentation'[",
                      "needs an even number (>= 6) of coordinates x1, y1, x2, y2, ..., got 4"),
    "odd polygon": (lambda d: polygon_annotation(d)["segmentation"].append([1, 2, 3, 4, 5, 6, 7]), "'segmentation'[",
                    "got 7"),
    "RLE of another size": (lambda d: rle_of(d)["segmentation"].update(size=[5, 5]), "'segmentation' 'size'",
                            "is not the image's [height, width]"),
    "RLE counts": (lambda d: rle_of(d)["segmentation"]["counts"].append(3), "'segmentation' 'counts'",
                   "summing to height x width"),
    "box outside": (lambda d: d["annotations"][0].update(bbox=[100.0, 0.0, 500.0, 10.0]), "annotations[0] (id 1) 'bbox'",
                    "lies outside the"),
    "negative box": (lambda d: d["annotations"][0].update(bbox=[1.0, 1.0, -3.0, 4.0]), "'bbox'", "negative width"),
    "box not numbers": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "'bbox'", "must be [x, y, width, height]"),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=1), "annotations[1] (id 1)", "id used twice"),
    "no area": (lambda d: d["annotations"][0].pop("area"), "'area'", "the evaluator needs the area"),
    "ignore": (lambda d: d["annotations"][0].update(ignore=1), "'ignore'", "use 'iscrowd' 1"),
    "no mask": (lambda d: d["annotations"][0].update(segmentation=[]), "'segmentation'", "missing or empty"),
    "image size": (lambda d: d["images"][0].update(width=d["images"][0]["width"] + 1), "image is ", "says"),
    # As annotation tools export them:
    "no iscrowd": (lambda d: d["annotations"][0].pop("iscrowd"), "annotations[0] (id 1) 'iscrowd'",
                   "missing; the COCO evaluator needs it"),
    "RLE object": (lambda d: rle_of(d).update(iscrowd=0), "annotations[0] (id 1) 'segmentation'",
                   "an RLE mask, but INPUT.MASK_FORMAT is 'polygon'"),
    "flat polygon": (lambda d: d["annotations"][0].update(segmentation=[1.0, 2.0, 8.0, 2.0, 8.0, 9.0]),
                     "annotations[0] (id 1) 'segmentation'", "a flat list of coordinates"),
    "only crowd regions": (lambda d: [a.update(iscrowd=1) for a in d["annotations"]], "'annotations'",
                           "no object to train on"),
}


def test_builtin_coco_and_lvis_are_clean(coco, synthetic_root, tmp_path):
    report = check_coco(coco)
    assert (report.problems, report.warnings) == ([], [])
    lvis = tmp_path / "lvis_v1_val.json"
    shutil.copy(synthetic_root / "lvis" / "lvis_v1_val.json", lvis)
    report = check_coco(lvis, lvis=True)  # images found through coco_url: <root>/val2017/<name>
    assert (report.problems, report.warnings) == ([], [])


@pytest.mark.parametrize("defect", sorted(COCO_DEFECTS))
def test_coco_defects_name_file_and_key(coco, defect):
    edit, where, message = COCO_DEFECTS[defect]
    problem = only_problem(check_coco(coco, edit))
    assert where in problem and message in problem
    if defect != "image size":
        assert problem.startswith(f"{coco}: ")
    else:
        assert f"{coco} images[0]" in problem


def test_rle_objects_train_as_bitmasks_and_need_no_format_where_not_trained(coco):
    def rle_object(data):
        rle_of(data).update(iscrowd=0)
    assert check_coco(coco, rle_object, mask_format="bitmask").problems == []
    assert check_coco(coco, rle_object, trained=False).problems == []
    assert check_coco(coco, rle_object, need_masks=False).problems == []


def test_boxes_without_area_are_counted_in_a_warning_where_trained(coco):
    def flatten(data):
        data["annotations"][0]["bbox"][2] = 0.0
        data["annotations"][1]["bbox"][3] = 0
    report = check_coco(coco, flatten)
    assert report.problems == [] and report.warnings == [
        (f"{coco}: 2 annotations have a box of zero width or height (e.g. annotations[0] (id 1) 'bbox'); "
         "detectron2 leaves them out of training")]
    assert check_coco(coco, trained=False).warnings == []


def test_a_16_bit_image_is_named(coco):
    image = json.loads(coco.read_text())["images"][0]
    path = coco.parent / "val2017" / image["file_name"]
    deep = np.full((image["height"], image["width"]), 30000, np.uint16)  # mid-grey, read by detectron2 as white
    Image.fromarray(deep).save(path, format="PNG")  # under its .jpg name, as converters leave them
    problem = only_problem(check_coco(coco))
    assert problem == f"{path}: a 16-bit image, which detectron2 reads clipped to white; save it with 8 bits per channel"


def test_a_machine_fault_while_reading_an_image_is_raised_not_blamed_on_the_file(coco, monkeypatch):
    """A disk error (EIO, as a stale NFS handle gives) while a header is read says nothing about
    the image: raised as it is (a traceback), not "replace the file"; a file that is no image
    stays a problem naming it."""
    names = [image["file_name"] for image in json.loads(coco.read_text())["images"]]
    failing, not_an_image = coco.parent / "val2017" / names[0], coco.parent / "val2017" / names[1]
    real_open = dataset_checks.Image.open

    def open_failing_on_one_file(path, *args, **kwargs):
        if Path(path) == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(dataset_checks.Image, "open", open_failing_on_one_file)
    with pytest.raises(OSError) as caught:
        check_coco(coco)
    assert caught.value.errno == errno.EIO and caught.value.filename == str(failing)
    monkeypatch.undo()
    not_an_image.write_bytes(b"not an image")
    problem = only_problem(check_coco(coco))
    assert problem.startswith(f"{not_an_image}: not a readable image (") and problem.endswith("replace the file")


def test_size_of_an_exif_rotated_image_says_that_it_is_turned(coco):
    data = json.loads(coco.read_text())
    image = next(i for i in data["images"] if i["width"] != i["height"])
    path = coco.parent / "val2017" / image["file_name"]
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels are as the JSON says; detectron2 reads them turned
    Image.open(path).save(path, exif=exif.tobytes())
    problem = only_problem(check_coco(coco))
    assert problem.startswith(f"{path}: image is {image['height']}x{image['width']} upright (its EXIF orientation")


def test_missing_image_file_and_tolerance(coco):
    data = json.loads(coco.read_text())
    image = data["images"][0]
    (coco.parent / "val2017" / image["file_name"]).unlink()
    ann = next(a for a in data["annotations"] if a["image_id"] != image["id"])
    size = next(i for i in data["images"] if i["id"] == ann["image_id"])
    ann["bbox"] = [-1.5, 0.0, size["width"] + 1.0, 4.0]  # up to 2 px (or 1%) outside is tolerated
    coco.write_text(json.dumps(data))
    problem = only_problem(check_coco(coco))
    assert problem.startswith(f"{coco.parent / 'val2017' / image['file_name']}: image file not found")


def test_area_and_masks_are_only_needed_where_read(coco):
    def edit(data):
        for ann in data["annotations"]:
            del ann["area"], ann["segmentation"]
    assert check_coco(coco, edit, evaluated=False, need_masks=False).problems == []
    assert check_coco(coco, evaluated=True, need_masks=False).total == len(json.loads(coco.read_text())["annotations"])


@pytest.fixture
def lvis(synthetic_root, coco, tmp_path):
    path = tmp_path / "lvis_v1_val.json"
    shutil.copy(synthetic_root / "lvis" / "lvis_v1_val.json", path)
    return path


LVIS_DEFECTS = {
    "RLE": (lambda d: rle_of(d), "'segmentation'", "detectron2's LVIS loader takes polygons only"),
    "foreign id": (lambda d: d["categories"].append({"id": 1300, "name": "x", "frequency": "r"}),
                   "categories (id 1300)", "not in detectron2's builtin table of lvis_v1_val (1203 classes)"),
    "no frequency": (lambda d: d["categories"][0].pop("frequency"), "categories[0] (id 1) 'frequency'",
                     "must be 'r', 'c' or 'f'"),
    "no negative ids": (lambda d: d["images"][0].pop("neg_category_ids"), "'neg_category_ids'",
                        "the LVIS evaluator needs it"),
    "unknown negative id": (lambda d: d["images"][0].update(neg_category_ids=[1300]), "'neg_category_ids'",
                            "1300 is not in 'categories'"),
    "no coco_url": (lambda d: d["images"][0].pop("coco_url"), "'coco_url'", "LVIS locates images"),
    "short polygon": (lambda d: d["annotations"][0]["segmentation"].append([0, 0, 1, 1]), "'segmentation'[",
                      "got 4"),
}


@pytest.mark.parametrize("defect", sorted(LVIS_DEFECTS))
def test_lvis_defects_name_file_and_key(lvis, defect):
    edit, where, message = LVIS_DEFECTS[defect]
    problem = only_problem(check_coco(lvis, edit, lvis=True))
    assert problem.startswith(f"{lvis}: ") and where in problem and message in problem


def test_an_lvis_image_that_lists_a_class_it_annotates_as_absent_is_warned_about(lvis):
    def contradict(data):
        ann = data["annotations"][0]
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        image["neg_category_ids"].append(ann["category_id"])
    report = check_coco(lvis, contradict, lvis=True)
    assert report.problems == [] and len(report.warnings) == 1
    assert "1 image lists in 'neg_category_ids' a class it annotates (e.g. images[" in report.warnings[0]


def test_lvis_names_follow_ids_but_another_table_is_an_error(lvis):
    """detectron2's LVIS loader maps classes by id: a few other names are a warning, most of them
    renamed (another LVIS version's table) an error."""
    report = check_coco(lvis, lambda d: category(d, 5).update(name="booze"), lvis=True)
    assert report.problems == [] and len(report.warnings) == 1 and "id 5 'booze'" in report.warnings[0]
    report = check_coco(lvis, lambda d: [c.update(name=f"x{c['id']}") for c in d["categories"]], lvis=True)
    assert report.total == 1203 and "named 'x1' but" in report.problems[0]


def test_image_size_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: detectron2's read_image transposes the pixels
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert image_header(tmp_path / "r.jpg") == ((20, 30), "RGB")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "p.jpg")
    assert image_header(tmp_path / "p.jpg") == ((30, 20), "RGB")


def test_error_lists_ten_problems_and_the_count():
    report = CheckReport()
    for k in range(25):
        report.problem(f"file{k}.xml: <name>: missing")
    with pytest.raises(DatasetCheckError) as caught:
        report.raise_if_problems()
    error = caught.value
    assert isinstance(error, ValueError) and error.total == 25
    lines = str(error).splitlines()
    assert lines[0] == "25 problems in the dataset files (nothing was run):"
    assert lines[1:11] == [f"  file{k}.xml: <name>: missing" for k in range(10)] and lines[11] == "  ... and 15 more"


def fruit_exports(synthetic_root: Path, folder: Path, val_names: dict[int, str], val_first_id: int = 0) -> list:
    """``VIRTEX.COCO_DATASETS`` entries of two exports of the built-in train split (images and
    all) with classes of their own, as two exports of one dataset may differ: train.json lists
    apple, banana, cherry (ids 0, 1, 2: the split's three most common classes); val.json
    ``val_names`` (index of a common class -> name), numbered in that order from ``val_first_id``,
    without the annotations of the classes it leaves out."""
    data = json.loads((synthetic_root / "coco" / "annotations" / "instances_train2017.json").read_text())
    common = [c for c, _ in Counter(a["category_id"] for a in data["annotations"]).most_common(4)]
    entries = []
    for split, names in (("train", {0: "apple", 1: "banana", 2: "cherry"}), ("val", val_names)):
        (folder / split).mkdir()
        json_file = own_coco_export(synthetic_root, "train", folder / split, {common[k]: n for k, n in names.items()})
        json_file = json_file.rename(folder / f"{split}.json")
        if split == "val" and val_first_id:
            exported = json.loads(json_file.read_text())
            for entry in exported["categories"]:
                entry["id"] += val_first_id
            for annotation in exported["annotations"]:
                annotation["category_id"] += val_first_id
            json_file.write_text(json.dumps(exported))
        entries.append([f"fruit_{split}_{folder.name}", str(json_file), str(synthetic_root / "coco" / "train2017")])
    return entries


SAME_FRUITS = {0: "apple", 1: "banana", 2: "cherry"}


@pytest.mark.parametrize("val_names, val_first_id, difference", [
    ({0: "apple", 2: "cherry"}, 0, "'banana' (id 1 there) is missing here"),  # FiftyOne: val's classes only
    ({0: "apple", 2: "cherry", 1: "banana"}, 0, "id 1 is 'cherry' here but 'banana' there"),
    ({0: "apple", 2: "cherry", 1: "banana"}, 1, "class 1 (by sorted id) is 'cherry' (id 2) here but 'banana' (id 1) there"),
    ({**SAME_FRUITS, 3: "date"}, 0, "'date' (id 3) is only here"),
    ({**SAME_FRUITS, 3: "apple"}, 0, "4 categories here, 3 there"),
    (SAME_FRUITS, 0, None),
    (SAME_FRUITS, 1, None),  # ids from 1 instead of 0: detectron2 numbers the same classes
])
def test_own_coco_files_of_a_run_must_give_the_same_classes(synthetic_root, tmp_path, val_names, val_first_id,
                                                            difference):
    """detectron2 numbers each file's categories by their sorted ids on its own: a val file with
    other categories (or in another order) than the train file scores predictions as other
    classes, or fails the evaluator after training. The val file is named with the first
    difference; ids that only start elsewhere give the same classes and pass."""
    entries = fruit_exports(synthetic_root, tmp_path, val_names, val_first_id)
    register_coco_datasets(entries, "test")  # as load_config registers VIRTEX.COCO_DATASETS
    (train, train_json, _), (val, val_json, _) = entries
    if difference is None:
        assert check_datasets([train], [val]) == []
        return
    with pytest.raises(DatasetCheckError) as caught:
        check_datasets([train], [val])
    assert caught.value.problems == [(
        f"{val_json}: 'categories' differ from {train_json}'s: {difference}; detectron2 numbers each file's classes "
        "in order of category id, so predictions would be scored as other classes: give every file of the run the "
        "same categories (id and name), also classes a file does not annotate")]


# --- tools/train_net.py and tools/check_dataset.py -------------------------------------------------


SMALL = ["DATASETS.TRAIN", "('voc_2007_trainval',)", "SOLVER.MAX_ITER", "2", "TEST.PRECISE_BN.ENABLED", "False",
         "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "192", "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


def dataset_root(synthetic_root: Path, folder: Path) -> Path:
    """A DETECTRON2_DATASETS root with a copy of the built-in VOC2007 only."""
    shutil.copytree(synthetic_root / "VOC2007", folder / "VOC2007")
    return folder


def run_tool(tool: str, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DETECTRON2_DATASETS": str(root)}
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_train_net_trains_and_evaluates_voc_files_without_optional_fields(synthetic_root, tmp_path):
    root = dataset_root(synthetic_root, tmp_path / "data")
    for xml in sorted((root / "VOC2007" / "Annotations").glob("*.xml")):
        edit_xml(xml, strip_optional_and_use_fractions)
    output = tmp_path / "run"
    result = run_tool("train_net.py", root, "--config-file", str(VOC_CPU_CONFIG), *SMALL, "OUTPUT_DIR", str(output))
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    record = json.loads((output / "inference" / "voc_2007_test" / "evaluation.json").read_text())
    assert set(record["results"]["bbox"]) == {"AP", "AP50", "AP75"}
    assert all(math.isfinite(v) for v in record["results"]["bbox"].values())
    losses = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines() if "total_loss" in line]
    assert losses[-1]["iteration"] == 1 and math.isfinite(losses[-1]["total_loss"])
    log = (output / "log.txt").read_text()
    assert log.count("VOC annotation files lack optional fields") == 1
    assert re.search(r"dataset check: 12 VOC annotation files lack optional fields: truncated \(\d+ files\)", log)
    assert "compat: the VOC evaluator reads annotations with detectron2_ext.voc_annotations.parse_rec" in log

    checked = run_tool("check_dataset.py", root, "--config-file", str(VOC_CPU_CONFIG), "--opts", *SMALL[:2])
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "check_dataset: warning: 12 VOC annotation files lack optional fields" in checked.stderr


def test_train_net_stops_before_training_naming_file_and_field(synthetic_root, tmp_path):
    root = dataset_root(synthetic_root, tmp_path / "data")
    voc = root / "VOC2007"
    train_xml, _ = first_object(voc, "trainval")
    test_xml, _ = first_object(voc, "test")
    edit_xml(train_xml, remove("xmax"))
    edit_xml(test_xml, set_text("name", "doggo"))
    output = tmp_path / "run"
    result = run_tool("train_net.py", root, "--config-file", str(VOC_CPU_CONFIG), *SMALL, "OUTPUT_DIR", str(output))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert f"  {train_xml}: object 1 <bndbox>/<xmax>: missing; write the corner in pixels (1-based, as in VOC)" in lines
    assert any(line.startswith(f"  {test_xml}: object 1 <name>: class 'doggo' is not one of") for line in lines)
    assert lines[-1] == "train_net: error: 2 problems in the dataset files (nothing was run)"
    assert not output.exists()  # no log, metrics or checkpoint: nothing started

    checked = run_tool("check_dataset.py", root, "--config-file", str(VOC_CPU_CONFIG), "--eval-only")
    assert checked.returncode == 2
    assert checked.stderr.splitlines()[-1] == "check_dataset: error: 1 problem in the dataset files (nothing was run)"
    assert str(test_xml) in checked.stderr and str(train_xml) not in checked.stderr


def test_own_coco_files_with_other_classes_stop_train_net_and_check_dataset(synthetic_root, tmp_path):
    """Through the tools: train_net stops before training (it trained, then the evaluator failed
    with "A prediction has class=2, but the dataset only has 2 classes"), check_dataset says
    so (it said "ok, 0 warnings" for a val file numbering the classes otherwise)."""
    config = str(REPO / "configs" / "detectron2" / "cpu" / "coco_segm_default_init_cpu.yaml")
    output = tmp_path / "run"
    for tool, val_names in (("check_dataset.py", {0: "apple", 2: "cherry", 1: "banana"}),
                            ("train_net.py", {0: "apple", 2: "cherry"})):
        folder = tmp_path / tool[:-3]
        folder.mkdir()
        entries = fruit_exports(synthetic_root, folder, val_names)
        opts = ["VIRTEX.COCO_DATASETS", repr(entries), "DATASETS.TRAIN", f"('{entries[0][0]}',)", "DATASETS.TEST",
                f"('{entries[1][0]}',)", "MODEL.ROI_HEADS.NUM_CLASSES", "3", *SMALL[2:], "OUTPUT_DIR", str(output)]
        result = run_tool(tool, synthetic_root, "--config-file", config, *([] if tool == "train_net.py" else ["--opts"]),
                          *opts)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.splitlines()
        assert lines[-1] == f"{tool[:-3]}: error: 1 problem in the dataset files (nothing was run)"
        assert lines[-2].startswith(f"  {entries[1][1]}: 'categories' differ from {entries[0][1]}'s: ")
    assert not output.exists()
