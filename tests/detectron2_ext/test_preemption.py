"""The train loader's side of a stop signal during fine-tuning (detectron2_ext/preemption.py):
its worker processes outlive the SIGTERM or USR1 that Slurm sends every process of the job, so
that the main process can finish its iteration and save, and they end when training leaves the
loader. The whole stop, on a real Slurm, is tests/detectron2_ext/test_d2_slurm.py."""
import multiprocessing
import os
import signal
import time
from pathlib import Path

from detectron2_ext import load_config
from detectron2_ext.preemption import leave_stop_signals_to_main_process
from detectron2_ext.vit_training import build_recipe_train_loader
from pretrain.stop_signals import shut_down_workers

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2"


def test_train_loader_workers_outlive_the_stop_signals_and_end_with_the_loader(synthetic_root):
    cfg = load_config(CONFIGS / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml",
                      ["DATALOADER.NUM_WORKERS", "1", "SOLVER.IMS_PER_BATCH", "2"])
    batches = iter(leave_stop_signals_to_main_process(build_recipe_train_loader(cfg)))  # aspect-ratio grouped
    assert len(next(batches)) == 2
    (worker,) = multiprocessing.active_children()
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(worker.pid, signum)
    time.sleep(0.5)
    assert worker.is_alive()  # torch's worker dies of a SIGTERM that is not its parent's
    assert len(next(batches)) == 2  # and still loads
    shut_down_workers(batches)  # what the trainer does when training ends, however it ends
    worker.join(timeout=10)
    assert not worker.is_alive() and not multiprocessing.active_children()
