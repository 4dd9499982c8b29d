"""Cluster launch on a real one-node Slurm (scripts/slurm/local_cluster.sh: slurmctld, slurmd,
munge; real sbatch, srun, scontrol and torchrun): scripts/slurm/pretrain.sbatch and
tools/submit_pretrain.py stop at the time-limit signal with a checkpoint written by the signal
path alone (the periodic checkpoint is out of reach), requeue, resume from exactly that
checkpoint; a preemption signal saves the same way; the requeued job finishes. Also
tools/submit_pretrain.py's job under submitit's local executor (no Slurm)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint_io import list_checkpoints, read_training_checkpoint
from pretrain.errors import BadValueError, MissingInputError
from tests.engine.conftest import PRETRAIN, REPO, TINY_CONFIG, subprocess_env
from tests.slurm_cluster import ENDED, job_info, release, wait_until
from virtex_d2.cluster import ClusterSettings, make_executor, submit_pretraining

SBATCH = REPO / "scripts" / "slurm" / "pretrain.sbatch"
SUBMIT = REPO / "tools" / "submit_pretrain.py"
ITERATIONS = 30
# At 0.1-0.2 s each (two tiny ranks on two cores), the time-limit signal, due within Slurm's 30-s
# check, lands mid-run and leaves the resumed run long enough to be preempted (with 240, a fast VM
# finished the resumed run before the preemption came).
SLURM_ITERATIONS = 600
OUT_OF_REACH = ["ENGINE.CHECKPOINT_PERIOD", "100000", "ENGINE.LOG_PERIOD", "20"]
LEAD_S = 120  # the time-limit signal's lead in the Slurm tests


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


def checkpoint_lines(output_dir: Path, marker: str) -> list[int]:
    """The checkpoint iterations named on rank 0's log lines that contain ``marker``."""
    log = (output_dir / "log_rank0.txt").read_text()
    return [int(m.group(1)) for line in log.splitlines() if marker in line
            for m in [re.search(r"checkpoint_(\d+)\.pth", line)] if m]


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
    stopped, resumed = checkpoint_lines(output, "received: saved"), checkpoint_lines(output, "resumed from")
    assert len(stopped) == 1 and 4 < stopped[0] < ITERATIONS and resumed == stopped
    assert "Requeued job" in Path(job.paths.stdout).read_text()  # submitit logs there
    assert list_checkpoints(output)[-1][0] == ITERATIONS
    assert read_training_checkpoint(output / f"checkpoint_{ITERATIONS}.pth")["world_size"] == 2


# --- on a real Slurm -------------------------------------------------------------------------

def training_started(output: Path, starts: int):
    """Whether rank 0 has entered the training loop for the ``starts``-th time (its stop-signal
    handlers are installed by then)."""
    log = output / "log_rank0.txt"
    return lambda: log.exists() and log.read_text().count("training iterations") >= starts


def seconds(runtime: str) -> int:
    days, _, clock = runtime.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def bring_time_limit_near(job_id: str) -> None:
    """Cut the running job's time limit so that fewer than LEAD_S seconds are left: Slurm's
    time-limit check (every 30 s) then sends the --signal as it would before a real limit."""
    elapsed = seconds(job_info(job_id)["RunTime"])
    minutes = elapsed // 60 + 2  # 60 to 120 s left
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)


def slurm_env() -> dict[str, str]:
    return {**subprocess_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def assert_stops_and_resumes(output: Path, signals: list[tuple[str, ...]]) -> None:
    """Rank 0's log: one stop per interruption, naming one of its ``signals``, each saving the
    only new checkpoint (with both ranks' state), each next start resuming from exactly that
    one; the run finished with both ranks."""
    stopped = checkpoint_lines(output, "received: saved")
    names = [line.split(" received: saved")[0].rsplit(" ", 1)[-1]
             for line in (output / "log_rank0.txt").read_text().splitlines() if " received: saved" in line]
    assert len(names) == len(signals) and all(name in allowed for name, allowed in zip(names, signals)), names
    assert checkpoint_lines(output, "resumed from") == stopped
    assert stopped == sorted(set(stopped)) and 0 < stopped[0] and stopped[-1] < SLURM_ITERATIONS, stopped
    assert [i for i, _ in list_checkpoints(output)] == [*stopped, SLURM_ITERATIONS]
    for iteration in [*stopped, SLURM_ITERATIONS]:  # every rank took part in each save
        saved = read_training_checkpoint(output / f"checkpoint_{iteration}.pth")
        assert (saved["iteration"], saved["world_size"], len(saved["rng"])) == (iteration, 2, 2)


@pytest.mark.slurm
def test_sbatch_template_on_slurm_saves_at_the_time_limit_and_at_preemption(slurm, tiny_overrides, tmp_path):
    """scripts/slurm/pretrain.sbatch with torchrun, 2 CPU ranks on 2 cores. (1) Slurm's
    B:USR1 before the time limit: the trap signals the step, both ranks stop after the same
    iteration, the checkpoint is written, the job requeues itself. (2) After the release,
    ``scontrol requeue`` of the running job (a preemption with PreemptMode=REQUEUE): every
    process, srun included, gets SIGTERM and KillWait (30 s) before SIGKILL; the ranks save
    within it. (3) Released again, it resumes and finishes."""
    output = tmp_path / "run"
    env = {**slurm_env(), "PRETRAIN_CHECKOUT": str(REPO), "PRETRAIN_RANKS_PER_NODE": "2"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--time=10", f"--signal=B:USR1@{LEAD_S}", "--cpus-per-task=2",
         f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", str(SBATCH), str(TINY_CONFIG), str(output),
         *tiny_overrides, "OPTIM.NUM_ITERATIONS", str(SLURM_ITERATIONS), *OUT_OF_REACH,
         "DATA.NUM_WORKERS", "1"],  # a preemption signals the DataLoader workers too
        check=True, env=env, capture_output=True, text=True)
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_until("training", training_started(output, 1), job_id)
        bring_time_limit_near(job_id)
        release(job_id, 1)
        wait_until("the resumed training", training_started(output, 2), job_id)
        subprocess.run(["scontrol", "requeue", job_id], check=True)  # what PreemptMode=REQUEUE does
        release(job_id, 2)
        wait_until("the end", lambda: job_info(job_id)["JobState"] in ENDED, job_id)
        slurm_log = Path(f"{tmp_path}/slurm-{job_id}.out").read_text()
        assert job_info(job_id)["JobState"] == "COMPLETED", slurm_log[-4000:]
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert slurm_log.count("time limit near") == 1, slurm_log[-4000:]
    assert f":{15000 + int(job_id) % 15000}" in re.search(r"rendezvous (\S+)", slurm_log).group(1)  # the job's own port
    assert_stops_and_resumes(output, [("SIGUSR1",), ("SIGTERM",)])


@pytest.mark.slurm
def test_submit_pretrain_on_slurm_saves_at_the_time_limit_and_at_preemption(slurm, tiny_overrides, tmp_path):
    """tools/submit_pretrain.py with submitit's SlurmExecutor, 2 tasks of 1 CPU. (1) Slurm's
    USR2 before the time limit: both training processes stop after the same iteration, rank 0's
    task waits for the checkpoint, then submitit requeues. (2) After the release, submitit's
    preemption (SIGTERM, then USR2): saved and requeued again; (3) it resumes and finishes."""
    output, logs = tmp_path / "run", tmp_path / "submitit"
    submitted = subprocess.run(
        [sys.executable, str(SUBMIT), "--config", str(TINY_CONFIG), "--output-dir", str(output), "--log-dir", str(logs),
         "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
         "--signal-delay", str(LEAD_S), "--max-requeues", "3",
         *tiny_overrides, "OPTIM.NUM_ITERATIONS", str(SLURM_ITERATIONS), *OUT_OF_REACH],
        check=True, env=slurm_env(), capture_output=True, text=True, cwd=tmp_path)
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    try:
        wait_until("training", training_started(output, 1), job_id)
        bring_time_limit_near(job_id)
        release(job_id, 1)
        wait_until("the resumed training", training_started(output, 2), job_id)
        for sig in ("TERM", "USR2"):  # submitit's own preemption (SlurmJob._interrupt)
            subprocess.run(["scancel", f"--signal={sig}", job_id], check=True)
        release(job_id, 2)
        wait_until("the end", lambda: job_info(job_id)["JobState"] in ENDED, job_id)
        task_logs = "\n".join(p.read_text() for p in sorted(logs.glob(f"{job_id}_*_log.*")))
        assert job_info(job_id)["JobState"] == "COMPLETED", task_logs[-4000:]
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert task_logs.count("Requeued job") == 2, task_logs[-4000:]
    # at the preemption both signals may be pending when Python runs its handlers (in signal order)
    assert_stops_and_resumes(output, [("SIGUSR2",), ("SIGTERM", "SIGUSR2")])


@pytest.mark.slurm
def test_slurm_executor_asks_for_nodes_gpus_cpus_partition_time_and_signal(slurm, tmp_path, monkeypatch):
    """The sbatch file submitit would submit (submitit needs a real srun on PATH to build it)."""
    settings = ClusterSettings(folder=str(tmp_path / "submitit"), nodes=4, gpus_per_node=8, cpus_per_task=12,
                               partition="gpu", time_min=2880, signal_delay_s=150, max_requeues=7)
    executor = make_executor(settings)
    text = executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --partition=gpu", "#SBATCH --time=2880",
                 "#SBATCH --signal=USR2@150", "--cpus-per-task 12"):
        assert line in text, text
    assert executor.max_num_timeout == 7
    with pytest.raises(BadValueError, match="--cpus-per-task must be at least 1, got 0"):
        make_executor(ClusterSettings(folder=str(tmp_path / "x"), cpus_per_task=0))
    with pytest.raises(BadValueError, match="--nodes: the local executor runs one node, not 2"):
        make_executor(ClusterSettings(folder=str(tmp_path / "x"), nodes=2, cluster="local"))
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm's commands
    with pytest.raises(MissingInputError, match="no srun on PATH"):
        make_executor(ClusterSettings(folder=str(tmp_path / "x")))
