"""DataLoader workers that outlive a cluster's stop signal until the main process has saved.

At a preemption or a time limit Slurm signals every process of the job step, DataLoader
workers included. torch's workers die of a SIGTERM that did not come from their parent, and
the main process then raises "DataLoader worker ... is killed by signal" in the middle of an
iteration, before it can save: the run ends with status 1 and loses every iteration since the
last periodic checkpoint. So pretraining's workers ignore the stop signals, which the main
process alone acts on (:class:`~pretrain.engine.step.StopSignal`), and the main process shuts
its workers down itself whenever it leaves a loader: a worker that ignores SIGTERM is no longer
ended by the ``terminate()`` that Python's multiprocessing sends its children at exit.
"""
from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pretrain.engine.step import StopSignal


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the stop signals are the main process's to act on."""
    for signum in StopSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def batches_of(loader: Iterable) -> Iterator[Iterator]:
    """An iterator over ``loader`` whose worker processes are shut down when the block ends,
    however it ends (an exception's traceback would otherwise keep them alive until exit)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        # torch's multi-process iterator has no public way to end its workers now; PyTorch
        # Lightning calls this method the same way. A generator (a stream) closes its own.
        shut_down = getattr(batches, "_shutdown_workers", None) or getattr(batches, "close", None)
        if shut_down is not None:
            shut_down()
