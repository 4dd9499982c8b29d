"""tools/train_net.py on a real one-node Slurm through scripts/slurm/train_net.sbatch: the
time-limit signal and a preemption each end training with a checkpoint of the iteration it
stopped at (the periodic checkpoint is out of reach), and the requeued job resumes from exactly
there. detectron2 alone saved nothing at either: its process died of the signal."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.detectron2_ext.test_d2_train_net import (
    CPU_CONFIGS,
    NO_PRECISE_BN,
    REPO,
    SMALL,
)
from tests.slurm_cluster import job_info, release, wait_until
from virtex_d2.cli import DEBUG_VARIABLE

SBATCH = REPO / "scripts" / "slurm" / "train_net.sbatch"
MAX_ITER = 5000  # never reached: the test ends the job after its second stop


def progress(slurm_log: Path, restart: int) -> int:
    """The iterations trained so far by the job's start number ``restart``, as its progress bar
    shows them (0 before its first iteration)."""
    text = slurm_log.read_text() if slurm_log.exists() else ""
    start = text.find(f"(restart {restart})")
    return max((int(n) for n in re.findall(rf"(\d+)/{MAX_ITER} \[", text[start:])), default=0) if start >= 0 else 0


def stops(run: Path) -> list[tuple[str, int, int]]:
    """(signal, checkpoint iteration, iterations trained) of each stop in rank 0's log."""
    found = re.findall(r"(SIG\w+) received: saved \S+model_(\d+)\.pth after (\d+) iterations",
                       (run / "log.txt").read_text())
    return [(name, int(saved), int(trained)) for name, saved, trained in found]


@pytest.mark.slurm
def test_train_net_sbatch_saves_at_the_time_limit_and_at_preemption_and_resumes_there(slurm, synthetic_root, tmp_path):
    """2 CPU ranks with a DataLoader worker each. (1) The time-limit signal as Slurm's
    ``--signal=B:USR1`` delivers it, to the batch script (``scancel --batch``): the script passes
    USR1 to the ranks, both stop after the same iteration, rank 0 saves, the job requeues. (2)
    Released, the job resumes at the next iteration; ``scontrol requeue`` (a preemption: SIGTERM
    to every process, srun, the launching process and the workers included) saves again."""
    run, slurm_log = tmp_path / "run", tmp_path / "slurm.out"
    env = {key: value for key, value in os.environ.items() if key != DEBUG_VARIABLE}
    env.update(CUDA_VISIBLE_DEVICES="", TRAIN_NET_CHECKOUT=str(REPO), TRAIN_NET_RANKS_PER_NODE="2",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--time=10", "--cpus-per-task=2", f"--chdir={tmp_path}", f"--output={slurm_log}",
         str(SBATCH), str(CPU_CONFIGS / "coco_segm_default_init_cpu.yaml"), str(run), *SMALL,
         "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "100000", "DATALOADER.NUM_WORKERS", "1",
         *NO_PRECISE_BN],
        check=True, env=env, capture_output=True, text=True)
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_until("training", lambda: progress(slurm_log, 0) >= 1, job_id)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        release(job_id, 1)
        wait_until("the resumed training", lambda: progress(slurm_log, 1) > stops(run)[0][2], job_id)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_until("the second requeue", lambda: job_info(job_id)["JobState"] == "PENDING"
                   and int(job_info(job_id)["Restarts"]) == 2, job_id)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    output = slurm_log.read_text()
    assert "Traceback" not in output and output.count("time limit near") == 1, output[-4000:]
    assert re.search(r"rendezvous \S+:(\d+)", output).group(1) == str(15000 + int(job_id) % 15000)  # the job's own port
    (first, saved_1, trained_1), (second, saved_2, trained_2) = stops(run)
    assert (first, second) == ("SIGUSR1", "SIGTERM") and saved_1 == trained_1 - 1 and saved_2 == trained_2 - 1
    assert f"Starting training from iteration {trained_1}" in (run / "log.txt").read_text()  # exactly where it stopped
    assert trained_2 > trained_1 and (run / "last_checkpoint").read_text() == f"model_{saved_2:07d}.pth"
    for iteration in (saved_1, saved_2):
        assert torch.load(run / f"model_{iteration:07d}.pth", weights_only=True)["iteration"] == iteration
