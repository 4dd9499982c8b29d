"""The project's input errors: one base class that tells bad input from bugs.

A tool that meets bad input (a file the user named that is missing or malformed, a flag or
config value out of range, an output that exists without ``--force``, defective dataset files)
ends with one line naming the file, key or value and exit status 2; anything else is a bug or a
fault of the machine and ends with its traceback (:func:`virtex_d2.cli.run_tool`). The line
between the two is drawn here: every error about the input derives from :class:`InputError`.

:class:`InputError` is a mixin over :class:`Exception`, so each family also keeps the built-in
base its callers already catch (``ConfigError`` is a ``ValueError``, ``DatasetLayoutError`` a
``FileNotFoundError``, ...). The families live next to the code that raises them
(``pretrain.config.ConfigError``, ``pretrain.checkpoint_io.CheckpointError``,
``pretrain.data.dataset_root.DatasetLayoutError``, ``pretrain.data.images.BadImageError``,
``pretrain.data.shards.ShardError``, ``detectron2_ext.convert.ConversionError``, ...); the
generic ones and the dataset-check report, which both ``pretrain`` and ``detectron2_ext``
raise, live here. This module imports nothing of the project, so any package may use it.
"""
from __future__ import annotations

import errno
import re
from collections.abc import Sequence

SHOWN_PROBLEMS = 10  # problems listed in a DatasetCheckError's message
KEPT_PROBLEMS = 1000  # problems kept in memory; beyond this only counted
# What torch's DataLoader puts between "Caught X in DataLoader worker process N." and the
# worker's own traceback when it raises the worker's error again in the main process.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"


#: OSError numbers that tell of the machine (disk, memory, descriptors, network file systems),
#: not of the file being read: a read failing with one of them is not the file's fault.
MACHINE_FAULTS = frozenset({errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EAGAIN,
                            errno.ESTALE, errno.ETIMEDOUT, errno.ENXIO, errno.EDQUOT})


def is_machine_fault(error: OSError) -> bool:
    """Whether ``error`` came from the machine (:data:`MACHINE_FAULTS`); a decoder's complaint
    about a file's bytes carries no error number."""
    return error.errno in MACHINE_FAULTS


class InputError(Exception):
    """Bad input: the message names the file, key or value and says what to do.

    ``headline`` is the one line a tool prints; ``details`` (possibly empty) are lines printed
    before it, e.g. the problems a dataset check found.
    """

    @property
    def headline(self) -> str:
        message = str(self)
        if _WORKER_TRACEBACK in message:  # raised in a DataLoader worker: its message is the last line
            return re.sub(r"^[\w.]+: ", "", message.rstrip().splitlines()[-1])
        return message

    @property
    def details(self) -> str:
        return ""


class BadValueError(InputError, ValueError):
    """A flag, setting or file content whose value does not fit (names it and the allowed range)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (or one it must contain) that is not there."""


class OutputExistsError(InputError, FileExistsError):
    """An output that already exists and would be overwritten without ``--force``."""


class OutputNotWritableError(InputError, OSError):
    """An output folder the user named where no file can be written (a file in the way,
    permissions, a read-only mount), found before any compute is spent. Built as
    ``OutputNotWritableError(errno, message)``; it reads as the message alone."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class DatasetCheckError(InputError, ValueError):
    """Dataset files that would fail a later stage; lists up to :data:`SHOWN_PROBLEMS` problems.

    ``problems`` holds the problems found (the first :data:`KEPT_PROBLEMS`), one line each,
    naming the file, the key or field, and what to do; ``total`` counts all of them.
    """

    def __init__(self, problems: Sequence[str], total: int | None = None):
        self.problems = list(problems)
        self.total = max(total or 0, len(self.problems))
        super().__init__("\n".join([self.headline + ":", self.listing]))

    @property
    def headline(self) -> str:
        return f"{self.total} problem{'s' if self.total != 1 else ''} in the dataset files (nothing was run)"

    @property
    def details(self) -> str:
        return self.listing

    @property
    def listing(self) -> str:
        """Up to :data:`SHOWN_PROBLEMS` problems, one indented line each, and how many more."""
        shown = self.problems[:SHOWN_PROBLEMS]
        more = [f"... and {self.total - len(shown)} more"] if self.total > len(shown) else []
        return "\n".join(f"  {line}" for line in [*shown, *more])


class CheckReport:
    """What a dataset check found: problems (errors) and warnings, in the order found."""

    def __init__(self):
        self.problems: list[str] = []
        self.total = 0
        self.warnings: list[str] = []

    def problem(self, text: str) -> None:
        """One defect that stops the run: ``"<file>: <key or field>: <what>; <what to do>"``."""
        self.total += 1
        if len(self.problems) < KEPT_PROBLEMS:
            self.problems.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def raise_if_problems(self) -> None:
        if self.total:
            raise DatasetCheckError(self.problems, self.total)
