"""Pretraining from WebDataset shards end to end: ranks × workers read every sample of an epoch
once, uneven shards across ranks do not hang DDP, SIGKILL + --resume continues the stream
exactly, and too many bad samples stop the run with a list of them.

The shards are the built-in dataset's 16 training images written by tools/make_shards.py.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.checkpoint_io import list_checkpoints, read_training_checkpoint
from pretrain.data.shard_writer import read_coco_corpus, write_shards
from pretrain.data.shards import read_shard
from tests.engine.conftest import (
    PRETRAIN,
    TINY_CONFIG,
    pretrain_command,
    run_pretrain,
    subprocess_env,
)
from tests.engine.test_benchmark import run_benchmark
from tests.engine.test_faults import assert_same_final_state, start_and_interrupt

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def make_shards(synthetic_root: Path, output: Path, split: str = "train", shard_size: int = 3) -> Path:
    coco = synthetic_root / "coco"
    write_shards(read_coco_corpus(coco / "annotations" / f"captions_{split}2017.json"), coco / f"{split}2017",
                 output, shard_size)
    return output / "shards.txt"


@pytest.fixture(scope="module")
def shard_overrides(tiny_overrides, synthetic_root, tmp_path_factory) -> list[str]:
    """The tiny config on shards: 16 training images in 6 shards (5 × 3 + 1), 4 val images in 2."""
    root = tmp_path_factory.mktemp("shards")
    return [*tiny_overrides, "DATA.FORMAT", "webdataset", "DATA.SHARDS", str(make_shards(synthetic_root, root / "train")),
            "DATA.VAL_SHARDS", str(make_shards(synthetic_root, root / "val", "val", 2)), "DATA.SHUFFLE_BUFFER", "4"]


def torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), *args],
                            env=subprocess_env(), check=False, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_ranks_two_workers_read_every_sample_of_an_epoch_once(shard_overrides, tmp_path):
    """4 readers (2 gloo ranks × 2 workers) on 6 shards of 3, 3, 3, 3, 3 and 1 images: per epoch,
    readers get 2, 2, 1, 1 shards. After 20 batches of 2 per rank (10 per worker) every reader
    has read 20 images, at least 3 of its shares of at most 6, so epochs 0-2 are complete: in
    each, all 16 images appear exactly once, each read by one reader."""
    output = tmp_path / "records.json"
    torchrun(Path(__file__).with_name("shard_stream_rank.py"), str(TINY_CONFIG), str(output), "20",
             *shard_overrides, "DATA.NUM_WORKERS", "2")
    records = json.loads(output.read_text())
    assert {(rank, reader // 2) for rank, reader, _, _ in records} == {(0, 0), (1, 1)}  # a rank's readers are its own
    assert len({reader for _, reader, _, _ in records}) == 4
    everything = Counter(_image_ids(shard_overrides))
    assert len(everything) == 16 and set(everything.values()) == {1}
    for epoch in range(3):
        seen = Counter(image_id for _, _, e, image_id in records if e == epoch)
        assert seen == everything, epoch
        owners = {}
        for _, reader, e, image_id in records:
            if e == epoch:
                assert owners.setdefault(image_id, reader) == reader


def _image_ids(overrides: list[str]) -> list[int]:
    listing = Path(overrides[overrides.index("DATA.SHARDS") + 1])
    return [json.loads(raw["json"])["image_id"] for name in listing.read_text().split()
            for raw in read_shard(str(listing.parent / name))]


def test_ddp_on_uneven_shards_trains_and_validates_without_hanging(shard_overrides, tmp_path):
    """2 ranks, one reader each, 6 shards of unequal size: the ranks' shares of an epoch differ, so
    they run through epochs at different paces; the fixed iteration count ends both together."""
    torchrun(PRETRAIN, "--config", str(TINY_CONFIG), "--output-dir", str(tmp_path), *shard_overrides,
             "ENGINE.VAL_PERIOD", "4", "OPTIM.NUM_ITERATIONS", "12", "ENGINE.CHECKPOINT_PERIOD", "12")
    state = read_training_checkpoint(tmp_path / "checkpoint_12.pth")
    data = state["data"]
    assert (data["world_size"], data["num_workers"], data["num_shards"]) == (2, 0, 6)
    assert [rank["read"] for rank in data["ranks"]] == [24, 24] and [r["batches"] for r in data["ranks"]] == [12, 12]
    assert list(data["ranks"][0]["positions"]) == [0] and list(data["ranks"][1]["positions"]) == [1]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [4, 8, 12]
    assert "val/CIDEr-D" not in events.Tags()["scalars"]  # from shards: val loss only


@pytest.fixture(scope="module")
def shard_reference_run(shard_overrides, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shard_reference")
    run_pretrain(output, [*shard_overrides, *RESUME_OVERRIDES])
    return output


# 2 workers and checkpoints every 3 iterations: a checkpoint after an odd number of batches, so
# the resumed DataLoader's worker 0 must play the reader whose turn was next.
RESUME_OVERRIDES = ["DATA.NUM_WORKERS", "2", "ENGINE.CHECKPOINT_PERIOD", "3"]


def test_sigkill_then_resume_continues_the_stream_exactly(shard_overrides, shard_reference_run, tmp_path):
    """Exact equality (rtol = atol = 0) of the final weights and optimizer state with the
    uninterrupted run: every batch after the resume holds the very samples, augmented the very
    same way, as in the uninterrupted run (nothing repeated or skipped)."""
    overrides = [*shard_overrides, *RESUME_OVERRIDES]
    process = start_and_interrupt(tmp_path, overrides, signal.SIGKILL, after=3)
    assert process.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(tmp_path)[-1][0]
    assert killed_at in (3, 6)
    saved = read_training_checkpoint(tmp_path / f"checkpoint_{killed_at}.pth")["data"]
    assert saved["ranks"][0]["batches"] == killed_at and saved["ranks"][0]["read"] == 4 * killed_at
    run_pretrain(tmp_path, overrides, resume=True)
    assert_same_final_state(tmp_path, shard_reference_run)


def test_resume_with_another_worker_count_restarts_the_epoch_with_a_warning(shard_overrides, shard_reference_run, tmp_path):
    (tmp_path / "checkpoint_6.pth").write_bytes((shard_reference_run / "checkpoint_6.pth").read_bytes())
    result = run_pretrain(tmp_path, [*shard_overrides, *RESUME_OVERRIDES[2:], "DATA.NUM_WORKERS", "0"], resume=True)
    assert "every reader restarts epoch 1 from its beginning" in result.stderr
    assert read_training_checkpoint(tmp_path / "checkpoint_8.pth")["data"]["num_workers"] == 0


def test_too_many_bad_samples_stop_the_run_and_name_them(shard_overrides, tmp_path):
    """A quarter of the images truncated, at most 10 % allowed: the run stops, naming shard and key."""
    listing = Path(shard_overrides[shard_overrides.index("DATA.SHARDS") + 1])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in listing.read_text().split():
        with wds.TarWriter(str(damaged / name), encoder=False) as writer:
            for raw in read_shard(str(listing.parent / name)):
                sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
                if int(raw["__key__"]) % 4 == 1:
                    sample["jpg"] = sample["jpg"][:64]
                writer.write(sample)
    overrides = [*shard_overrides, "DATA.SHARDS", str(damaged / "{00000..00005}.tar"), "DATA.MAX_BAD_FRACTION", "0.1"]
    result = subprocess.run(pretrain_command(tmp_path / "run", overrides), env=subprocess_env(), check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]  # a fault of the input
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("pretrain: error: ") and "samples read on this rank were bad, more than DATA.MAX_BAD_FRACTION 0.1" in error
    assert f"{damaged / '00000.tar'} 000000001: unreadable image" in error
    assert "skipping bad sample" in result.stderr  # each was logged when skipped


def test_missing_shards_are_a_one_line_input_error(shard_overrides, tmp_path):
    overrides = [*shard_overrides, "DATA.SHARDS", str(tmp_path / "{0..3}.tar")]
    result = subprocess.run(pretrain_command(tmp_path / "run", overrides), env=subprocess_env(), check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: {tmp_path / '0.tar'}: shard not found (4 of the 4 shards of DATA.SHARDS are missing)")



@pytest.mark.parametrize("data_format", ["coco", "webdataset"])
def test_benchmark_data_mode_times_both_loaders_on_the_same_images(shard_overrides, tmp_path, data_format):
    result = run_benchmark(tmp_path, "data", "--format", data_format, "--batch-size", "4", "--workers", "2",
                           overrides=shard_overrides)
    assert result["format"] == data_format and result["workers"] == 2
    assert result["images_per_s"] > 0 and 0.05 < result["peak_rss_gib"] < 20 and 0.05 < result["peak_worker_rss_gib"] < 20
