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
        param_groups = ()

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


def trained_tiny(*overrides: str, steps: int = 3):
    """The tiny config's training objects after ``steps`` optimizer steps on unit gradients,
    and the checkpoint state they would save."""
    from pretrain.config import load_config
    from pretrain.distributed import DistContext, get_rng_state
    from pretrain.engine.setup import build_training
    from pretrain.tasks import build_model
    from tests.engine.conftest import TINY_CONFIG

    cfg = load_config(str(TINY_CONFIG), list(overrides))
    torch.manual_seed(0)
    training = build_training(cfg, DistContext(0, 0, 1, torch.device("cpu")), build_model(cfg))
    for _ in range(steps):
        for p in training.params:
            p.grad = torch.ones_like(p)
        training.optimizer_step()
    state = {**training.state_dict(), "config": cfg.dump(), "iteration": steps, "rng": [get_rng_state()]}
    return training, state


def test_a_resumed_run_trains_with_the_hyperparameters_of_its_config(tmp_path):
    """torch's load_state_dict restores the saved learning rates, weight decay and momentum: a run
    resumed under a config that changed them went on with the old ones while its log and
    config.yaml named the new ones. Now the config's apply, at the checkpoint's point in the
    schedule; the optimizer's per-tensor state (momentum buffers, Lookahead's slow weights) is
    the checkpoint's. With the checkpoint's own config every value is the saved one, bit for bit."""
    from pretrain.engine.optim import inner_optimizer
    from pretrain.engine.resume import restore

    _, state = trained_tiny()
    saved_groups = state["optimizer"]["inner"]["param_groups"]
    changed = ["OPTIM.CNN_LR", "0.02", "OPTIM.LR", "0.003", "OPTIM.WEIGHT_DECAY", "0.001", "OPTIM.SGD_MOMENTUM", "0.8",
               "OPTIM.LOOKAHEAD.ALPHA", "0.7", "OPTIM.LOOKAHEAD.STEPS", "4"]
    resumed, _ = trained_tiny(*changed, steps=0)
    assert restore(resumed, state, tmp_path / "checkpoint_3.pth") == 3
    groups, scheduler = inner_optimizer(resumed.optimizer).param_groups, resumed.scheduler
    factor = scheduler.lr_lambdas[0](3)
    assert 0 < factor < 1 and scheduler.last_epoch == 3
    for group, saved in zip(groups, saved_groups, strict=True):
        base = 0.02 if saved["initial_lr"] == 0.05 else 0.003  # the CNN's groups, the textual head's
        assert group["initial_lr"] == base and group["lr"] == pytest.approx(base * factor, rel=1e-12)
        assert group["momentum"] == 0.8 and group["weight_decay"] == (0.001 if saved["weight_decay"] else 0.0)
    assert sorted(scheduler.base_lrs) == sorted(g["initial_lr"] for g in groups)
    assert (resumed.optimizer.alpha, resumed.optimizer.k, resumed.optimizer.step_count) == (0.7, 4, 3)
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["inner"]["state"].values()]
    assert all(torch.equal(a["momentum_buffer"], b) for a, b in zip(inner_optimizer(resumed.optimizer).state.values(), buffers))

    same, _ = trained_tiny(steps=0)
    restore(same, state, tmp_path / "checkpoint_3.pth")
    assert [{k: v for k, v in g.items() if k != "params"} for g in inner_optimizer(same.optimizer).param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in saved_groups]


@pytest.mark.parametrize("change, key", [(["OPTIM.OPTIMIZER_NAME", "adamw"], "OPTIM.OPTIMIZER_NAME: sgd -> adamw"),
                                         (["OPTIM.LOOKAHEAD.USE", "False"], "OPTIM.LOOKAHEAD.USE: True -> False")])
def test_a_resume_with_another_optimizer_stops_in_one_line_naming_the_key(tmp_path, change, key):
    """Its state cannot be continued (torch failed with KeyError 'step' or 'param_groups')."""
    from pretrain.engine.resume import ResumeMismatchError, restore

    _, state = trained_tiny(steps=1)
    other, _ = trained_tiny(*change, steps=0)
    with pytest.raises(ResumeMismatchError) as caught:
        restore(other, state, tmp_path / "checkpoint_1.pth")
    assert str(caught.value) == (
        f"{tmp_path / 'checkpoint_1.pth'}: its optimizer state cannot be continued by another optimizer ({key}); "
        "resume with the checkpoint's config (config.yaml in the output folder) or start another output directory")


def test_a_resumed_fp16_run_continues_with_the_saved_loss_scale(tmp_path):
    """The GradScaler's scale and growth tracker come back from the checkpoint (every other
    resume test runs in fp32, where the scaler saves nothing): a fresh scale of 65536 after a
    resume would skip steps to overflow again, and the run would differ from an uninterrupted one."""
    from pretrain.engine.resume import restore

    _, state = trained_tiny("AMP", "True", "AMP_DTYPE", "fp16", steps=0)
    assert state["scaler"], "fp16 on this device saves a scaler state"
    state["scaler"].update(scale=1024.0, _growth_tracker=7)
    resumed, _ = trained_tiny("AMP", "True", "AMP_DTYPE", "fp16", steps=0)
    assert resumed.scaler.get_scale() != 1024.0
    restore(resumed, state, tmp_path / "checkpoint_1.pth")
    saved = resumed.scaler.state_dict()
    assert (saved["scale"], saved["_growth_tracker"]) == (1024.0, 7)
