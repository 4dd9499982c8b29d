"""The pretraining data check (pretrain.data.checks): captions file, images present and
decodable, the DATA.CHECK_IMAGES policy, DATA.SKIP_BAD_IMAGES, and the check stopping
run_pretraining, tools/pretrain.py and tools/check_dataset.py before anything is built."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from pretrain.config import load_config
from pretrain.data import checks
from pretrain.data.checks import (
    SAMPLE_SIZE,
    CheckReport,
    DatasetCheckError,
    check_caption_data,
    check_caption_split,
    check_pretraining_data,
    sample_indices,
)

REPO = Path(__file__).resolve().parents[2]
BUILTIN_CONFIG = REPO / "configs" / "builtin" / "bicaptioning_R_18_L1_H256.yaml"


def image(root: Path, split: str, image_id: int) -> Path:
    return root / f"{split}2017" / f"{image_id:012d}.jpg"


def split_report(root: Path, split: str = "train", **kwargs) -> tuple[CheckReport, int]:
    report = CheckReport()
    count = check_caption_split(root, split, report, progress=False, **kwargs)
    return report, count


def config(root: Path, *overrides: str):
    return load_config(None, ["DATA.ROOT", str(root), *overrides])


def test_clean_splits(coco_root):
    for split, count in (("train", 4), ("val", 2)):
        report, checked = split_report(coco_root, split, check_images="all")
        assert (report.problems, report.warnings, checked) == ([], [], count)


def test_missing_image_names_the_file_and_the_captions_file(coco_root):
    path = image(coco_root, "train", 25)
    path.unlink()
    report, _ = split_report(coco_root)
    captions_json = coco_root / "annotations" / "captions_train2017.json"
    expected = (f"{path}: image file not found (listed in {captions_json}); put a readable image there, remove it "
                "from the captions file, or set DATA.SKIP_BAD_IMAGES True to skip missing and unreadable images")
    assert report.problems == [expected]


@pytest.mark.parametrize("damage", [lambda b: b[:200], lambda b: b"this is not an image"], ids=["truncated", "garbage"])
def test_undecodable_image_is_found_unless_decoding_is_off(coco_root, damage):
    path = image(coco_root, "train", 30)
    path.write_bytes(damage(path.read_bytes()))
    for mode in ("sample", "all"):
        report, _ = split_report(coco_root, check_images=mode)
        assert len(report.problems) == 1 and report.problems[0].startswith(f"{path}: cannot read image")
    assert split_report(coco_root, check_images="none")[0].problems == []


def test_skip_bad_images_turns_them_into_one_warning(coco_root):
    image(coco_root, "train", 9).unlink()
    image(coco_root, "train", 42).write_bytes(b"junk")
    report, _ = split_report(coco_root, skip_bad_images=True)
    assert report.problems == [] and len(report.warnings) == 1
    assert "1 of the 4 images listed" in report.warnings[0] and "1 of the 3 decoded are unreadable" in report.warnings[0]
    assert report.warnings[0].endswith("DATA.SKIP_BAD_IMAGES skips them")


def edit_captions(root: Path, edit, split: str = "train") -> Path:
    path = root / "annotations" / f"captions_{split}2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(image_id=7), "annotations[0] refers to unknown image id 7"),
    (lambda d: d["annotations"][1].pop("caption"), "annotations[1] needs an integer 'image_id' and a string 'caption'"),
    (lambda d: d["images"][0].pop("file_name"), "images[0] needs an integer 'id' and a string 'file_name'"),
    (lambda d: d.pop("annotations"), "expected a JSON object with keys ['images', 'annotations']"),
    (lambda d: d.update(annotations=[]), "'annotations': no image has a caption"),
    # An annotation tool's second entry for one image: which file do its captions describe?
    (lambda d: d["images"].append({"id": d["images"][0]["id"], "file_name": "extra.jpg"}),
     "images[{n}] repeats the id {id} of images[0]; give each image its own id"),
    (lambda d: d["annotations"][1].update(caption=" \n\t "), "annotations[1] has an empty caption"),
])
def test_malformed_captions_file_names_file_and_key(coco_root, edit, message):
    path = edit_captions(coco_root, edit)
    images = json.loads(path.read_text()).get("images", [])
    message = message.format(n=len(images) - 1, id=images[0]["id"] if images else None)
    problem, = split_report(coco_root)[0].problems
    assert problem.startswith(f"{path}: {message}")


def test_missing_captions_file_or_image_folder(coco_root):
    (coco_root / "annotations" / "captions_val2017.json").unlink()
    (coco_root / "train2017").rename(coco_root / "elsewhere")
    with pytest.raises(DatasetCheckError) as caught:
        check_caption_data(config(coco_root))
    assert caught.value.total == 2
    assert caught.value.problems[0].startswith(f"{coco_root / 'train2017'}: image folder not found")
    assert caught.value.problems[1].startswith(f"{coco_root / 'annotations' / 'captions_val2017.json'}: file not found")


def test_sample_policy():
    assert sample_indices(10, "sample") == list(range(10))
    assert sample_indices(SAMPLE_SIZE + 1, "all") == list(range(SAMPLE_SIZE + 1))
    assert sample_indices(118_287, "none") == []
    chosen = sample_indices(118_287, "sample")
    assert len(chosen) == len(set(chosen)) == SAMPLE_SIZE == 1000 and chosen == sorted(chosen)
    assert chosen == sample_indices(118_287, "sample") and max(chosen) > 100_000  # fixed, spread over the split
    with pytest.raises(ValueError, match="DATA.CHECK_IMAGES is 'some'; choose one of sample, all, none"):
        sample_indices(5, "some")


def test_sample_mode_decodes_a_sample_of_a_large_split(coco_root, monkeypatch, caplog):
    monkeypatch.setattr(checks, "SAMPLE_SIZE", 2)
    with caplog.at_level(logging.INFO, logger="pretrain.data.checks"):
        split_report(coco_root)
    assert "captions_train2017.json: 4 images, 2 of them decoded (DATA.CHECK_IMAGES sample)" in caplog.text


def test_config_chooses_splits_and_mode(coco_root):
    image(coco_root, "train", 9).write_bytes(b"junk")
    image(coco_root, "val", 205).write_bytes(b"junk")
    assert load_config().DATA.CHECK_IMAGES == "sample"
    with pytest.raises(DatasetCheckError) as caught:
        check_caption_data(config(coco_root), progress=False)
    assert caught.value.total == 2 and "val2017" in caught.value.problems[1]
    with pytest.raises(DatasetCheckError) as caught:
        check_caption_data(config(coco_root, "ENGINE.VAL_PERIOD", "0"), progress=False)
    assert caught.value.total == 1  # no validation: val is not read
    assert check_caption_data(config(coco_root, "DATA.CHECK_IMAGES", "none")) == []
    with pytest.raises(ValueError, match="DATA.CHECK_IMAGES is 'everything'"):
        check_caption_data(config(coco_root, "DATA.CHECK_IMAGES", "everything"))
    # Tar shards stream (maybe from a URL) with their own bad-sample limit: nothing to read ahead.
    assert check_caption_data(config(coco_root, "DATA.FORMAT", "webdataset")) == []


def test_run_pretraining_stops_before_the_model_is_built(coco_root, tmp_path, monkeypatch):
    from pretrain.engine import (
        trainer,  # here, not at the top: the spawned ranks below need not import it
    )

    image(coco_root, "train", 25).unlink()

    def build_model(cfg):
        raise AssertionError("the model was built before the data were checked")

    monkeypatch.setattr(trainer, "build_model", build_model)
    with pytest.raises(DatasetCheckError, match="000000000025.jpg: image file not found"):
        trainer.run_pretraining(config(coco_root), tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoint_*.pth"))


def test_a_fault_of_the_caption_reader_itself_is_not_reported_as_a_dataset_problem(coco_root, monkeypatch):
    def broken(path):
        raise ValueError("too many values to unpack (expected 2)")  # a bug, naming no file
    monkeypatch.setattr(checks, "read_caption_records", broken)
    with pytest.raises(ValueError, match="too many values") as caught:
        checks.check_caption_split(coco_root, "val", CheckReport(), check_images="none", progress=False)
    assert not isinstance(caught.value, DatasetCheckError)


def _rank(rank: int, port: int, cfg, results: Path) -> None:
    from pretrain.distributed import init_distributed, shutdown_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_distributed(force_cpu=True)
    real_check = checks.check_caption_data

    def recorded_check(*args, **kwargs):  # the real check, leaving a trace of which rank ran it
        (results / f"checked_by_rank{rank}").touch()
        return real_check(*args, **kwargs)

    checks.check_caption_data = recorded_check
    try:
        check_pretraining_data(cfg, main=ctx.is_main)
        outcome = "passed"
    except DatasetCheckError as err:
        outcome = err.problems[0]
    finally:
        shutdown_distributed()
    (results / f"rank{rank}.txt").write_text(outcome)


def test_every_rank_stops_on_the_main_ranks_verdict(coco_root, tmp_path):
    """Only rank 0 reads and decodes; the other rank waits for its verdict and stops as well."""
    path = image(coco_root, "val", 101)
    path.write_bytes(b"junk")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, config(coco_root), tmp_path), nprocs=2)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith(f"{path}: cannot read image")
    assert sorted(p.name for p in tmp_path.glob("checked_by_rank*")) == ["checked_by_rank0"]


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


def test_tools_stop_with_status_2_listing_the_problem(coco_root, tmp_path):
    path = image(coco_root, "train", 42)
    path.write_bytes(path.read_bytes()[:100])
    result = run_tool("pretrain.py", "--config", str(BUILTIN_CONFIG), "--output-dir", str(tmp_path / "run"),
                      "DATA.ROOT", str(coco_root))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"  {path}: cannot read image") for line in lines)
    assert lines[-1] == "pretrain: error: 1 problem in the dataset files (nothing was run)"
    assert not list((tmp_path / "run").glob("checkpoint_*.pth"))

    checked = run_tool("check_dataset.py", "--pretrain-config", str(BUILTIN_CONFIG), "--pretrain-opts",
                       "DATA.ROOT", str(coco_root))
    assert checked.returncode == 2 and checked.stderr.splitlines()[-1].startswith("check_dataset: error: 1 problem")
    unchecked = run_tool("check_dataset.py", "--pretrain-config", str(BUILTIN_CONFIG), "--check-images", "none",
                         "--pretrain-opts", "DATA.ROOT", str(coco_root))
    assert unchecked.returncode == 0, unchecked.stderr[-2000:]
    assert unchecked.stdout.startswith("check_dataset: ok, 0 warning(s)")
