"""Run a pipeline as a list of separate commands, skipping those whose outputs are complete.

Each stage is one command a user can also run by hand. A stage whose outputs are complete and
valid is skipped; one that was interrupted is resumed where its tool supports it; ``force``
deletes a stage's outputs and runs it again. Once a stage runs, every later stage runs too,
since its inputs changed. Each stage's own tool draws its progress bar; the runner announces
the stages and returns how long each took.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "resumed" or "skipped"
    seconds: float


def _remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _with_flags(command: list, flags: list) -> list:
    """``command`` with ``flags`` right after the tool (before any trailing KEY VALUE overrides)."""
    return [*command[:2], *flags, *command[2:]]


def run_stages(stages, force: bool = False, env: dict | None = None, echo=print) -> list:
    """Run ``stages`` in order; returns one :class:`StageResult` per stage."""
    results, upstream_ran = [], False
    for number, stage in enumerate(stages, 1):
        start = time.perf_counter()
        header = f"[{number}/{len(stages)}] {stage.name}"
        if not (force or upstream_ran) and stage.is_complete():
            echo(f"{header}: outputs complete, skipped (pass --force to redo)")
            status = "skipped"
        else:
            command, status = stage.command, "ran"
            if force or upstream_ran:
                for output in stage.outputs:
                    _remove(output)
                command = _with_flags(command, stage.force_args)
            elif stage.resume_args and stage.is_partial():
                command, status = _with_flags(command, stage.resume_args), "resumed"
            echo(f"{header}: {shlex.join(str(part) for part in command)}")
            completed = subprocess.run([str(part) for part in command], env=env, check=False)
            if completed.returncode != 0:
                raise StageError(f"stage '{stage.name}' failed with exit code {completed.returncode}; "
                                 f"fix the cause and run again: completed stages are skipped")
            if not stage.is_complete():
                raise StageError(f"stage '{stage.name}' finished but its outputs are incomplete")
            upstream_ran = True
        if stage.report is not None:
            stage.report()
        results.append(StageResult(stage.name, status, time.perf_counter() - start))
    return results


def format_timings(results) -> str:
    """A small table of stage, status and seconds, with the total."""
    width = max(len(r.name) for r in results)
    lines = [f"{'stage'.ljust(width)}  status    seconds"]
    lines += [f"{r.name.ljust(width)}  {r.status.ljust(8)}  {r.seconds:7.1f}" for r in results]
    lines.append(f"{'total'.ljust(width)}            {sum(r.seconds for r in results):7.1f}")
    return "\n".join(lines)
