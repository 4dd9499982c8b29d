"""VOC07 SVM protocol: label reading, per-class SVMs and AP, and tools/clf_voc07.py end to end."""
from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import LinearSVC

from pretrain.checkpoint_io import CheckpointError
from pretrain.config import load_config
from pretrain.downstream.features import load_frozen_backbone
from pretrain.downstream.voc07 import (
    SVM_COSTS,
    VOC_CLASSES,
    VocLayoutError,
    evaluate_backbone,
    read_voc_split,
    train_test_class_svm,
    voc07_svm_map,
)
from tests.downstream.conftest import load_tool


def test_split_labels_agree_with_the_xml_annotations(voc_root):
    split = read_voc_split(voc_root, "trainval")
    assert split.labels.shape == (len(split.image_ids), 20) and set(np.unique(split.labels)) <= {1, -1}
    for row, image_id in enumerate(split.image_ids):
        names = {obj.findtext("name") for obj in ET.parse(voc_root / "Annotations" / f"{image_id}.xml").iter("object")}
        assert {VOC_CLASSES[k] for k in np.flatnonzero(split.labels[row] == 1)} == names


def test_split_files_saved_with_a_byte_order_mark_read_the_same(voc_root, tmp_path):
    copy = tmp_path / "VOC2007"
    shutil.copytree(voc_root, copy)
    for path in (copy / "ImageSets" / "Main").glob("*trainval.txt"):
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")  # Notepad's "UTF-8 with BOM"
    split, with_bom = read_voc_split(voc_root, "trainval"), read_voc_split(copy, "trainval")
    assert split.image_ids == with_bom.image_ids and np.array_equal(split.labels, with_bom.labels)


def test_bad_voc_layouts_are_named(voc_root, tmp_path):
    root = tmp_path / "VOC2007"
    shutil.copytree(voc_root / "ImageSets", root / "ImageSets")
    (root / "JPEGImages").mkdir()
    main = root / "ImageSets" / "Main"
    with pytest.raises(VocLayoutError, match="JPEGImages.*image file not found"):
        read_voc_split(root, "test")
    (main / "dog_test.txt").write_text("000001 yes\n")
    with pytest.raises(VocLayoutError, match=r"dog_test.txt:1: expected"):
        read_voc_split(root, "test")
    (main / "dog_test.txt").unlink()
    with pytest.raises(VocLayoutError, match="dog_test.txt: per-class label file not found"):
        read_voc_split(root, "test")
    (main / "test.txt").write_text("\n")
    with pytest.raises(VocLayoutError, match="test.txt: empty split"):
        read_voc_split(root, "test")


def test_a_voc_root_where_no_class_can_be_scored_is_refused_before_features_are_computed(voc_root, tmp_path):
    root = tmp_path / "VOC2007"
    shutil.copytree(voc_root, root)
    for path in (root / "ImageSets" / "Main").glob("*_test.txt"):  # no class shown in any test image
        path.write_text("".join(f"{line.split()[0]} -1\n" for line in path.read_text().splitlines()))
    never_called = torch.nn.Module()  # calling it would raise: the check comes before any feature
    with pytest.raises(VocLayoutError, match=r"VOC2007: no class can be scored \(e.g. .*'\w+': no positive test image\)"):
        evaluate_backbone(never_called, root, num_workers=0)


def _separable(n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_pos + n_neg, 8))
    x[:n_pos, 0] += 4.0
    return x, np.array([1] * n_pos + [-1] * n_neg, dtype=np.int8)


def test_class_svm_refits_best_cost_and_ignores_difficult_test_images():
    train_x, train_y = _separable(9, 21, seed=0)
    test_x, test_y = _separable(5, 10, seed=1)
    # A "difficult" (label 0) test image scored above every positive: counted as a negative it
    # would lower the AP; the protocol leaves it out.
    test_x = np.vstack([test_x, np.r_[20.0, np.zeros(7)]])
    test_y = np.r_[test_y, 0].astype(np.int8)
    result = train_test_class_svm("cls", train_x, train_y, test_x, test_y)
    assert not result.skipped
    # The cost is the first with the best 3-fold mean AP, recomputed here with scikit-learn.
    cv_aps = [np.mean(cross_val_score(
        LinearSVC(C=c, class_weight={1: 2, -1: 1}, loss="squared_hinge", max_iter=2000, random_state=0),
        train_x, train_y, cv=StratifiedKFold(3), scoring="average_precision")) for c in SVM_COSTS]
    assert len(set(np.round(cv_aps, 6))) > 1, "every cost scores the same: the choice would not be tested"
    assert result.cost == SVM_COSTS[int(np.argmax(cv_aps))] and result.cv_ap == pytest.approx(max(cv_aps), abs=1e-12)
    svm = LinearSVC(C=result.cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", max_iter=2000, random_state=0)
    svm.fit(train_x, train_y)
    expected = average_precision_score(test_y[:-1] == 1, svm.decision_function(test_x[:-1]))
    assert result.ap == pytest.approx(expected, abs=1e-12)
    with_difficult = average_precision_score(test_y == 1, svm.decision_function(test_x))
    assert with_difficult < result.ap


def test_untrainable_classes_are_reported_and_left_out_of_the_mean():
    train_x, train_y = _separable(6, 14, seed=2)
    test_x, test_y = _separable(4, 6, seed=3)
    labels_train = np.stack([train_y, np.r_[1, -np.ones(19)].astype(np.int8)], axis=1)
    labels_test = np.stack([test_y, -np.ones(10, dtype=np.int8)], axis=1)
    result = voc07_svm_map(train_x, labels_train, test_x, labels_test, classes=("good", "rare"))
    good, rare = result.classes
    assert "1 positive" in rare.skipped and math.isnan(rare.ap)
    assert result.mean_ap == good.ap and len(result.scored) == 1
    assert result.to_dict()["classes"]["rare"]["AP"] is None


def test_backbone_is_frozen_and_reads_official_style_checkpoints(tiny_config, tiny_checkpoint, tmp_path):
    cfg = load_config(str(tiny_config))
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    # An official checkpoint: only the visual.cnn.* part matters, plus training state entries.
    official = tmp_path / "checkpoint_2000.pth"
    visual = {k: v for k, v in state.items() if k.startswith("visual.cnn.")}
    torch.save({"model": visual, "optimizer": {}, "scheduler": {}, "iteration": 2000}, official)
    backbone = load_frozen_backbone(cfg, official)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[f"visual.{key}"], rtol=0, atol=0)
    backbone.train()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())

    wrong = load_config(str(tiny_config), ["MODEL.VISUAL.NAME", "torchvision::resnet34"])
    with pytest.raises(CheckpointError, match=f"{tiny_checkpoint}: its visual backbone does not fit"):
        load_frozen_backbone(wrong, tiny_checkpoint)
    torch.save({"model": {"textual.x": torch.zeros(1)}}, tmp_path / "textual_only.pth")
    with pytest.raises(CheckpointError, match="textual_only.pth: no visual backbone weights"):
        load_frozen_backbone(cfg, tmp_path / "textual_only.pth")


def test_clf_voc07_tool_scores_every_checkpoint_of_a_directory(voc_root, tiny_config, tiny_checkpoint, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "checkpoint_7.pth")
    state = torch.load(tiny_checkpoint, weights_only=True)
    torch.manual_seed(1)
    state["model"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, run / "checkpoint_12.pth")
    out = tmp_path / "out"
    argv = ["--config", str(tiny_config), "--checkpoint-dir", str(run), "--voc-root", str(voc_root),
            "--output-dir", str(out), "--resize", "72", "--crop", "64", "--num-workers", "0", "--batch-size", "16"]
    tool = load_tool("clf_voc07")
    assert tool.main(argv) == 0
    results = json.loads((out / "voc07_results.json").read_text())
    assert set(results) == {"checkpoint_7.pth", "checkpoint_12.pth"}
    for entry in results.values():
        aps = [c["AP"] for c in entry["classes"].values() if c["AP"] is not None]
        assert entry["classes_scored"] == len(aps) >= 5
        assert entry["mAP"] == pytest.approx(np.mean(aps)) and 0 < entry["mAP"] <= 1
    table = (out / "voc07_results.md").read_text()
    assert "| checkpoint_7.pth | 7 |" in table and "| checkpoint_12.pth | 12 |" in table
    events = EventAccumulator(str(out))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("metrics/voc07_mAP")}
    assert scalars == pytest.approx({7: 100 * results["checkpoint_7.pth"]["mAP"], 12: 100 * results["checkpoint_12.pth"]["mAP"]}, rel=1e-6)
    # Existing results are not overwritten silently.
    assert tool.main(argv) == 2


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be 1 or more, got 0"),
    (["--crop", "0"], "--crop must be 1 or more, got 0"),
    (["--resize", "0"], "--resize must be 1 or more, got 0"),
    (["--jobs", "0"], "--jobs must be 1 or more, got 0"),
    (["--costs", "0.1", "-1"], "--costs must be more than 0, got -1.0"),
])
def test_flags_out_of_range_are_refused_in_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        load_tool("clf_voc07").main(["--config", "c.yaml", "--random-init", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")
