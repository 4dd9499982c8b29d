"""What the command-line tools share: their parser, the common flags, one-line errors.

Every evaluation tool reads a pretraining config and a checkpoint and takes the same flags for
them; they are declared here once so that they read and behave the same in every tool.

Bad input (a missing or malformed file, a config key or value that does not fit, an existing
output without ``--force``, defective dataset files: every :class:`~pretrain.errors.InputError`)
ends a tool with one line, ``<tool>: error: <what and what to do>``, and exit status 2, as
argparse does for bad flags: :func:`run_tool`. A traceback is shown only with ``--debug`` on the
command line or ``VIRTEX_D2_DEBUG=1`` in the environment. Anything else is a bug or a fault of
the machine and ends with its traceback and exit status 1; a full disk, a quota or a file size
limit is told in one line naming the file, since its traceback says nothing more. A tool whose
library logs such an error with its traceback before raising it (detectron2's training loop)
has that log record shortened to the same line: :class:`OneLineErrorLog`.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pretrain.errors import InputError

#: Exit status for bad input (argparse's own for bad flags).
BAD_INPUT_STATUS = 2
#: Exit status for everything else: bugs, and faults of the machine such as a full disk.
FAILURE_STATUS = 1
#: OSError numbers that mean the storage takes no more bytes, told in one line naming the file:
#: errno -> (what happened, what to do).
STORAGE_FULL = {
    errno.ENOSPC: ("disk full", "free space there or choose another output"),
    errno.EDQUOT: ("disk full", "free space there or choose another output"),
    errno.EFBIG: ("file size limit reached", "raise the limit (ulimit -f) or choose another output"),
}
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "VIRTEX_D2_DEBUG"

CHECKPOINT_HELP = "official VirTex or virtex-d2 checkpoint (.pth)"
DEVICE_HELP = "torch device (default: the accelerator if any, else cpu)"


def tool_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the tool's docstring as written (examples included)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_flags(
    parser: argparse.ArgumentParser,
    *,
    config_help: str = "pretraining config (YAML) of the checkpoint",
    checkpoint: argparse._ActionsContainer | bool = True,
    checkpoint_help: str = CHECKPOINT_HELP,
    device: bool = True,
    force_help: str = "overwrite an existing output file",
) -> None:
    """``--config``, ``--checkpoint``, ``--device``, ``--force`` and ``--opts KEY VALUE ...``.

    ``checkpoint``: True for a required ``--checkpoint``, False for none, or a (mutually
    exclusive) group to add an optional one to.
    """
    parser.add_argument("--config", required=True, help=config_help)
    if checkpoint is True:
        parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    elif checkpoint is not False:
        checkpoint.add_argument("--checkpoint", help=checkpoint_help)
    if device:
        parser.add_argument("--device", default=None, action=DeviceFlag, help=DEVICE_HELP)
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")


class CheckedFlag(argparse.Action):
    """An argparse action that checks each value of its flag (each of a list with ``nargs``)
    with :meth:`problem` and ends the parse with ``<flag> <problem>`` (status 2) on the first
    that does not fit. Subclasses (:func:`in_range`, :class:`DeviceFlag`) say what fits."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError

    def __call__(self, parser, namespace, values, option_string=None):
        for value in values if isinstance(values, list) else [values]:
            problem = self.problem(value)
            if problem is not None:
                parser.error(f"{option_string} {problem}")
        setattr(namespace, self.dest, values)


def in_range(low: float, high: float | None = None, *, low_open: bool = False, why: str = "") -> type[CheckedFlag]:
    """The ``action=`` of a number flag that must be ``low`` or more (more than ``low`` with
    ``low_open``) and at most ``high``: ``--batch-size must be 1 or more, got 0``. ``why`` (e.g.
    ``" (the gap pairs images)"``) follows the range in the message."""
    if high is None:
        allowed = f"more than {low}" if low_open else f"{low} or more"
    else:
        allowed = f"in {'(' if low_open else '['}{low}, {high}]"

    class InRange(CheckedFlag):
        def problem(self, value):
            if value < low or (low_open and value == low) or (high is not None and value > high):
                return f"must be {allowed}{why}, got {value}"
            return None

    return InRange


class DeviceFlag(CheckedFlag):
    """``--device``: a torch device string of a device this machine has (``cpu``, ``cuda``,
    ``cuda:1``, ...), checked before any model is built."""

    def problem(self, value: str) -> str | None:
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            return f"{value} is not a torch device (use cpu, cuda or cuda:N)"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            kind = "CUDA"
        else:
            accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
            count = torch.accelerator.device_count() if accelerator and accelerator.type == device.type else 0
            kind = device.type
        if count == 0:
            return f"{value}: this machine has no {kind} device (use --device cpu, or leave --device out)"
        if device.index is not None and device.index >= count:
            return f"{value}: this machine has {count} {kind} device{'s' if count > 1 else ''} ({device.type}:0 to {device.type}:{count - 1})"
        return None


def report_error(tool: str, error: BaseException, status: int = BAD_INPUT_STATUS) -> int:
    """Print ``tool: error: <message>`` on one line to stderr; returns the exit status to use.

    An :class:`~pretrain.errors.InputError` with ``details`` (a dataset check's list of
    problems) has them printed first. In debug mode (:func:`debug_requested`) the error is
    raised again instead, traceback and all.
    """
    if debug_requested([]):
        raise error
    print(error_report(tool, error), file=sys.stderr)
    return status


def error_report(tool: str, error: BaseException) -> str:
    """What :func:`report_error` prints: ``tool: error: <message>``, after an
    :class:`~pretrain.errors.InputError`'s ``details``."""
    details = ""
    if isinstance(error, InputError):
        details = error.details
        error = error.headline
    elif isinstance(error, OSError) and error.filename and error.strerror and str(error).startswith("[Errno"):
        error = f"{error.filename}: {error.strerror}"  # Python's own wording: "[Errno 20] Not a ...: 'path'"
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{details}\n{tool}: error: {message}" if details else f"{tool}: error: {message}"


def storage_full_message(error: OSError) -> str:
    """What a full disk (an errno of :data:`STORAGE_FULL`) stopped and where: the file, named by
    the error's filename or, as the project's writers do, at the start of its message."""
    what, remedy = STORAGE_FULL[error.errno]
    where = f"{error.filename}: " if error.filename else ""
    return f"{what} while writing {where}{error.strerror or error}; {remedy}"


def told_in_one_line(error: BaseException | None) -> bool:
    """Whether :func:`run_tool` ends on ``error`` with one line, not its traceback: bad input (an
    :class:`~pretrain.errors.InputError`), or storage that takes no more bytes (:data:`STORAGE_FULL`)."""
    return isinstance(error, InputError) or (isinstance(error, OSError) and error.errno in STORAGE_FULL)


class OneLineErrorLog(logging.Filter):
    """A logger filter that logs an error :func:`told_in_one_line` as one line, without its
    traceback (kept with ``--debug``): detectron2's training loop logs every exception it raises
    again with its traceback, which put a traceback above the tool's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if told_in_one_line(error) and not debug_requested([]):
            record.msg = f"{record.getMessage()} {' '.join(str(error).split())}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def debug_requested(argv: list[str]) -> bool:
    """Whether tracebacks were asked for (``--debug`` in ``argv`` or ``VIRTEX_D2_DEBUG=1``)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run_tool(tool: str, main: Callable[[], int | None]) -> int:
    """Run a tool's ``main()`` on ``sys.argv``: bad input becomes one line and exit status 2.

    Only :class:`~pretrain.errors.InputError` counts as bad input. A full disk (or quota, or
    file size limit) is one line and exit status 1. Any other exception (a ``KeyError`` from a
    bug, a shape mismatch in torch) propagates, so Python prints its traceback and exits with
    status 1. ``--debug`` is taken out of ``sys.argv`` before ``main`` parses it and lets every
    traceback through.
    """
    debug = debug_requested(sys.argv)
    if debug:  # also for the tool's own handlers, and for the tools it runs (the demo's stages)
        os.environ[DEBUG_VARIABLE] = "1"
    sys.argv[:] = [arg for arg in sys.argv if arg != DEBUG_FLAG]
    try:
        return main() or 0
    except Exception as err:
        told = one_line_report(tool, err)
        if told is None:
            raise
        print(told[0], file=sys.stderr)
        return told[1]


def one_line_report(tool: str, error: BaseException) -> tuple[str, int] | None:
    """What :func:`run_tool` prints for an error :func:`told_in_one_line`, and the exit status;
    None where the error keeps its traceback (any other error, or ``--debug``). Picklable as
    ``functools.partial(one_line_report, tool)``, for a tool's other processes to tell their
    errors the same way (``detectron2_ext.launch``)."""
    if debug_requested([]) or not told_in_one_line(error):
        return None
    if isinstance(error, InputError):
        return error_report(tool, error), BAD_INPUT_STATUS
    return error_report(tool, RuntimeError(storage_full_message(error))), FAILURE_STATUS
