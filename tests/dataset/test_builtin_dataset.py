"""The built-in dataset loads with the real tools and its annotations are self-consistent."""
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from lvis import LVIS
from pycocotools.coco import COCO

from pretrain.data.dataset_root import DatasetLayoutError, check_dataset_root
from pretrain.data.synthetic import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    is_complete,
    make_synthetic_dataset,
    read_manifest,
)
from pretrain.data.synthetic.categories import (
    COCO_CATEGORIES,
    VOC_CLASSES,
    WORLD_CLASSES,
)
from pretrain.data.synthetic.formats import lvis_frequency
from pretrain.data.synthetic.scenes import MARKINGS, SILHOUETTES, rasterise


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_instances_masks_boxes_and_areas_agree(synthetic_root, split):
    coco = COCO(str(synthetic_root / f"coco/annotations/instances_{split}2017.json"))
    assert sorted(coco.getCatIds()) == sorted(i for i, _, _ in COCO_CATEGORIES)
    assert len(coco.getAnnIds()) > 0
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    assert used <= {c.coco_id for c in WORLD_CLASSES}
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann)
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
        assert mask.sum() == pytest.approx(ann["area"], abs=0.5)
        assert np.allclose(_tight_box(mask), ann["bbox"], atol=1.0)
    for img in coco.dataset["images"]:
        assert (synthetic_root / f"coco/{split}2017" / img["file_name"]).is_file()


def test_coco_captions_five_per_image_with_left_and_right(synthetic_root):
    data = json.loads((synthetic_root / "coco/annotations/captions_train2017.json").read_text())
    per_image = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    assert set(per_image) == {img["id"] for img in data["images"]}
    assert all(len(caps) == 5 and len(set(caps)) == 5 for caps in per_image.values())
    words = " ".join(c for caps in per_image.values() for c in caps).lower().split()
    assert "left" in words and "right" in words


def test_captions_use_a_and_an_by_the_next_word(synthetic_root):
    data = json.loads((synthetic_root / "coco/annotations/captions_train2017.json").read_text())
    text = " ".join(a["caption"] for a in data["annotations"]).lower()
    assert re.search(r"\ban [a-z]", text) and re.search(r"\ba [a-z]", text)
    assert not re.search(r"\ba [aeiou]", text), re.search(r"\ba [aeiou]\w*", text).group(0)
    assert not re.search(r"\ban [^aeiou]", text), re.search(r"\ban [^aeiou]\w*", text).group(0)


def test_captions_name_the_objects_in_the_image(synthetic_root):
    caps = COCO(str(synthetic_root / "coco/annotations/captions_train2017.json"))
    inst = COCO(str(synthetic_root / "coco/annotations/instances_train2017.json"))
    by_coco_id = {c.coco_id: c for c in WORLD_CLASSES}
    for image_id in inst.getImgIds():
        text = " ".join(a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=image_id))).lower()
        for ann in inst.loadAnns(inst.getAnnIds(imgIds=image_id)):
            cls = by_coco_id[ann["category_id"]]
            assert any(w in text for w in cls.words + cls.plurals), (image_id, cls.voc_name, text)


def test_lvis_loads_and_frequencies_match_image_counts(synthetic_root):
    lvis = LVIS(str(synthetic_root / "lvis/lvis_v1_train.json"))
    cats = lvis.dataset["categories"]
    assert len(cats) == 1203
    for cat in cats:
        images = {a["image_id"] for a in lvis.dataset["annotations"] if a["category_id"] == cat["id"]}
        assert cat["image_count"] == len(images)
        assert cat["frequency"] == lvis_frequency(len(images))
    for ann in lvis.dataset["annotations"]:
        mask = lvis.ann_to_mask(ann)
        assert mask.sum() == pytest.approx(ann["area"], abs=0.5)
        assert np.allclose(_tight_box(mask), ann["bbox"], atol=1.0)
    for img in lvis.dataset["images"]:
        present = {a["category_id"] for a in lvis.img_ann_map[img["id"]]}
        assert not present & set(img["neg_category_ids"])
        assert "not_exhaustive_category_ids" in img


def test_lvis_frequency_groups():
    assert [lvis_frequency(n) for n in (0, 1, 10, 11, 100, 101)] == ["r", "r", "r", "c", "c", "f"]


def test_default_sizes_give_every_lvis_tier_and_val_measures_each(tmp_path):
    """The demo's 4000 training images give rare, common and frequent classes as LVIS counts
    them, and its 300 val images hold objects of every world class (the report's APr, APc and
    APf are all defined), with no class so frequent that naming it would be a safe guess."""
    manifest = make_synthetic_dataset(tmp_path, num_train=4000, num_val=300, image_size=64)
    assert manifest["lvis_frequency_groups"] == {"f": 14, "c": 4, "r": 2}
    lvis = json.loads((tmp_path / "lvis" / "lvis_v1_val.json").read_text())
    in_val = Counter(a["category_id"] for a in lvis["annotations"])
    world = {c.lvis_id for c in WORLD_CLASSES}
    tiers = {c["id"]: c["frequency"] for c in lvis["categories"] if c["id"] in world}
    assert set(in_val) == world and min(in_val.values()) >= 5
    assert {tiers[i] for i in in_val} == {"r", "c", "f"}
    train = json.loads((tmp_path / "lvis" / "lvis_v1_train.json").read_text())
    images_with = Counter(c for img in _classes_per_image(train).values() for c in img)
    assert max(images_with.values()) < 0.25 * len(train["images"])


def _classes_per_image(lvis: dict) -> dict:
    classes: dict = {}
    for a in lvis["annotations"]:
        classes.setdefault(a["image_id"], set()).add(a["category_id"])
    return classes


def test_no_two_classes_look_alike_under_the_augmentations():
    """Silhouettes stretched to the same box, one of them possibly flipped (the pipeline's
    augmentation), overlap by less than 0.85 IoU, and pairs that overlap by more than 0.7 differ
    in their markings: the old world's cow, sheep and dog overlapped at 0.87-0.96."""
    def mask(name, flip):
        return rasterise([((1 - u if flip else u) * 63, v * 63) for u, v in SILHOUETTES[name]], 64, 64)

    names = list(SILHOUETTES)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            iou = max((mask(a, False) & mask(b, f)).sum() / (mask(a, False) | mask(b, f)).sum() for f in (False, True))
            assert iou < 0.85, (a, b, iou)
            assert iou < 0.7 or MARKINGS[a] != MARKINGS[b], (a, b, iou)


def test_voc_layout_and_boxes(synthetic_root):
    for year, splits in (("2007", ("train", "val", "trainval", "test")), ("2012", ("train", "val", "trainval"))):
        main = synthetic_root / f"VOC{year}" / "ImageSets" / "Main"
        for split in splits:
            ids = (main / f"{split}.txt").read_text().split()
            assert len(ids) >= 2
            for name in VOC_CLASSES:
                assert len((main / f"{name}_{split}.txt").read_text().splitlines()) == len(ids)
            for voc_id in ids:
                root = ET.parse(synthetic_root / f"VOC{year}" / "Annotations" / f"{voc_id}.xml").getroot()
                width = int(root.find("size/width").text)
                assert (synthetic_root / f"VOC{year}" / "JPEGImages" / f"{voc_id}.jpg").is_file()
                for obj in root.iter("object"):
                    assert obj.find("name").text in VOC_CLASSES
                    box = [int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
                    assert 1 <= box[0] <= box[2] <= width


def test_detectron2_builtin_names_load(synthetic_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in ("coco_2017_train", "lvis_v1_train", "voc_2007_trainval", "voc_2012_trainval", "voc_2007_test"):
        dicts = DatasetCatalog.get(name)
        assert dicts, name
        for d in dicts:
            assert str(d["file_name"]).startswith(str(synthetic_root))
            assert Path(d["file_name"]).read_bytes()[:2] == b"\xff\xd8"
    coco = DatasetCatalog.get("coco_2017_train")
    n_classes = len(MetadataCatalog.get("coco_2017_train").thing_classes)
    assert n_classes == 80
    assert sum(len(d["annotations"]) for d in coco) == len(json.loads(
        (synthetic_root / "coco/annotations/instances_train2017.json").read_text())["annotations"])
    lvis = DatasetCatalog.get("lvis_v1_train")
    lvis_classes = {a["category_id"] for d in lvis for a in d["annotations"]}
    assert lvis_classes <= {c.lvis_id - 1 for c in WORLD_CLASSES}  # detectron2 maps LVIS id to id - 1


def test_generation_is_deterministic_and_skips_complete_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_synthetic_dataset(a, num_train=8, num_val=2, image_size=64, seed=3)
    make_synthetic_dataset(b, num_train=8, num_val=2, image_size=64, seed=3)
    for rel in ("coco/annotations/instances_train2017.json", "coco/annotations/captions_val2017.json",
                "coco/train2017/000000000005.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    stamp = (a / "coco/train2017/000000000001.jpg").stat().st_mtime_ns
    assert make_synthetic_dataset(a, num_train=8, num_val=2, image_size=64, seed=3) == read_manifest(a)
    assert (a / "coco/train2017/000000000001.jpg").stat().st_mtime_ns == stamp


def test_existing_dataset_is_not_overwritten_without_force(tmp_path):
    make_synthetic_dataset(tmp_path, num_train=8, num_val=2, image_size=64, seed=0)
    with pytest.raises(FileExistsError, match="force"):
        make_synthetic_dataset(tmp_path, num_train=8, num_val=2, image_size=64, seed=1)
    manifest = make_synthetic_dataset(tmp_path, num_train=8, num_val=2, image_size=64, seed=1, force=True)
    assert manifest["parameters"]["seed"] == 1


def test_dataset_of_an_older_format_is_named_and_not_kept(tmp_path):
    make_synthetic_dataset(tmp_path, num_train=8, num_val=2, image_size=64, seed=0)
    manifest_path = tmp_path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["parameters"]["format_version"] = FORMAT_VERSION - 1  # as older code wrote it
    manifest_path.write_text(json.dumps(manifest))
    assert not is_complete(tmp_path, num_train=8, num_val=2, image_size=64, seed=0)
    with pytest.raises(FileExistsError, match=f"format version {FORMAT_VERSION - 1} .*--force"):
        make_synthetic_dataset(tmp_path, num_train=8, num_val=2, image_size=64, seed=0)


def test_too_small_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 8"):
        make_synthetic_dataset(tmp_path, num_train=4, num_val=2)


def test_check_dataset_root_accepts_the_builtin_dataset(synthetic_root):
    check_dataset_root(synthetic_root)


def test_missing_file_is_named(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    (root / "lvis" / "lvis_v1_val.json").unlink()
    with pytest.raises(DatasetLayoutError, match=r"lvis_v1_val\.json: file not found"):
        check_dataset_root(root, ("lvis",))


def test_malformed_json_is_named(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    path = root / "coco" / "annotations" / "instances_val2017.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(DatasetLayoutError, match=r"instances_val2017\.json: malformed JSON at line 1"):
        check_dataset_root(root, ("coco",))
