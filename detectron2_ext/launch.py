"""detectron2's ``launch``, where a rank's error that the tool tells in one line ends the run with
that line, once.

With ``--num-gpus`` (or ``--num-machines``) above 1, detectron2 runs ``main`` in processes that
torch.multiprocessing spawns, and an exception in any of them reaches the launching process as
torch's ``ProcessRaisedException`` holding the rank's whole traceback. A tool whose one-process
run tells bad input or a full disk in one line (``virtex_d2.cli.run_tool``) then printed a
traceback instead. Here each rank gives such an error to ``tell`` (the tool's formatting: the
text and the exit status, or None for an error that keeps its traceback), records the answer in
a folder of the launching process and exits with that status; the launching process prints the
first rank's record once and returns its status. torch then ends the other ranks as for any
failed rank: a rank waiting in a collective for the failed one gets a closed connection (gloo)
or is terminated (SIGTERM, then SIGKILL 30 s later); none can agree to save at that SIGTERM
(``detectron2_ext.preemption``), since the failed rank takes no part in the agreement.
Their own errors, which only follow from the first one, are left to their logs.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from detectron2.engine import launch
from detectron2.utils import comm
from torch.multiprocessing.spawn import ProcessException

from pretrain.files import write_json_atomic

#: An error to (the text a tool prints, its exit status), or None where it keeps its traceback.
Teller = Callable[[BaseException], "tuple[str, int] | None"]


class _TellingErrors:
    """A rank's ``main``: an error ``tell`` tells is recorded in ``folder`` as ``rank{N}.json``
    (picklable, for spawned processes)."""

    def __init__(self, main_func: Callable, tell: Teller, folder: str):
        self.main_func, self.tell, self.folder = main_func, tell, folder

    def __call__(self, *args):
        try:
            return self.main_func(*args)
        except Exception as error:
            told = self.tell(error)
            if told is None:
                raise
            text, status = told
            write_json_atomic(Path(self.folder) / f"rank{comm.get_rank()}.json", {"text": text, "status": status})
            raise SystemExit(status) from None


def first_told(folder: str | os.PathLike) -> tuple[str, int] | None:
    """The text and status the first rank to tell its error recorded in ``folder``, or None."""
    records = sorted(Path(folder).glob("rank*.json"), key=lambda path: path.stat().st_mtime_ns)
    if not records:
        return None
    record = json.loads(records[0].read_text())
    return record["text"], record["status"]


def launch_telling_errors(main_func: Callable, num_gpus_per_machine: int, *, tell: Teller, num_machines: int = 1,
                          machine_rank: int = 0, dist_url: str | None = None, args: tuple = ()) -> int:
    """detectron2's ``launch(main_func, ...)``; returns 0, or the status of the first rank's error
    that ``tell`` tells, after printing its text on stderr. In one process ``main_func`` runs here
    and its errors reach the caller (the tool's ``run_tool`` tells them)."""
    if num_gpus_per_machine * num_machines == 1:
        launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args)
        return 0
    with tempfile.TemporaryDirectory(prefix="virtex-d2-ranks-") as folder:
        try:
            launch(_TellingErrors(main_func, tell, folder), num_gpus_per_machine, num_machines, machine_rank,
                   dist_url, args=args)
        except ProcessException:
            told = first_told(folder)  # the failed rank's, or the one whose failure made it fail
            if told is None:
                raise
            print(told[0], file=sys.stderr)
            return told[1]
    return 0
