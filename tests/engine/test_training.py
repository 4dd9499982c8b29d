"""End-to-end pretraining runs of the tiny config: a falling loss with everything recorded, and
DistributedDataParallel over 2 gloo processes equal to one process."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.checkpoint_io import read_training_checkpoint
from pretrain.engine.validation import mean_average_precision
from tests.engine.conftest import PRETRAIN, TINY_CONFIG, run_pretrain, subprocess_env


def test_short_run_loss_falls_and_is_recorded(tiny_overrides, tmp_path):
    """12 iterations with the recommended settings of a bf16 CPU (bf16 autocast, channels-last) and
    validation every 6: the logged loss falls and every record is written."""
    overrides = [*tiny_overrides, "OPTIM.NUM_ITERATIONS", "12", "ENGINE.VAL_PERIOD", "6", "OPTIM.WARMUP_STEPS", "1",
                 "AMP", "True", "AMP_DTYPE", "bf16", "ENGINE.CHANNELS_LAST", "True"]
    run_pretrain(tmp_path, overrides)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for tag in ("loss/captioning_forward", "loss/captioning_backward", "lr/cnn", "lr/textual",
                "throughput/images_per_s", "time/data_s", "val/loss", "val/CIDEr-D", "val/BLEU-4"):
        assert tag in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("val/loss")] == [6, 12]
    state = read_training_checkpoint(tmp_path / "checkpoint_12.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "iteration"} <= state.keys()
    assert "resnet18" in (tmp_path / "config.yaml").read_text() == state["config"]
    log = (tmp_path / "log_rank0.txt").read_text()
    assert "iteration 12" in log and "precision torch.bfloat16" in log
    assert "captioning_backward" in log and "(medians of the last 12 iterations), lr " in log  # not sums


def test_ddp_two_gloo_processes_equal_one_process(tiny_overrides, tmp_path):
    """2 ranks × 2 images against 1 process × 4 images in 2 accumulated chunks of 2.

    Per-process BatchNorm (as in the official code) normalises each rank's 2 images on their
    own and DDP averages the ranks' gradients; one process reproduces exactly that by
    accumulating over 2 chunks. (Against one un-chunked batch of 4 the BN statistics, hence the
    results, differ by design.) Dropout is off because its masks come from per-rank RNG streams.
    Compared: all parameters after 4 steps, rtol 1e-4, atol 1e-6 (float32 reduction order
    differs between the all-reduce and the accumulation).
    """
    common = [*tiny_overrides, "MODEL.TEXTUAL.DROPOUT", "0.0", "OPTIM.NUM_ITERATIONS", "4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_pretrain(single, [*common, "ENGINE.GRAD_ACCUM_STEPS", "2"])
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(PRETRAIN), "--config", str(TINY_CONFIG),
         "--output-dir", str(ddp), *common],
        env=subprocess_env(), check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 rank(s) × 2 images" in (ddp / "log_rank0.txt").read_text()
    assert (ddp / "log_rank1.txt").exists()
    ours, reference = read_training_checkpoint(ddp / "checkpoint_4.pth"), read_training_checkpoint(single / "checkpoint_4.pth")
    assert len(ours["rng"]) == 2 and not torch.equal(ours["rng"][0]["torch"], ours["rng"][1]["torch"])
    params = [name for name, t in reference["model"].items() if "running_" not in name and "num_batches" not in name]
    for name in params:
        torch.testing.assert_close(ours["model"][name], reference["model"][name], rtol=1e-4, atol=1e-6, msg=name)
    # The weights moved between the checkpoints: the comparison is not of near-initial states.
    earlier = read_training_checkpoint(single / "checkpoint_2.pth")["model"]
    moved = max((earlier[n] - reference["model"][n]).abs().max().item() for n in params)
    assert moved > 1e-3


BASELINES = {
    "token_classification": ["MODEL.TEXTUAL.NAME", "none", "OPTIM.NO_DECAY", "none"],
    "multilabel_classification": ["MODEL.TEXTUAL.NAME", "none", "OPTIM.NO_DECAY", "none", "DATA.VOCAB_SIZE", "80"],
    "masked_lm": [],
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_validate_on_their_loss(name, tiny_overrides, tmp_path):
    """The paper's other pretraining tasks write no captions: periodic validation records their
    val loss and no caption metrics (it used to ask them to caption the val split and crash)."""
    overrides = [*tiny_overrides, "MODEL.NAME", name, *BASELINES[name], "OPTIM.NUM_ITERATIONS", "4",
                 "ENGINE.VAL_PERIOD", "2"]
    run_pretrain(tmp_path, overrides)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    val_losses = events.Scalars("val/loss")
    assert [e.step for e in val_losses] == [2, 4]
    assert all(math.isfinite(e.value) and e.value > 0 for e in val_losses)
    assert not [tag for tag in events.Tags()["scalars"] if "CIDEr" in tag or "BLEU" in tag]
    # The labels classifier's val scores are ranked for mAP (the demo's supervised check); the others have none.
    has_map = "val/mAP" in events.Tags()["scalars"]
    assert has_map == (name == "multilabel_classification")
    if has_map:
        assert all(0.0 < e.value <= 1.0 for e in events.Scalars("val/mAP"))


def test_mean_average_precision_ranks_per_class_and_skips_classes_without_positives():
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    perfect = labels * 2.0 - 1.0
    assert mean_average_precision(perfect, labels) == pytest.approx(1.0)  # class 2 has no positive: left out
    # Each class's two positives ranked 3rd and 4th of 4: AP (1/3 + 2/4) / 2.
    worst = np.array([[0.1, 0.9, 0.5], [0.9, 0.1, 0.5], [0.2, 0.2, 0.5], [0.8, 0.8, 0.5]])
    assert mean_average_precision(worst, labels) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert math.isnan(mean_average_precision(perfect, np.zeros_like(labels)))
