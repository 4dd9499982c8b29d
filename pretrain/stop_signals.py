"""A cluster's stop signals, left to the main process of a training run, which saves first.

At a preemption or a time limit Slurm signals every process of the job step, DataLoader workers
included. torch's workers die of a SIGTERM that did not come from their parent, and the main
process then raises "DataLoader worker ... is killed by signal" in the middle of an iteration,
before it can save: the run ends with status 1 and loses every iteration since the last periodic
checkpoint. So the workers of a training loader ignore the stop signals, and the main process
remembers them (:class:`StopSignal`) until the end of the iteration, saves and stops. The loops
shut their workers down themselves whenever they leave a loader; and since Python's
multiprocessing ends the children left at exit (a loader's iterator kept alive by a traceback)
with a SIGTERM they would ignore, and then waits for them, a process importing this module ends
them at exit with SIGKILL first. (Ignoring the signals process-wide is what holds in a worker
whichever way it was started: a worker spawned by a spawned rank runs threads of its own from its
first import, which a per-thread mask would not cover.) Pretraining's loop (``pretrain.engine``)
and detectron2 fine-tuning (``detectron2_ext``) both stop this way.
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # first: its exit function is registered before ours
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class StopSignal:
    """Remembers a stop request until the loop acts on it: SIGTERM (what Slurm sends the tasks at a
    preemption or at the end of a job) or SIGUSR1/SIGUSR2 (Slurm's ``--signal`` warning before the
    time limit: scripts/slurm/pretrain.sbatch asks for USR1, submitit for USR2). Without a handler
    the USR signals would end the process at once, losing the iteration and the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received = False
        self.name = ""
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = True
        self.name = self.name or signal.Signals(signum).name

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Leave the stop signals to other processes: a DataLoader ``worker_init_fn`` (its main
    process acts on them), or a launcher waiting for ranks that act on them. Processes spawned
    from here start with them ignored, until a :class:`StopSignal` of their own."""
    for signum in StopSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    """At exit, before Python's multiprocessing ends its daemonic children with a SIGTERM and
    waits for them: end them with SIGKILL, which workers ignoring SIGTERM cannot outlive."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# Registered after multiprocessing's own exit function (imported above), so it runs before it.
atexit.register(_kill_daemonic_children)


def shut_down_workers(batches: Iterator) -> None:
    """End the worker processes behind an iterator over a loader now, not at exit."""
    # torch's multi-process iterator has no public way to end its workers now; PyTorch
    # Lightning calls this method the same way. A generator (a stream, detectron2's batching of
    # a loader) closes its own, and the loader's iterator it holds goes with it.
    shut_down = getattr(batches, "_shutdown_workers", None) or getattr(batches, "close", None)
    if shut_down is not None:
        shut_down()


@contextmanager
def batches_of(loader: Iterable) -> Iterator[Iterator]:
    """An iterator over ``loader`` whose worker processes are shut down when the block ends,
    however it ends (an exception's traceback would otherwise keep them alive until exit)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shut_down_workers(batches)
