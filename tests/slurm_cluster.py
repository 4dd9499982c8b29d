"""The local one-node Slurm the `slurm` tests submit to (scripts/slurm/local_cluster.sh), and
how they follow a job: its `scontrol` fields, waiting for a state while failing at once if the
job ends first."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

LOCAL_CLUSTER = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "local_cluster.sh"
# tests/conftest.py lets a `slurm` test skip only with this reason; anything else is a failure.
SLURM_UNAVAILABLE = "local Slurm unavailable"
ENDED = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="session")
def slurm() -> None:
    """A running one-node Slurm (started here if `make test-deps` has not); skips the test,
    saying why, where none can be started (not root, no apt-get)."""
    if subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], check=False).returncode == 0:
        return
    started = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], check=False, capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        pytest.skip(f"{SLURM_UNAVAILABLE}: {' '.join((started.stderr or started.stdout).strip().splitlines()[-1:])}")


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s KEY=VALUE fields of a job."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=True, capture_output=True,
                          text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_until(what: str, predicate, job_id: str, timeout: float = 300) -> None:
    """Poll ``predicate`` every second; fail at once if the job ends first, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        info = job_info(job_id)
        assert info["JobState"] not in ENDED, f"the job ended before {what}: {info}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {info}"
        time.sleep(1)


def release(job_id: str, restarts: int) -> None:
    """Once the job is requeued (pending, ``restarts`` restarts), start it now (Slurm holds a
    requeued job for about two minutes) with a time limit far away again."""
    wait_until(f"requeue #{restarts}", lambda: job_info(job_id)["JobState"] == "PENDING"
               and int(job_info(job_id)["Restarts"]) == restarts, job_id)
    time.sleep(2)  # slurmd refuses a job credential issued in the second its last one was revoked
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", "TimeLimit=10"], check=True)
