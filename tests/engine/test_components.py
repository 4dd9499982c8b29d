"""Unit tests of the engine's parts: schedule, optimiser, Lookahead, checkpoints, sampling, metrics."""
from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch

from pretrain import precision
from pretrain.caption_metrics import caption_metrics, text_for_scoring
from pretrain.checkpoint_io import (
    CheckpointError,
    list_checkpoints,
    read_training_checkpoint,
)
from pretrain.config import ConfigError
from pretrain.distributed import get_rng_state, seed_everything, set_rng_state
from pretrain.engine.checkpoint import CheckpointManager
from pretrain.engine.optim import Lookahead, build_optimizer, build_param_groups
from pretrain.engine.sampling import IterationBatchSampler, SeededDataset
from pretrain.errors import BadValueError
from pretrain.schedule import build_lr_scheduler, lr_multiplier
from pretrain.tokenizer import strip_special
from tests.engine.conftest import REPO
from tests.engine.standin import StandInDataset, StandInModel, standin_config


def test_warmup_then_cosine_matches_official_formula():
    f = lr_multiplier("cosine", total_steps=100, warmup_steps=10)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    for step in (10, 37, 55, 99, 100, 150):
        progress = min(1.0, (step - 10) / 90)
        assert f(step) == pytest.approx(math.cos(math.pi / 2 * progress) ** 2, abs=1e-12)


def test_linear_multistep_and_none():
    assert lr_multiplier("linear", 110, 10)(60) == pytest.approx(0.5)
    step = lr_multiplier("multistep", 100, 10, [30, 60], 0.1)
    assert [step(s) for s in (10, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_multiplier("none", 100, 0)(50) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("poly", 100, 0)


def test_param_groups_follow_official_lr_and_no_decay_rules():
    cfg = standin_config()
    groups = {g["name"]: g for g in build_param_groups(cfg, StandInModel())}
    assert set(groups) == {"cnn", "textual", "textual_no_decay"}
    assert groups["cnn"]["lr"] == cfg.OPTIM.CNN_LR and groups["cnn"]["weight_decay"] == cfg.OPTIM.WEIGHT_DECAY
    # The official regex exempts textual.{embedding,transformer} biases and norms; the output
    # layer (and the embedding weight) keep weight decay.
    model = StandInModel()
    names = dict(model.named_parameters())
    no_decay = {id(p) for p in build_param_groups(cfg, model)[2]["params"]}
    assert {n for n, p in names.items() if id(p) in no_decay} == {
        "textual.transformer.linear.bias",
        "textual.transformer.norm.weight",
        "textual.transformer.norm.bias",
    }


def test_lookahead_matches_reference_update():
    torch.manual_seed(0)
    model = StandInModel(dropout=0.0)
    cfg = standin_config(**{"OPTIM.LOOKAHEAD.STEPS": 3})
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, Lookahead)
    reference = [p.detach().clone() for p in model.parameters()]
    slow = [p.clone() for p in reference]
    momentum = [torch.zeros_like(p) for p in reference]
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wds = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for step in range(1, 8):
        grads = [torch.randn_like(p) for p in reference]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.step()
        for i, (p, g) in enumerate(zip(model.parameters(), grads)):
            d = g + wds[id(p)] * reference[i]
            momentum[i] = d if step == 1 else 0.9 * momentum[i] + d
            reference[i] = reference[i] - lrs[id(p)] * momentum[i]
        if step % 3 == 0:
            for i in range(len(reference)):
                slow[i] = slow[i] + 0.5 * (reference[i] - slow[i])
                reference[i] = slow[i].clone()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)


def test_lookahead_state_round_trip_and_official_format():
    torch.manual_seed(0)
    cfg = standin_config()
    model = StandInModel()
    optimizer = build_optimizer(cfg, model)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
    state = optimizer.state_dict()
    assert state["step_count"] == 3 and len(state["slow"]) == len(list(model.parameters()))
    # No copy of the slow weights at checkpoint time (it would double their memory).
    assert all(s.data_ptr() == live.data_ptr() for s, live in zip(state["slow"], optimizer.slow))
    restored = build_optimizer(cfg, model)
    restored.load_state_dict(state)
    assert restored.step_count == 3
    for a, b in zip(restored.slow, optimizer.slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Official format: the inner SGD state alone, one group per parameter in named_parameters order.
    params = list(model.parameters())
    official = {
        "state": {i: {"momentum_buffer": torch.full_like(p, float(i))} for i, p in enumerate(params)},
        "param_groups": [{"params": [i], "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0} for i in range(len(params))],
    }
    fresh = build_optimizer(cfg, model)
    fresh.load_state_dict(official)
    for i, p in enumerate(params):
        assert torch.equal(fresh.inner.state[p]["momentum_buffer"], torch.full_like(p, float(i)))
    assert fresh.step_count == 0 and torch.equal(fresh.slow[0], params_in_group_order(fresh)[0].detach())


def params_in_group_order(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def test_scheduler_starts_at_zero_and_reaches_full_lr():
    cfg = standin_config()
    optimizer = build_optimizer(cfg, StandInModel())
    scheduler = build_lr_scheduler(cfg, optimizer.inner)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == 0.0 and seen[3] == pytest.approx(cfg.OPTIM.CNN_LR)


def test_checkpoint_keep_last_pinned_and_corrupt_fallback(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2, pinned=[1])
    for it in range(1, 6):
        manager.save(it, {"model": {"w": torch.full((2,), float(it))}})
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1, 4, 5]
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"
    # Truncate the newest: it is reported by path and the previous one is used.
    newest = tmp_path / "checkpoint_5.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checkpoint_5.pth"):
        read_training_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        state = manager.choose_latest()
    assert state["iteration"] == 4 and torch.equal(state["model"]["w"], torch.full((2,), 4.0))
    assert "checkpoint_5.pth" in caplog.text and "resuming from" in caplog.text
    # A valid file that is not a checkpoint dict is rejected too.
    torch.save({"weights": 1}, tmp_path / "checkpoint_9.pth")
    with pytest.raises(CheckpointError, match="lacks"):
        read_training_checkpoint(tmp_path / "checkpoint_9.pth")


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "checkpoint_1.pth"
    torch.save({"model": {}, "iteration": 1, "evil": random.Random()}, path)
    with pytest.raises(CheckpointError, match="checkpoint_1.pth"):
        read_training_checkpoint(path)


def test_batches_depend_only_on_seed_and_iteration():
    def flat(world, start=0):
        samplers = [IterationBatchSampler(50, 8, r, world, 7, 20, start) for r in range(world)]
        per_rank = [list(s) for s in samplers]
        return [[pair for r in range(world) for pair in per_rank[r][i]] for i in range(len(per_rank[0]))]

    single = flat(1)
    assert flat(2) == single and flat(4) == single
    assert flat(1, start=9) == single[9:]
    # Each epoch (6 batches of 8 from 50) has no repeated image; the next epoch reshuffles.
    first_epoch = [index for batch in single[:6] for _, index in batch]
    assert len(set(first_epoch)) == 48
    assert [i for _, i in single[6]] != [i for _, i in single[0]]
    with pytest.raises(ValueError, match="not divisible"):
        IterationBatchSampler(50, 6, 0, 4, 0, 10)


def test_seeded_dataset_is_reproducible_and_leaves_caller_rng_alone():
    data = SeededDataset(StandInDataset())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = data[(42, 3)]["caption_tokens"]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, data[(42, 3)]["caption_tokens"])


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    seed_everything(5)
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.save({"rng": [state]}, tmp_path / "rng.pth")
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"][0])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_caption_metrics():
    refs = {1: ["a cat sits on a mat", "a cat on the mat"], 2: ["two dogs play in a park", "dogs playing"]}
    perfect = caption_metrics({1: "a cat sits on a mat", 2: "Two dogs play in a park."}, refs)
    poor = caption_metrics({1: "a dog", 2: "a cat"}, refs)
    assert perfect["BLEU-4"] > 0.9 and perfect["CIDEr-D"] > poor["CIDEr-D"] >= 0
    assert text_for_scoring("A Dog, running!") == "a dog running"
    assert strip_special([1, 5, 0, 6, 2, 7], eos_index=2, first_word_index=4) == [5, 6]
    with pytest.raises(BadValueError, match="no reference"):  # bad input (a references file), not a bug
        caption_metrics({3: "x"}, refs)


def test_indivisible_batch_is_a_clear_error(tmp_path):
    from pretrain.distributed import DistContext
    from pretrain.engine.trainer import train

    cfg = standin_config(**{"OPTIM.BATCH_SIZE": 6, "ENGINE.GRAD_ACCUM_STEPS": 4})
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"OPTIM.BATCH_SIZE is 6; must be divisible by 1 rank\(s\) x ENGINE.GRAD_ACCUM_STEPS 4"):
        train(cfg, tmp_path, ctx, StandInModel(), StandInDataset(), collate_fn=list)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_automatic_precision_follows_the_hardware(monkeypatch, caplog, native_bf16):
    """bf16 only where the CPU computes it natively (emulated bf16 is slower than fp32), fp16 on
    accelerators, forced types as asked, and a clear error for an unknown one."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="pretrain.precision"):
        assert precision.autocast_dtype(True, cpu) == (torch.bfloat16 if native_bf16 else None)
    assert ("no native bf16" in caplog.text) is not native_bf16
    assert precision.autocast_dtype(True, cuda) == torch.float16
    assert precision.autocast_dtype(True, cpu, "bf16") == torch.bfloat16
    assert precision.autocast_dtype(True, cuda, "bf16") == torch.bfloat16
    assert precision.autocast_dtype(False, cpu, "bf16") is None
    with pytest.raises(ValueError, match="AMP_DTYPE 'fp8'"):
        precision.autocast_dtype(True, cpu, "fp8")


@pytest.mark.parametrize("opt_out", [None, {"MALLOC_MMAP_MAX_": "65536"}, {"VIRTEX_D2_MALLOC": "default"}])
def test_launcher_reexecutes_with_the_best_allocator(tmp_path, opt_out):
    """A launcher process replaces itself with tcmalloc preloaded where it is installed (else
    tuned glibc) and reports it; ``MALLOC_MMAP_MAX_`` or ``VIRTEX_D2_MALLOC=default`` keeps the
    allocator the user chose."""
    import os
    import subprocess
    import sys

    from pretrain.malloc import find_tcmalloc

    script = tmp_path / "launcher.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pretrain.malloc import allocator_in_use, reexec_with_tuned_malloc\n"
        "reexec_with_tuned_malloc()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(allocator_in_use(), 'libtcmalloc' in maps)\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "VIRTEX_D2_MALLOC") and not k.startswith("MALLOC_")}
    env.update(opt_out or {})
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    if opt_out:
        expected = "glibc-custom False" if "MALLOC_MMAP_MAX_" in opt_out else "glibc-default False"
    else:
        expected = "tcmalloc True" if find_tcmalloc() else "glibc-tuned False"
    assert out.split() == expected.split()


def test_the_log_line_says_its_losses_are_medians_of_the_last_iterations():
    """Each loss of the log line is the median of its own window, so ``loss`` need not be the
    sum of the per-head medians beside it: the line says so, and over how many iterations."""
    from pretrain.engine.monitor import TrainingMonitor

    monitor = TrainingMonitor("unused", is_main=False, start_iteration=0, num_iterations=30)
    for forward, backward in [(1.0, 5.0), (5.0, 1.0), (2.0, 2.0)]:
        monitor.update(loss=forward + backward, captioning_forward=forward, captioning_backward=backward)
    assert monitor.loss_summary() == (
        "loss 6.0000, captioning_forward 2.0000, captioning_backward 2.0000 (medians of the last 3 iterations)")
    for _ in range(25):
        monitor.update(loss=1.0, captioning_forward=0.5, captioning_backward=0.5)
    assert monitor.loss_summary().endswith("(medians of the last 20 iterations)")
