"""Linear probe on an ImageFolder built from the built-in images, single process and DDP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import load_config
from pretrain.distributed import DistContext
from pretrain.downstream.features import load_frozen_backbone
from pretrain.downstream.linear_probe import (
    LinearProbe,
    ProbeSettings,
    build_datasets,
    train_linear_probe,
)
from tests.downstream.conftest import REPO, load_tool


@pytest.fixture(scope="module")
def folder_root(synthetic_root, tmp_path_factory):
    """``train/`` and ``val/`` with two classes a linear layer can tell apart: the built-in
    images as they are ("bright") and darkened to a quarter ("dark")."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, source in (("train", "train2017"), ("val", "val2017")):
        for path in sorted((synthetic_root / "coco" / source).glob("*.jpg")):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            for name, factor in (("bright", 1.0), ("dark", 0.25)):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray((pixels * factor).astype(np.uint8)).save(root / split / name / path.name)
    return root


SMALL = ProbeSettings(iterations=12, batch_size=8, lr=0.3, crop=64, resize=72, eval_period=0, log_period=4, num_workers=0)


def test_probe_learns_and_leaves_the_backbone_untouched(folder_root, tiny_config, tiny_checkpoint, tmp_path):
    cfg = load_config(str(tiny_config))
    torch.manual_seed(0)
    backbone = load_frozen_backbone(cfg, tiny_checkpoint)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_set, val_set = build_datasets(folder_root, SMALL)
    probe = LinearProbe(backbone, cfg.MODEL.VISUAL.FEATURE_SIZE, len(train_set.classes))
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    metrics = train_linear_probe(probe, train_set, val_set, SMALL, ctx, tmp_path)
    assert metrics["images"] == 8 and metrics["top1"] >= 87.5  # chance is 50 %
    for key, value in probe.backbone.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    saved = torch.load(tmp_path / "linear_probe.pth", weights_only=True)
    torch.testing.assert_close(saved["model"]["weight"], probe.fc.weight.detach())
    assert json.loads((tmp_path / "linear_probe_metrics.json").read_text())["metrics"] == metrics


def test_clf_linear_under_torchrun_scores_the_whole_val_split_once(folder_root, tiny_config, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "tools" / "clf_linear.py"), "--config", str(tiny_config), "--random-init",
        "--data-root", str(folder_root), "--output-dir", str(out), "--iterations", "6", "--batch-size", "8",
        "--crop", "64", "--resize", "72", "--eval-period", "0", "--num-workers", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "linear_probe_metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["metrics"]["images"] == 8
    assert (out / "linear_probe.pth").is_file()


def test_empty_split_and_unreadable_image_are_named(folder_root, tiny_config, tmp_path, capsys):
    tool = load_tool("clf_linear")
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    base = ["--config", str(tiny_config), "--random-init", "--output-dir", str(tmp_path / "out"), "--iterations", "2",
            "--batch-size", "2", "--crop", "64", "--resize", "72", "--num-workers", "0"]
    assert tool.main(base + ["--data-root", str(empty)]) == 2
    assert f"{empty / 'train'}: empty split" in capsys.readouterr().err

    mismatched = tmp_path / "mismatched"  # val misses a class and has one of its own
    for split, names in (("train", ("cat", "dog", "emu")), ("val", ("cat", "dgo"))):
        for name in names:
            (mismatched / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(mismatched / split / name / "x.png")
    assert tool.main(base + ["--data-root", str(mismatched)]) == 2
    assert (f"{mismatched / 'val'}: class folders differ from the train split's (2 vs 3 classes; missing here: "
            "dog, emu, not in train: dgo)") in capsys.readouterr().err

    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (broken / split / name).mkdir(parents=True)
            (broken / split / name / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    assert tool.main(base + ["--data-root", str(broken)]) == 2
    assert "x.jpg: cannot read image" in capsys.readouterr().err


def test_hidden_files_and_folders_are_not_images_or_classes(folder_root, tmp_path, caplog):
    """A dataset copied from a Mac holds ``._<photo>.JPEG`` beside each photo (no image: the
    probe stopped when its batch came), and Jupyter leaves ``.ipynb_checkpoints`` in every folder
    it shows (taken for an empty class: the split was refused)."""
    root = tmp_path / "root"
    shutil.copytree(folder_root, root)
    (root / "train" / "dark" / "._000000000001.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (root / "val" / ".ipynb_checkpoints").mkdir()
    train_set, val_set = build_datasets(root, SMALL)
    assert train_set.classes == val_set.classes == ["bright", "dark"]
    assert not any(os.path.basename(path).startswith(".") for path, _ in train_set.samples)
    assert f"{root / 'train'}: left out 1 hidden file" in caplog.text
    assert len(train_set) == len(build_datasets(folder_root, SMALL)[0])



@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be 1 or more, got 0"),
    (["--crop", "0"], "--crop must be 1 or more, got 0"),
    (["--min-crop-scale", "2"], "--min-crop-scale must be in (0, 1], got 2.0"),
    (["--min-crop-scale", "0"], "--min-crop-scale must be in (0, 1], got 0.0"),
    (["--lr", "-1"], "--lr must be more than 0, got -1.0"),
    (["--iterations", "0"], "--iterations must be 1 or more, got 0"),
    (["--iterations", "10", "--warmup-iterations", "20"],
     ("--warmup-iterations (20) must be at most --iterations (10): the run would end before its learning rate is "
      "warmed up")),
])
def test_flags_out_of_range_are_refused_in_one_line(tmp_path, capsys, flags, message):
    """Each used to end in a torch traceback (batch size, crop, crop scale, LR), or to run and
    exit 0 (0 iterations with no metrics; a warm-up the run never finishes)."""
    argv = ["--config", "c.yaml", "--random-init", "--data-root", str(tmp_path), "--output-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as exit_:
        load_tool("clf_linear").main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")
