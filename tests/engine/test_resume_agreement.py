"""Resume takes one decision for all ranks: the main rank chooses the checkpoint, the others load
exactly that file or every rank stops; a read fault is retried and raised, never taken for a
damaged file; a damaged file is set aside so that it neither shadows nor is overwritten."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint_io import list_checkpoints
from pretrain.engine import checkpoint as checkpoint_module
from pretrain.engine.checkpoint import CheckpointManager
from tests.engine.conftest import subprocess_env

RANK_SCRIPT = Path(__file__).with_name("resume_rank.py")


def folder_with_checkpoints(folder: Path, iterations: list[int]) -> CheckpointManager:
    manager = CheckpointManager(folder, keep_last=5)
    for iteration in iterations:
        manager.save(iteration, {"model": {"w": torch.full((2,), float(iteration))}})
    return manager


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def run_ranks(folder: Path, tmp_path: Path, *unreadable: Path) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    output = tmp_path / "outcome.json"
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(RANK_SCRIPT), str(folder),
                             str(output), *map(str, unreadable)], env=subprocess_env(), capture_output=True,
                            text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(Path(f"{output}.rank{rank}").read_text()) for rank in range(2)]


def test_ranks_resume_from_the_file_rank_0_chose(tmp_path):
    """The newest file is damaged: rank 0 falls back to checkpoint_4 and so does rank 1, and the
    damaged file is set aside (a later save cannot be pruned in its favour or write over it)."""
    folder_with_checkpoints(tmp_path / "run", [4, 8])
    truncate(tmp_path / "run" / "checkpoint_8.pth")
    outcomes = run_ranks(tmp_path / "run", tmp_path)
    assert outcomes == [{"iteration": 4, "weight": [4.0, 4.0]}] * 2
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [4]
    assert (tmp_path / "run" / "checkpoint_8.pth.rejected").is_file()


def test_a_rank_that_cannot_load_the_chosen_file_stops_every_rank(tmp_path):
    """Rank 1 cannot read checkpoint_8, which rank 0 read: no rank falls back to checkpoint_4 on
    its own; both stop with an error naming the file and rank 1."""
    folder_with_checkpoints(tmp_path / "run", [4, 8])
    chosen = tmp_path / "run" / "checkpoint_8.pth"
    outcomes = run_ranks(tmp_path / "run", tmp_path, chosen)
    for outcome in outcomes:
        assert outcome["error"] == "ResumeError"
        assert outcome["message"].startswith(f"{chosen}: rank 1 could not load the checkpoint rank 0 chose")
    assert chosen.is_file(), "a file another rank could not read was set aside"


def test_a_read_fault_is_retried_then_raised_not_taken_for_damage(tmp_path, monkeypatch):
    manager = folder_with_checkpoints(tmp_path, [4, 8])
    monkeypatch.setattr(checkpoint_module, "RETRY_DELAY_S", 0.0)
    real_read, calls = checkpoint_module.read_training_checkpoint, []

    def flaky(path, failures):
        calls.append(Path(path).name)
        if len(calls) <= failures:
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real_read(path)

    monkeypatch.setattr(checkpoint_module, "read_training_checkpoint", lambda path: flaky(path, 2))
    assert manager.choose_latest()["iteration"] == 8 and calls == ["checkpoint_8.pth"] * 3
    calls.clear()
    monkeypatch.setattr(checkpoint_module, "read_training_checkpoint", lambda path: flaky(path, 99))
    with pytest.raises(OSError, match=r"checkpoint_8.pth: could not be read \(Stale file handle\) after 3 attempts"):
        manager.choose_latest()
    assert calls == ["checkpoint_8.pth"] * 3, "fell back to an older checkpoint after a read fault"
    assert [it for it, _ in list_checkpoints(tmp_path)] == [4, 8]


def test_after_a_fallback_the_next_save_survives_pruning(tmp_path):
    """keep_last=1: before, the damaged newer checkpoint_8 counted as the newest and the pruning
    after the resumed run's first save deleted that save."""
    manager = CheckpointManager(tmp_path, keep_last=1, pinned=[4])
    for iteration in (4, 8):
        manager.save(iteration, {"model": {"w": torch.zeros(1)}})
    truncate(tmp_path / "checkpoint_8.pth")
    assert manager.choose_latest()["iteration"] == 4
    manager.save(5, {"model": {"w": torch.ones(1)}})
    assert [it for it, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_only_weights_or_groups_that_do_not_fit_are_called_a_config_mismatch(tmp_path):
    """``restore`` turns torch's state-dict mismatch into one line about the config; a failure
    of our own optimizer code while restoring stays a bug (it was reported as a mismatch)."""
    from types import SimpleNamespace

    from pretrain.distributed import DistContext
    from pretrain.engine.resume import ResumeMismatchError, restore

    class BrokenOptimizer:
        def load_state_dict(self, state):
            raise RuntimeError("Tensor lists must have the same number of tensors, got 103 and 102")

    def training(model, optimizer):
        return SimpleNamespace(ctx=DistContext(0, 0, 1, torch.device("cpu")), cfg=SimpleNamespace(RANDOM_SEED=0), model=model, optimizer=optimizer)

    saved = torch.nn.Linear(3, 2)
    state = {"model": saved.state_dict(), "optimizer": {}, "iteration": 4}
    with pytest.raises(ResumeMismatchError, match=r"checkpoint_4.pth: does not fit the model of this config \(size "
                                                   r"mismatch for weight"):
        restore(training(torch.nn.Linear(3, 5), BrokenOptimizer()), state, tmp_path / "checkpoint_4.pth")
    with pytest.raises(RuntimeError, match="Tensor lists") as caught:
        restore(training(torch.nn.Linear(3, 2), BrokenOptimizer()), state, tmp_path / "checkpoint_4.pth")
    assert not isinstance(caught.value, ResumeMismatchError)
