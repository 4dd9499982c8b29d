"""Fine-tuning that saves at a cluster's stop signal, so that ``--resume`` loses nothing.

detectron2's trainer leaves SIGTERM (a preemption, a time limit) to Python's default: the run
dies at once and ``--resume`` trains again every iteration since the last
``SOLVER.CHECKPOINT_PERIOD``; Slurm's warning signals (USR1/USR2, ``--signal``) end it the same
way. Here, as in pretraining (:mod:`pretrain.stop_signals`), every rank remembers the signal, all
ranks agree after the iteration in flight, rank 0 saves ``model_{iteration}.pth`` as
detectron2's periodic checkpointer names it (``last_checkpoint`` points at it), and training ends
with exit status 0. The workers of the train loader and of the evaluation's ignore the signals,
which would otherwise kill them mid-iteration (a periodic evaluation then ends before the save);
the train loader's are shut down when training ends however it ends. With
``--num-gpus`` above 1 the launching process ignores the signals too and waits for its ranks to
save: were it to die first, Slurm would take the job for finished and kill the ranks.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.utils.data import DataLoader

from pretrain.stop_signals import StopSignal, ignore_stop_signals, shut_down_workers

logger = logging.getLogger("detectron2_ext")


class TrainingStopped(BaseException):
    """Leaves detectron2's training loop after the stop signal's checkpoint is written.

    A ``BaseException``, like ``KeyboardInterrupt``: the loop's ``except Exception`` would log an
    ordinary exception as a failure, with its traceback.
    """

    def __init__(self, signal_name: str, checkpoint: str, iterations: int):
        super().__init__(f"{signal_name} received: saved {checkpoint} after {iterations} iterations")
        self.signal_name, self.checkpoint, self.iterations = signal_name, checkpoint, iterations


class SaveAtStopSignal(HookBase):
    """The last hook: after every iteration, whether any rank received a stop signal; if so, all
    stop there after rank 0 has saved. ``stop`` is installed by the trainer before it builds its
    model, so that a signal while the run sets up (model, data, checkpoint) is remembered and acted
    on after the first iteration. The final iteration is left to finish the run as usual (its
    checkpoint is ``model_final.pth``), and the final evaluation runs under the handlers from
    before: a signal then saves nothing more (a rank spawned by ``--num-gpus`` inherited the
    launcher's ignored signals and runs on until Slurm's SIGKILL)."""

    def __init__(self, stop: StopSignal):
        self._stop = stop

    def after_step(self):
        trainer = self.trainer
        if trainer.iter + 1 >= trainer.max_iter:
            self._stop.restore()
            return
        if not self._agreed(self._stop.received):
            return
        name = f"model_{trainer.iter:07d}"
        trainer.checkpointer.save(name, iteration=trainer.iter)  # rank 0 writes, atomically
        raise TrainingStopped(self._stop.name or "a stop signal", os.path.join(trainer.checkpointer.save_dir, f"{name}.pth"),
                              trainer.iter + 1)

    def after_train(self):
        self._stop.restore()

    def _agreed(self, received: bool) -> bool:
        """Whether any rank received a stop signal (every rank asks at every iteration)."""
        if comm.get_world_size() == 1:
            return received
        device = next(self.trainer.model.parameters()).device  # NCCL reduces only CUDA tensors
        flag = torch.tensor([float(received)], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0


class _IgnoringStopSignals:
    """A DataLoader ``worker_init_fn``: the stop signals are ignored, then the loader's own runs
    (detectron2's reseeds each worker)."""

    def __init__(self, then):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id)
        if self.then is not None:
            self.then(worker_id)


def torch_loader_within(loader) -> DataLoader | None:
    """The torch DataLoader that a detectron2 loader is (the test loader) or wraps (the train
    loader's aspect-ratio grouping keeps it as ``.dataset``, a batch collation around that as
    ``._dataset``), or None."""
    for _ in range(4):
        if isinstance(loader, DataLoader):
            return loader
        inner = getattr(loader, "dataset", None)
        loader = inner if inner is not None else getattr(loader, "_dataset", None)
    return None


def leave_stop_signals_to_main_process(loader):
    """Make the worker processes of a train or test loader ignore the stop signals; returns the loader."""
    found = torch_loader_within(loader)
    if found is None:
        logger.warning("stop signals: no torch DataLoader found in the loader (%s): a SIGTERM may kill its "
                       "workers before the run can save", type(loader).__name__)
    elif found.num_workers > 0:
        found.worker_init_fn = _IgnoringStopSignals(found.worker_init_fn)
    return loader


def shut_down_train_workers(trainer) -> None:
    """End the worker processes of a detectron2 trainer's train loader, if it started them, when
    training ends rather than at exit (where :mod:`pretrain.stop_signals` would kill them)."""
    iterator = getattr(trainer, "_data_loader_iter_obj", None)  # detectron2's SimpleTrainer
    if iterator is not None:
        shut_down_workers(iterator)
        trainer._data_loader_iter_obj = None
