"""Pretraining on a Slurm cluster with submitit: one task per GPU, requeued until it is done.

:func:`submit_pretraining` submits a :class:`PretrainingTask`; every task of the job (``nodes ×
gpus_per_node``) runs ``tools/pretrain.py --resume`` as one rank of the ``torch.distributed``
job, with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` taken
from Slurm by submitit. Always passing ``--resume`` makes every start, first or requeued,
continue from the newest usable checkpoint of the output folder. Each task asks for
``cpus_per_task`` cores (the rank and its DataLoader workers), also for its ``srun``, which in
Slurm 22.05 does not inherit the value from the batch script.

Interruptions (tried on a real one-node Slurm 22.05, ``tests/engine/test_cluster_launch.py``):

* **Time limit** (Slurm's ``--signal=USR2@signal_delay_s``, which submitit sets): Slurm sends USR2
  to every process of the step, the training processes included, which stop after the same
  iteration with a checkpoint (``pretrain.stop_signals.StopSignal``; all ranks agree). On rank 0
  submitit calls :meth:`PretrainingTask.checkpoint`, which also forwards the stop to its
  training process and waits for it to exit (so the checkpoint is on disk) before submitit
  requeues the job (``scontrol requeue``, which ends the step).
* **Preemption**: with a grace time Slurm sends SIGTERM to the tasks; the training processes
  save and exit, and Slurm requeues the job (PreemptMode=REQUEUE). submitit's own preemption
  (SIGTERM then USR2, ``job._interrupt()``) saves the same way and requeues.
* **A crash or SIGKILL**: the job fails; resubmitting it resumes from the newest checkpoint
  (at most ``ENGINE.CHECKPOINT_PERIOD`` iterations lost).

The training runs in a child process (not in submitit's own process) so that submitit's signal
handler can wait for it to finish its iteration and save instead of exiting in the middle of it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from pretrain.errors import BadValueError, MissingInputError

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 600  # how long rank 0 waits for its training process to save when signalled
DEFAULT_CPUS_PER_TASK = 8  # one rank and its DataLoader workers (DATA.NUM_WORKERS, 2 by default), with room


def _running(pid: int) -> bool:
    """Whether child ``pid`` still runs (reaping it if it ended); safe inside a signal handler."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # already reaped
        return False


@dataclass
class PretrainingTask(submitit.helpers.Checkpointable):
    """One rank of a pretraining job: ``script`` (tools/pretrain.py) on ``config`` into ``output_dir``."""

    script: str
    config: str
    output_dir: str
    overrides: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, self.script, "--config", self.config, "--output-dir", self.output_dir, "--resume",
                *self.overrides]

    def __call__(self) -> str:
        """Train this rank to the end (or to a stop); returns the output folder."""
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        self._process = subprocess.Popen(self.command())
        while (code := self._process.poll()) is None:  # polling, so that a signal handler may wait on it too
            time.sleep(1.0)
        if code != 0:
            raise RuntimeError(f"{' '.join(self.command())} exited with status {code}")
        return self.output_dir

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """On the time-limit/preemption signal: stop training after this iteration (it saves a
        checkpoint), then have submitit requeue the same task, which resumes from it."""
        process = getattr(self, "_process", None)
        if process is not None and _running(process.pid):
            logger.warning("signalled: stopping the training process %d after its iteration and waiting for its "
                           "checkpoint", process.pid)
            os.kill(process.pid, signal.SIGTERM)  # Slurm's USR2 may not reach it (a site signalling only the task)
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            while time.monotonic() < deadline and _running(process.pid):
                time.sleep(0.5)
            logger.warning("the training process %s; requeueing", "ended" if not _running(process.pid)
                           else f"did not end within {_STOP_TIMEOUT_S} s")
        return submitit.helpers.DelayedSubmission(PretrainingTask(self.script, self.config, self.output_dir,
                                                                  list(self.overrides)))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_process"}


@dataclass
class ClusterSettings:
    """Where and how large the job is. ``cluster`` is "slurm", or "local" to run the same tasks
    on this machine (submitit's local executor: one node, the time-limit signal simulated)."""

    folder: str  # submitit's job files and logs
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU (set it for CPU-only tasks)
    cpus_per_task: int = DEFAULT_CPUS_PER_TASK  # cores of one rank: itself and its DataLoader workers
    partition: str | None = None
    time_min: int = 24 * 60
    signal_delay_s: int = 300  # the time-limit signal comes this long before the end (docs/reliability.md)
    max_requeues: int = 20
    cluster: str = "slurm"
    slurm_extra: dict = field(default_factory=dict)  # more SlurmExecutor parameters (account, qos, ...)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(1, self.gpus_per_node)


def make_executor(settings: ClusterSettings) -> submitit.Executor:
    """A submitit executor for ``nodes × tasks`` tasks (one GPU each when there are GPUs)."""
    if settings.cluster == "local":
        if settings.nodes != 1:
            raise BadValueError(f"--nodes: the local executor runs one node, not {settings.nodes}")
        executor = submitit.LocalExecutor(settings.folder, max_num_timeout=settings.max_requeues)
        executor.update_parameters(tasks_per_node=settings.tasks, gpus_per_node=settings.gpus_per_node,
                                   timeout_min=settings.time_min, signal_delay_s=settings.signal_delay_s)
        return executor
    if settings.cluster != "slurm":
        raise ValueError(f"cluster must be 'slurm' or 'local', got '{settings.cluster}'")
    if settings.cpus_per_task < 1:
        raise BadValueError(f"--cpus-per-task must be at least 1, got {settings.cpus_per_task}")
    if shutil.which("srun") is None:
        raise MissingInputError("no srun on PATH: submit from a machine of the Slurm cluster, or pass --local")
    executor = submitit.SlurmExecutor(settings.folder, max_num_timeout=settings.max_requeues)
    executor.update_parameters(
        nodes=settings.nodes, ntasks_per_node=settings.tasks,
        **({"gpus_per_node": settings.gpus_per_node} if settings.gpus_per_node else {}),  # no GRES asked on CPU
        cpus_per_task=settings.cpus_per_task, srun_args=["--cpus-per-task", str(settings.cpus_per_task)],
        time=settings.time_min, signal_delay_s=settings.signal_delay_s, job_name="virtex-d2-pretrain",
        **({"partition": settings.partition} if settings.partition else {}), **settings.slurm_extra,
    )
    return executor


def submit_pretraining(
    settings: ClusterSettings, script: str | Path, config: str | Path, output_dir: str | Path, overrides: list[str]
) -> submitit.Job:
    """Submit the job; returns submitit's handle (``job.job_id``, ``job.stdout()``)."""
    task = PretrainingTask(str(Path(script).resolve()), str(Path(config).resolve()), str(Path(output_dir).resolve()),
                           list(overrides))
    job = make_executor(settings).submit(task)
    logger.info("submitted %s: %d node(s) × %d task(s), logs in %s", job.job_id, settings.nodes, settings.tasks,
                settings.folder)
    return job
