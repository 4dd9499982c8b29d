"""A run survives what clusters do to jobs: SIGKILL, SIGTERM, corrupt checkpoints, NaN loss.

Every test runs ``tools/pretrain.py`` on the tiny config (ResNet-18, one 32-wide transformer
layer, 64-pixel crops, 8 iterations, checkpoints every 2) and compares its final checkpoint with
an uninterrupted run's. Tolerance: exact equality (rtol = atol = 0) for weights, BN statistics,
optimizer and Lookahead state. The data order and augmentations depend only on (seed, iteration)
and every RNG state is checkpointed, so a resumed CPU run repeats the same arithmetic.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch

from pretrain.checkpoint_io import list_checkpoints, read_training_checkpoint
from tests.engine.conftest import pretrain_command, run_pretrain, subprocess_env


def assert_same_final_state(run: Path, reference: Path) -> None:
    ours = read_training_checkpoint(run / "checkpoint_8.pth")
    theirs = read_training_checkpoint(reference / "checkpoint_8.pth")
    assert ours.keys() == theirs.keys()
    torch.testing.assert_close(ours["model"], theirs["model"], rtol=0, atol=0)
    torch.testing.assert_close(ours["optimizer"]["slow"], theirs["optimizer"]["slow"], rtol=0, atol=0)
    torch.testing.assert_close(ours["optimizer"]["inner"]["state"], theirs["optimizer"]["inner"]["state"], rtol=0, atol=0)
    assert ours["scheduler"]["last_epoch"] == theirs["scheduler"]["last_epoch"] == 8


def start_and_interrupt(output_dir: Path, overrides: list[str], sig: signal.Signals, after: int) -> subprocess.Popen:
    """Start a run and send ``sig`` once ``checkpoint_{after}.pth`` exists (i.e. mid-run)."""
    process = subprocess.Popen(
        pretrain_command(output_dir, overrides), env=subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while not (output_dir / f"checkpoint_{after}.pth").exists():
        assert process.poll() is None, f"run ended early:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.02)
    assert process.poll() is None, "run finished before it could be interrupted"
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_overrides, reference_run, tmp_path):
    process = start_and_interrupt(tmp_path, tiny_overrides, signal.SIGKILL, after=2)
    assert process.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(tmp_path)[-1][0]
    assert killed_at < 8, "the killed run got to the end"
    run_pretrain(tmp_path, tiny_overrides, resume=True)
    assert_same_final_state(tmp_path, reference_run)


def test_sigterm_to_every_process_saves_at_the_stop_then_resumes(tiny_overrides, reference_run, tmp_path):
    """At a preemption or a time limit Slurm signals every process of the step, the DataLoader
    workers too (they died of it, and the main process raised before it could save: status 1).
    No periodic checkpoint falls inside the run, so the one there was saved at the stop."""
    overrides = [*tiny_overrides, "DATA.NUM_WORKERS", "2", "ENGINE.CHECKPOINT_PERIOD", "100"]
    process = subprocess.Popen(pretrain_command(tmp_path, overrides), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    stderr = []
    try:
        for line in process.stderr:
            stderr.append(line)
            if "iteration 2:" in line:
                os.killpg(process.pid, signal.SIGTERM)  # the main process and its workers, as Slurm does
        process.wait()
    finally:
        watchdog.cancel()
    stderr = "".join(stderr)
    assert process.returncode == 0, stderr[-3000:]
    ((stopped_at, saved),) = list_checkpoints(tmp_path)
    assert 2 <= stopped_at < 8
    assert f"SIGTERM received: saved {saved}" in stderr
    run_pretrain(tmp_path, overrides, resume=True)
    assert_same_final_state(tmp_path, reference_run)


def test_corrupt_checkpoint_falls_back_to_previous(tiny_overrides, reference_run, tmp_path):
    for iteration in (2, 4, 6):
        (tmp_path / f"checkpoint_{iteration}.pth").write_bytes((reference_run / f"checkpoint_{iteration}.pth").read_bytes())
    corrupt = tmp_path / "checkpoint_6.pth"
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])  # truncated write
    result = run_pretrain(tmp_path, tiny_overrides, resume=True)
    assert f"{corrupt}: corrupt or truncated checkpoint" in result.stderr
    assert f"resuming from {tmp_path / 'checkpoint_4.pth'} instead" in result.stderr
    assert "differs from the one" not in result.stderr  # same config: nothing to report
    assert_same_final_state(tmp_path, reference_run)


def test_resume_with_another_config_names_every_changed_key(tiny_overrides, reference_run, tmp_path):
    (tmp_path / "checkpoint_6.pth").write_bytes((reference_run / "checkpoint_6.pth").read_bytes())
    changed = [*tiny_overrides, "OPTIM.CLIP_GRAD_NORM", "3.0", "MODEL.VISUAL.ZERO_INIT_RESIDUAL", "False",
               "ENGINE.LOG_PERIOD", "7"]
    result = run_pretrain(tmp_path, changed, resume=True)
    warning = next(line for line in result.stderr.splitlines() if "differs from the one checkpoint_6.pth" in line)
    assert "MODEL.VISUAL.ZERO_INIT_RESIDUAL: True -> False" in warning
    assert "OPTIM.CLIP_GRAD_NORM: 10.0 -> 3.0" in warning
    assert warning.count(" -> ") == 2, "a change of how the run is logged is not another recipe"
    note = next(line for line in result.stderr.splitlines() if "other execution settings than checkpoint_6" in line)
    assert note.endswith("ENGINE.LOG_PERIOD: 2 -> 7"), note


def test_resume_with_a_config_whose_model_the_checkpoint_does_not_fit_stops_in_one_line(
        tiny_overrides, reference_run, tmp_path):
    (tmp_path / "checkpoint_6.pth").write_bytes((reference_run / "checkpoint_6.pth").read_bytes())
    wider = [*tiny_overrides, "MODEL.TEXTUAL.NAME", "transdec_postnorm::L1_H48_A2_F96"]
    result = subprocess.run(pretrain_command(tmp_path, wider, resume=True), env=subprocess_env(), check=False,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pretrain: error: {tmp_path / 'checkpoint_6.pth'}: does not fit the model of this "
                           "config (size mismatch for ") and "checkpoint_6" in line
    assert "; the config differs from the checkpoint's in MODEL.TEXTUAL.NAME: transdec_postnorm::L1_H32" in line
    assert line.endswith("resume with the checkpoint's config (config.yaml in the output folder) or start another "
                         "output directory")


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_overrides, reference_run, tmp_path):
    (tmp_path / "checkpoint_2.pth").write_bytes((reference_run / "checkpoint_2.pth").read_bytes())
    result = subprocess.run(pretrain_command(tmp_path, tiny_overrides), env=subprocess_env(), check=False, capture_output=True, text=True)
    assert result.returncode == 2 and "pass --resume" in result.stderr


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_overrides, tmp_path):
    # A huge learning rate makes the weights overflow within a few iterations.
    overrides = [*tiny_overrides, "OPTIM.CNN_LR", "1e30", "OPTIM.LR", "1e30", "OPTIM.CLIP_GRAD_NORM", "1e30"]
    result = subprocess.run(pretrain_command(tmp_path, overrides), env=subprocess_env(), check=False, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite loss at iteration" in result.stderr
    saved = list_checkpoints(tmp_path)
    assert saved and f"Last good checkpoint: {saved[-1][1]}" in result.stderr
    state = read_training_checkpoint(saved[-1][1])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
