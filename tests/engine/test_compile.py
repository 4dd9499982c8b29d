"""ENGINE.COMPILE: when ``auto`` compiles, the compiled step against the eager one, the fallback
to eager, and compiled runs through SIGKILL + ``--resume`` and under 2-rank DDP (equal to one process).

The step tests use the tiny config's real captioning model on a real batch of the built-in
dataset, with dropout off: compiled kernels draw their random numbers differently from eager
ones, so with dropout on the two steps would differ by design, not by error. Tolerances: fp32
loss within 1e-5 and every gradient within 1e-4 of its norm; bf16, whose rounding depends on
which operations a kernel fuses, loss within 2e-2 and gradients within 5e-2 of their norm.
"""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint_io import list_checkpoints, read_training_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistContext
from pretrain.engine.compile import decide_compile
from pretrain.engine.setup import build_training
from pretrain.tasks import build_dataset, build_model
from pretrain.tokenizer import SentencePieceBPETokenizer
from tests.engine.conftest import PRETRAIN, TINY_CONFIG, run_pretrain, subprocess_env
from tests.engine.test_faults import start_and_interrupt

CPU = torch.device("cpu")
COMPILE_ON = ["ENGINE.COMPILE", "True"]


def test_auto_compiles_long_runs_on_a_device_with_a_compiler(monkeypatch):
    assert decide_compile("auto", CPU, 5000, 2000).compile
    short = decide_compile("auto", CPU, 600, 2000)
    assert not short.compile and "600 iterations left, fewer than the ENGINE.COMPILE_MIN_ITERATIONS 2000" in short.reason
    assert decide_compile("true", CPU, 8, 2000).compile and not decide_compile("false", CPU, 10**6, 2000).compile
    monkeypatch.setenv("PATH", "/nonexistent")
    for setting in ("auto", "true"):
        decision = decide_compile(setting, CPU, 10**6, 2000)
        assert not decision.compile and "no C++ compiler" in decision.reason


def test_compile_setting_reads_true_false_and_auto_and_names_a_bad_value(tmp_path):
    assert load_config().ENGINE.COMPILE == "auto"
    assert load_config(overrides=COMPILE_ON).ENGINE.COMPILE == "true"
    config = tmp_path / "c.yaml"
    config.write_text(f"_BASE_: {TINY_CONFIG}\nENGINE:\n  COMPILE: False\n")
    assert load_config(str(config)).ENGINE.COMPILE == "false"
    with pytest.raises(ConfigError, match=r"command line: ENGINE.COMPILE is 'sometimes', not one of auto, true, false"):
        load_config(overrides=["ENGINE.COMPILE", "sometimes"])


def tiny_training(tiny_overrides, *overrides, compile_model=False):
    """The tiny config's model and training objects on the CPU, and a real batch of 4."""
    cfg = load_config(str(TINY_CONFIG), [*tiny_overrides, "MODEL.TEXTUAL.DROPOUT", "0.0", *overrides])
    torch.manual_seed(0)
    training = build_training(cfg, DistContext(0, 0, 1, CPU), build_model(cfg), compile_model=compile_model)
    dataset = build_dataset(cfg, "train", SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL))
    torch.manual_seed(1)
    from pretrain.data import collate_fn

    return training, collate_fn([dataset[i] for i in range(4)])


def gradients(training) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in training.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision,loss_tol,grad_tol", [("fp32", 1e-5, 1e-4), ("bf16", 2e-2, 5e-2)])
def test_compiled_step_gives_the_eager_loss_and_gradients(tiny_overrides, precision, loss_tol, grad_tol):
    amp = ["AMP", "True", "AMP_DTYPE", "bf16"] if precision == "bf16" else []
    eager, batch = tiny_training(tiny_overrides, *amp)
    compiled, _ = tiny_training(tiny_overrides, *amp, compile_model=True)
    assert compiled.compiled and not eager.compiled
    for _ in range(2):  # the second step runs the kernels built by the first
        eager.optimizer.zero_grad(set_to_none=True)
        compiled.optimizer.zero_grad(set_to_none=True)
        eager_loss = eager.forward_backward(batch)["loss"]
        compiled_loss = compiled.forward_backward(batch)["loss"]
        assert compiled.compiled, "the compiled step fell back to eager"
        assert abs(float(compiled_loss) - float(eager_loss)) <= loss_tol
        expected, got = gradients(eager), gradients(compiled)
        assert expected.keys() == got.keys() and len(expected) > 50
        for name, grad in expected.items():
            error = float((got[name].float() - grad.float()).norm())
            assert error <= grad_tol * max(float(grad.float().norm()), 1e-3), f"{name}: gradient off by {error}"


def test_a_step_that_fails_to_compile_falls_back_to_eager_with_one_warning(tiny_overrides, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("this backend cannot compile the graph")

    eager, batch = tiny_training(tiny_overrides)
    training, _ = tiny_training(tiny_overrides)
    training.train_model = torch.compile(training.eager_model, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="pretrain.engine"):
        losses = training.forward_backward(batch)
        training.forward_backward(batch)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "this backend cannot compile the graph" in warnings[0], warnings
    assert not training.compiled
    assert float(losses["loss"]) == float(eager.forward_backward(batch)["loss"])


def assert_same_state(run: Path, reference: Path, iteration: int) -> None:
    ours = read_training_checkpoint(run / f"checkpoint_{iteration}.pth")
    theirs = read_training_checkpoint(reference / f"checkpoint_{iteration}.pth")
    torch.testing.assert_close(ours["model"], theirs["model"], rtol=0, atol=0)
    torch.testing.assert_close(ours["optimizer"]["inner"]["state"], theirs["optimizer"]["inner"]["state"], rtol=0, atol=0)


def test_compiled_run_killed_and_resumed_ends_with_the_uninterrupted_weights(tiny_overrides, tmp_path):
    """SIGKILL after checkpoint_2, then ``--resume``: the final weights equal an uninterrupted
    compiled run's exactly (same kernels, every RNG state checkpointed)."""
    overrides = [*tiny_overrides, *COMPILE_ON]
    result = run_pretrain(tmp_path / "reference", overrides)
    assert "torch.compile on (ENGINE.COMPILE True)" in result.stderr
    assert "compilation included" in result.stderr and "without compilation" not in result.stderr
    process = start_and_interrupt(tmp_path / "run", overrides, signal.SIGKILL, after=2)
    assert process.returncode == -signal.SIGKILL and list_checkpoints(tmp_path / "run")[-1][0] < 8
    run_pretrain(tmp_path / "run", overrides, resume=True)
    assert_same_state(tmp_path / "run", tmp_path / "reference", 8)


def test_two_rank_ddp_trains_compiled_as_one_process_accumulating(tiny_overrides, tmp_path):
    """2 compiled ranks × 2 images against 1 compiled process × 4 images in 2 accumulated chunks
    of 2, as ``test_ddp_two_gloo_processes_equal_one_process`` does eagerly: both run the same
    compiled kernels on chunks of 2, so only the all-reduce's float32 summation order differs
    (rtol 1e-4, atol 1e-6 on every parameter after 4 steps). A compiled model outside DDP's
    gradient averaging would leave each rank's weights its own."""
    common = [*tiny_overrides, *COMPILE_ON, "MODEL.TEXTUAL.DROPOUT", "0.0", "OPTIM.NUM_ITERATIONS", "4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_pretrain(single, [*common, "ENGINE.GRAD_ACCUM_STEPS", "2"])
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(PRETRAIN), "--config", str(TINY_CONFIG),
         "--output-dir", str(ddp), *common],
        env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "torch.compile on" in result.stderr and "without compilation" not in result.stderr
    ours, reference = read_training_checkpoint(ddp / "checkpoint_4.pth"), read_training_checkpoint(single / "checkpoint_4.pth")
    assert ours["world_size"] == 2
    params = [name for name, t in reference["model"].items() if "running_" not in name and "num_batches" not in name]
    for name in params:
        torch.testing.assert_close(ours["model"][name], reference["model"][name], rtol=1e-4, atol=1e-6, msg=name)
    earlier = read_training_checkpoint(single / "checkpoint_2.pth")["model"]
    assert max((earlier[n] - reference["model"][n]).abs().max().item() for n in params) > 1e-3
