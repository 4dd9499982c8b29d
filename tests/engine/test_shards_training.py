"""Pretraining from WebDataset shards end to end: ranks × workers read every sample of an epoch
once, uneven shards across ranks do not hang DDP, SIGKILL + --resume continues the stream
exactly, too many bad samples stop the run with a list of them, and a shard cut short in the
middle of the corpus costs its tail, not the run (nor the resume).

The shards are the built-in dataset's 16 training images written by tools/make_shards.py.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
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
    layout = data["layout"]
    assert (layout["world_size"], layout["num_workers"], layout["num_shards"], layout["open_shards"]) == (2, 0, 6, 4)
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
    assert "the checkpoint's stream layout differs (num_workers 2 -> 0): every reader restarts epoch" in result.stderr
    assert "shards they had finished are left out" in result.stderr
    assert read_training_checkpoint(tmp_path / "checkpoint_8.pth")["data"]["layout"]["num_workers"] == 0


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
    named = re.findall(rf"{re.escape(str(damaged))}/\d+\.tar (\d+): unreadable image", error)
    assert named and all(int(key) % 4 == 1 for key in named), error  # the damaged ones, by shard and key
    assert "skipping bad sample" in result.stderr  # each was logged when skipped


def copy_shards(listing: Path, output: Path, cut: dict[str, float]) -> Path:
    """The shards of ``listing`` copied to ``output``, those named in ``cut`` truncated to that
    fraction of their members' bytes (as an interrupted download leaves them; a tiny tar's
    bytes are mostly the zero padding after its members); returns the new list."""
    output.mkdir()
    names = listing.read_text().split()
    for name in names:
        data = (listing.parent / name).read_bytes()
        with tarfile.open(listing.parent / name) as tar:
            last = tar.getmembers()[-1]
        size = last.offset_data + last.size if name in cut else len(data)
        (output / name).write_bytes(data[: int(size * cut.get(name, 1.0))])
    (output / "shards.txt").write_text("".join(f"{name}\n" for name in names))
    return output / "shards.txt"


def test_a_cut_shard_mid_corpus_costs_its_tail_not_the_run_and_resume_continues(shard_overrides, synthetic_root,
                                                                              tmp_path):
    """16 shards of one image, the eighth cut to 60 % of its bytes: training runs and logs the
    shard and the byte where reading failed; a --resume (which reads the same shard again)
    continues to the end; the checkpoint names the shard."""
    listing = copy_shards(make_shards(synthetic_root, tmp_path / "whole", shard_size=1), tmp_path / "cut",
                          {"00007.tar": 0.6})
    overrides = [*shard_overrides, "DATA.SHARDS", str(listing), "OPTIM.NUM_ITERATIONS", "9", "ENGINE.CHECKPOINT_PERIOD", "3"]
    first = run_pretrain(tmp_path / "run", [*overrides, "OPTIM.NUM_ITERATIONS", "6"])  # 24 samples: > 1 epoch
    cut = tmp_path / "cut" / "00007.tar"
    assert re.search(rf"skipping the rest of shard {re.escape(str(cut))}: unreadable from byte \d+ \(member \d\) on: "
                     r".*\(0 samples read before the fault\)", first.stderr)
    data = read_training_checkpoint(tmp_path / "run" / "checkpoint_6.pth")["data"]
    assert [fault[0] for fault in data["ranks"][0]["bad_shards"]] == [str(cut)]
    assert len(data["ranks"][0]["shards_read"]) == 16
    resumed = run_pretrain(tmp_path / "run", overrides, resume=True)
    assert "layout differs" not in resumed.stderr
    assert read_training_checkpoint(tmp_path / "run" / "checkpoint_9.pth")["data"]["ranks"][0]["read"] == 36


def test_too_many_cut_shards_stop_the_run_and_name_them(shard_overrides, tmp_path):
    """3 of the 6 shards cut: more than DATA.MAX_BAD_SHARD_FRACTION 0.1 of them; exit status 2."""
    listing = Path(shard_overrides[shard_overrides.index("DATA.SHARDS") + 1])
    cut = copy_shards(listing, tmp_path / "cut", {"00000.tar": 0.5, "00002.tar": 0.5, "00004.tar": 0.5})
    result = subprocess.run(pretrain_command(tmp_path / "run", [*shard_overrides, "DATA.SHARDS", str(cut)]),
                            env=subprocess_env(), check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    # Judged once all 6 shards were opened; by then 2 or 3 of the cuts were reached.
    found = re.fullmatch(r"pretrain: error: ([23]) of the 6 shards read on this rank have an unreadable tail, more "
                         r"than DATA.MAX_BAD_SHARD_FRACTION 0.1: (.*)", error)
    assert found, error
    named = re.findall(rf"{re.escape(str(tmp_path / 'cut'))}/(\d+.tar): unreadable from byte \d+ \(member \d+\)", error)
    assert len(named) == int(found[1]) and set(named) <= {"00000.tar", "00002.tar", "00004.tar"}, error


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
