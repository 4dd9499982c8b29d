"""The train loader's side of a stop signal during fine-tuning (detectron2_ext/preemption.py):
its worker processes outlive the SIGTERM or USR1 that Slurm sends every process of the job, so
that the main process can finish its iteration and save, and they end when training leaves the
loader; the hook that saves and stops. The whole stop, on a real Slurm, is
tests/detectron2_ext/test_d2_slurm.py."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from detectron2_ext import load_config
from detectron2_ext.preemption import (
    SaveAtStopSignal,
    TrainingStopped,
    leave_stop_signals_to_main_process,
)
from detectron2_ext.vit_training import build_recipe_train_loader
from pretrain.stop_signals import StopSignal, shut_down_workers
from tests.tool_main import Tool

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2"


def test_train_loader_workers_outlive_the_stop_signals_and_end_with_the_loader(synthetic_root):
    cfg = load_config(CONFIGS / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml",
                      ["DATALOADER.NUM_WORKERS", "1", "SOLVER.IMS_PER_BATCH", "2"])
    batches = iter(leave_stop_signals_to_main_process(build_recipe_train_loader(cfg)))  # aspect-ratio grouped
    assert len(next(batches)) == 2
    (worker,) = multiprocessing.active_children()
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # as Slurm sends it: not from the parent
    subprocess.run(["kill", "-USR1", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()  # torch's worker dies of a SIGTERM that is not its parent's
    assert len(next(batches)) == 2  # and still loads
    shut_down_workers(batches)  # what the trainer does when training ends, however it ends
    worker.join(timeout=10)
    assert not worker.is_alive() and not multiprocessing.active_children()


def test_evaluation_workers_outlive_a_cluster_sigterm(synthetic_root):
    """A periodic evaluation's workers are left the stop signals too: they died of it, and the run
    with them before the hook could save."""
    cfg = load_config(CONFIGS / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml", ["DATALOADER.NUM_WORKERS", "1"])
    batches = iter(Tool("train_net").Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]))
    next(batches)
    (worker,) = multiprocessing.active_children()
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    shut_down_workers(batches)
    worker.join(timeout=10)
    assert not worker.is_alive()


def test_a_process_leaving_with_such_workers_alive_exits(tmp_path):
    """Python's multiprocessing ends the workers of a loader still iterated at exit (an iterator
    kept alive by a traceback, or a global) with a SIGTERM, which they ignore, then waits for
    them: the exit waited forever. Importing pretrain.stop_signals ends them with SIGKILL first."""
    script = ("import torch\nfrom pretrain.stop_signals import ignore_stop_signals\n"
              "batches = iter(torch.utils.data.DataLoader(range(8), num_workers=1, worker_init_fn=ignore_stop_signals))\n"
              "print(int(next(batches)))\n")
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                           env={**os.environ, "PYTHONPATH": str(CONFIGS.parents[1])})
    assert (ended.returncode, ended.stdout) == (0, "0\n"), ended.stderr[-2000:]


def test_a_signal_before_the_first_iteration_stops_training_after_it_with_a_checkpoint(tmp_path):
    """The trainer installs its StopSignal before it builds the model: a SIGTERM while the run
    sets up is remembered, and the hook stops after the first iteration with its checkpoint,
    named as detectron2's periodic one. The hook restores the handlers in ``after_train`` even
    when training never started (an earlier hook's ``before_train`` raised: it used to raise
    AttributeError over that error)."""
    previous = signal.getsignal(signal.SIGTERM)
    hook = SaveAtStopSignal(StopSignal())
    os.kill(os.getpid(), signal.SIGTERM)  # during set-up: no hook has run yet
    saved = []
    checkpointer = SimpleNamespace(save_dir=str(tmp_path), save=lambda name, **extra: saved.append((name, extra)))
    hook.trainer = SimpleNamespace(iter=0, max_iter=10, checkpointer=checkpointer)
    try:
        with pytest.raises(TrainingStopped, match=r"^SIGTERM received: saved .*/model_0000000\.pth after 1 iterations$"):
            hook.after_step()
        assert saved == [("model_0000000", {"iteration": 0})]
    finally:
        hook.after_train()
    assert signal.getsignal(signal.SIGTERM) is previous
    SaveAtStopSignal(StopSignal()).after_train()  # before_train never ran
    assert signal.getsignal(signal.SIGTERM) is previous
