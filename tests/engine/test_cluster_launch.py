"""Cluster launch: tools/submit_pretrain.py's submitit job (with submitit's local executor on the
CPU) and scripts/slurm/pretrain.sbatch (with stand-ins for srun and scontrol) stop at the
time-limit signal with a checkpoint, requeue, and resume from the newest checkpoint."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint_io import list_checkpoints, read_training_checkpoint
from tests.engine.conftest import PRETRAIN, REPO, TINY_CONFIG, subprocess_env
from virtex_d2.pipeline.cluster import (
    ClusterSettings,
    make_executor,
    submit_pretraining,
)

SBATCH = REPO / "scripts" / "slurm" / "pretrain.sbatch"
ITERATIONS = 30


def wait_for(path: Path, process_alive, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process_alive(), f"the job ended before {path.name} was written"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_and_resume_lines(output_dir: Path) -> tuple[int, int]:
    """The iteration the first start stopped at (SIGTERM) and the one the next start resumed from."""
    log = (output_dir / "log_rank0.txt").read_text()
    stopped = [int(line.split("checkpoint_")[1].split(".pth")[0]) for line in log.splitlines()
               if "SIGTERM received: saved" in line]
    resumed = [int(line.split("checkpoint_")[1].split(".pth")[0]) for line in log.splitlines()
               if "resumed from" in line]
    assert len(stopped) == 1 and len(resumed) == 1, log[-3000:]
    return stopped[0], resumed[0]


def test_submitit_job_requeues_at_the_signal_and_resumes_from_the_newest_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    """2 CPU ranks under submitit's local executor. After checkpoint_4 both tasks get USR2 (what
    Slurm's --signal sends): rank 0's training stops after its iteration with a checkpoint (every
    rank agrees), submitit requeues, and the new start resumes from that checkpoint to the end."""
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    output = tmp_path / "run"
    overrides = [*tiny_overrides, "OPTIM.NUM_ITERATIONS", str(ITERATIONS), "ENGINE.CHECKPOINT_PERIOD", "4"]
    settings = ClusterSettings(folder=str(tmp_path / "submitit"), gpus_per_node=0, tasks_per_node=2, time_min=30,
                               signal_delay_s=10, max_requeues=3, cluster="local")
    job = submit_pretraining(settings, PRETRAIN, TINY_CONFIG, output, overrides)
    wait_for(output / "checkpoint_4.pth", lambda: job.state == "RUNNING")
    tasks = children(job._process.pid)
    assert len(tasks) == 2
    for task in tasks:
        os.kill(task, signal.SIGUSR2)
    deadline = time.monotonic() + 300
    while job.state == "RUNNING":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.5)
    assert job.results() == [str(output), str(output)]
    stopped, resumed = stop_and_resume_lines(output)
    assert 4 < stopped < ITERATIONS and resumed == stopped
    assert "Requeued job" in Path(job.paths.stdout).read_text()  # submitit logs there
    assert list_checkpoints(output)[-1][0] == ITERATIONS
    assert read_training_checkpoint(output / f"checkpoint_{ITERATIONS}.pth")["world_size"] == 2


def test_slurm_executor_gets_nodes_gpus_partition_time_and_signal(tmp_path, monkeypatch):
    """The sbatch file submitit would submit (built with a stand-in srun on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    settings = ClusterSettings(folder=str(tmp_path / "submitit"), nodes=4, gpus_per_node=8, partition="gpu",
                               time_min=2880, signal_delay_s=150, max_requeues=7)
    executor = make_executor(settings)
    text = executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --signal=USR2@150"):
        assert line in text, text
    assert executor.max_num_timeout == 7
    with pytest.raises(ValueError, match="the local executor runs one node, not 2"):
        make_executor(ClusterSettings(folder=str(tmp_path / "x"), nodes=2, cluster="local"))


def fake_slurm(tmp_path: Path) -> tuple[Path, Path]:
    """``srun`` that runs its command here and ``scontrol`` that answers for one node and records
    a requeue; returns the bin folder and the requeue record."""
    bin_dir, record = tmp_path / "bin", tmp_path / "requeued.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [[ $1 == show ]]; then echo localhost; else echo "$@" >> {record}; fi\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir, record


def test_sbatch_template_stops_requeues_and_resumes(tiny_overrides, tmp_path):
    """The template on one 'node' with 2 CPU ranks: USR1 (its --signal) stops training with a
    checkpoint and requeues the job; the requeued start resumes from it and finishes."""
    bin_dir, record = fake_slurm(tmp_path)
    env = {**subprocess_env(), "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "2",
           "PRETRAIN_CHECKOUT": str(REPO), "PRETRAIN_PORT": str(free_port())}
    output = tmp_path / "run"
    command = ["bash", str(SBATCH), str(TINY_CONFIG), str(output), *tiny_overrides,
               "OPTIM.NUM_ITERATIONS", str(ITERATIONS), "ENGINE.CHECKPOINT_PERIOD", "4"]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(output / "checkpoint_4.pth", lambda: job.poll() is None)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0, out[-3000:]
    assert "time limit near" in out and record.read_text().split() == ["requeue", "4242"]
    assert list_checkpoints(output)[-1][0] < ITERATIONS
    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    stopped, resumed = stop_and_resume_lines(output)
    assert 4 <= stopped < ITERATIONS and resumed == stopped
    assert list_checkpoints(output)[-1][0] == ITERATIONS
