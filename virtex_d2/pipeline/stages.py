"""Run a pipeline as a list of separate commands, skipping those whose outputs are complete.

Each stage is one command a user can also run by hand. A stage whose outputs are complete and
valid is skipped; one that was interrupted is resumed where its tool supports it; outputs made
with other settings than the stage now asks for stop the run with an error; ``force`` deletes a
stage's outputs and runs it again. Once a stage runs, the later stages that read its outputs
run too (a stage names them in ``needs``; by default it reads every earlier stage's), since
their inputs changed; the others stay skipped. Each stage's own tool draws its progress bar;
the runner announces the stages and returns how long each took.

Stages that do not depend on each other can be grouped in :class:`SideBySide` and run at the
same time: on a small CPU one detectron2 process per core gets more done than two in turn on
all cores, because much of a training step is single-threaded Python. Their tools then write
to log files and the runner draws one bar per stage.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class StageError(RuntimeError):
    """A stage's command failed."""


@dataclass
class Stage:
    """One pipeline step: the command that does it and how to tell it is already done."""

    name: str
    command: list  # [python, tool.py, *arguments]: extra flags go right after the tool
    is_complete: Callable[[], bool]
    outputs: list = field(default_factory=list)  # deleted by force before the command runs
    force_args: list = field(default_factory=list)  # appended by force, for tools that replace their outputs
    # Flags that make the tool continue an interrupted run, and the test for "interrupted".
    resume_args: list = field(default_factory=list)
    is_partial: Callable[[], bool] = lambda: False
    # Called after the stage ran or was skipped (e.g. to print what it produced).
    report: Callable[[], None] | None = None
    # (done, total) units of work so far, for the runner's bar when the stage runs side by side.
    progress: Callable[[], tuple[int, int]] | None = None
    # Why the outputs already there were made with other settings than this command asks for, or
    # None: then the runner stops rather than skip or resume them (force redoes the stage).
    outdated: Callable[[], str | None] | None = None
    # The earlier stages whose outputs this one reads, by name; None: every earlier stage. A stage
    # reruns when one of them ran, so adding a branch to a finished pipeline runs only that branch.
    needs: tuple | None = None

    def inputs_changed(self, ran: set) -> bool:
        """Whether a stage it reads from ran in this run (``ran``: the names of those that did)."""
        return bool(ran) if self.needs is None else any(name in ran for name in self.needs)


@dataclass
class SideBySide:
    """Independent stages run at the same time, each tool writing to ``log_dir/<stage name>.log``."""

    stages: list
    log_dir: Path


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "resumed" or "skipped"
    seconds: float
    group: int  # results with the same group ran at the same time


def _remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _with_flags(command: list, flags: list) -> list:
    """``command`` with ``flags`` right after the tool (before any trailing KEY VALUE overrides)."""
    return [*command[:2], *flags, *command[2:]]


def _planned_command(stage: Stage, rerun: bool) -> tuple[list, str]:
    """The command that brings ``stage`` up to date and the status it will have; ``rerun``
    (forced, or an earlier stage ran) starts from clean outputs."""
    if rerun:
        for output in stage.outputs:
            _remove(output)
        return _with_flags(stage.command, stage.force_args), "ran"
    if stage.resume_args and stage.is_partial():
        return _with_flags(stage.command, stage.resume_args), "resumed"
    return stage.command, "ran"


def _check_finished(stage: Stage, returncode: int, log: Path | None = None) -> None:
    where = f" (its output: {log})" if log is not None else ""
    if returncode != 0:
        raise StageError(f"stage '{stage.name}' failed with exit code {returncode}{where}; "
                         f"fix the cause and run again: completed stages are skipped")
    if not stage.is_complete():
        raise StageError(f"stage '{stage.name}' finished but its outputs are incomplete{where}")


def _thread_share(env: dict | None, running: int) -> dict:
    """``env`` with the CPU cores split among ``running`` processes, unless the user set threads."""
    env = dict(os.environ if env is None else env)
    share = str(max(1, (os.cpu_count() or 1) // running))
    for name in THREAD_VARIABLES:
        env.setdefault(name, share)
    return env


def _run_in_terminal(stage: Stage, command: list, env: dict | None) -> float:
    start = time.perf_counter()
    completed = subprocess.run([str(part) for part in command], env=env, check=False)
    _check_finished(stage, completed.returncode)
    return time.perf_counter() - start


def _run_side_by_side(jobs: list, log_dir: Path, env: dict | None) -> dict:
    """Start every (stage, command) of ``jobs`` at once, draw a bar per stage until all have
    finished, and return each stage's seconds; the first failure stops the others."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _thread_share(env, len(jobs))
    running = []
    for position, (stage, command) in enumerate(jobs):
        log = log_dir / f"{stage.name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen([str(part) for part in command], env=env, stdout=out,
                                       stderr=subprocess.STDOUT)
        bar = tqdm(desc=stage.name, position=position, unit="it", dynamic_ncols=True)
        running.append((stage, process, log, bar, time.perf_counter()))
    seconds: dict = {}
    try:
        while len(seconds) < len(running):
            for stage, process, log, bar, start in running:
                if stage.name in seconds:
                    continue
                progress = stage.progress() if stage.progress is not None else (bar.n, bar.total)
                if progress != (bar.n, bar.total):  # redraw on news only: a log gets a line per redraw
                    bar.n, bar.total = progress
                    bar.refresh()
                returncode = process.poll()
                if returncode is not None:
                    seconds[stage.name] = time.perf_counter() - start
                    _check_finished(stage, returncode, log)
            time.sleep(0.5)
    finally:
        for _, process, _, bar, _ in running:
            if process.poll() is None:
                process.terminate()
                process.wait()
            bar.close()
    return seconds


def stages_to_run(stages, force: bool = False) -> set:
    """The names of the stages :func:`run_stages` will run: every one with ``force``, else those
    whose outputs are incomplete and those that read from a stage that runs.

    Raises :class:`StageError` when a stage that would be kept or resumed holds outputs made with
    other settings (its ``outdated`` reason), so that a run stops before it starts, not midway."""
    to_run: set = set()
    for item in stages:
        group = item.stages if isinstance(item, SideBySide) else [item]
        before_group = set(to_run)  # stages side by side do not read each other
        for stage in group:
            rerun = force or stage.inputs_changed(before_group)
            reason = None if rerun or stage.outdated is None else stage.outdated()
            if reason:
                raise StageError(f"stage '{stage.name}': {reason}; nothing was changed. Pass --force to "
                                 "redo it and the stages after it")
            if rerun or not stage.is_complete():
                to_run.add(stage.name)
    return to_run


def run_stages(stages, force: bool = False, env: dict | None = None, echo=print, to_run: set | None = None) -> list:
    """Run ``stages`` (each a :class:`Stage` or a :class:`SideBySide` group) in order; returns one
    :class:`StageResult` per stage. ``to_run``: :func:`stages_to_run` of the same stages, where
    the caller has it already (checking outputs can mean reading checkpoints)."""
    total = sum(len(item.stages) if isinstance(item, SideBySide) else 1 for item in stages)
    to_run = stages_to_run(stages, force) if to_run is None else to_run
    results, ran, number = [], set(), 0
    for index, item in enumerate(stages):
        group, log_dir = (item.stages, item.log_dir) if isinstance(item, SideBySide) else ([item], None)
        seconds, jobs, statuses = {}, [], {}
        for stage in group:
            number += 1
            header = f"[{number}/{total}] {stage.name}"
            if stage.name not in to_run:
                echo(f"{header}: outputs complete, skipped (pass --force to redo)")
                seconds[stage.name], statuses[stage.name] = 0.0, "skipped"
                continue
            command, statuses[stage.name] = _planned_command(stage, force or stage.inputs_changed(ran))
            echo(f"{header}: {shlex.join(str(part) for part in command)}")
            jobs.append((stage, command))
        if log_dir is not None and len(jobs) > 1:
            echo(f"running {' and '.join(stage.name for stage, _ in jobs)} side by side; "
                 f"their output goes to {log_dir}/")
            seconds.update(_run_side_by_side(jobs, log_dir, env))
        else:
            for stage, command in jobs:
                seconds[stage.name] = _run_in_terminal(stage, command, env)
        ran.update(stage.name for stage, _ in jobs)
        for stage in group:
            if stage.report is not None:
                stage.report()
            results.append(StageResult(stage.name, statuses[stage.name], seconds[stage.name], index))
    return results


def format_timings(results) -> str:
    """A small table of stage, status and seconds, with the total time (stages that ran side by
    side count once, by the longest of them)."""
    width = max(len(r.name) for r in results)
    groups: dict = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    lines = [f"{'stage'.ljust(width)}  status    seconds"]
    for members in groups.values():
        mark = "  (side by side)" if sum(r.status != "skipped" for r in members) > 1 else ""
        lines += [f"{r.name.ljust(width)}  {r.status.ljust(8)}  {r.seconds:7.1f}{mark}" for r in members]
    wall = sum(max(r.seconds for r in members) for members in groups.values())
    lines.append(f"{'total'.ljust(width)}            {wall:7.1f}")
    return "\n".join(lines)
