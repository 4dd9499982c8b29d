"""Atomic file writing: every file the project writes goes through :func:`atomic_write`.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over
its final name, so a crash, a kill or a full disk at any moment leaves either the previous file
or the complete new one, never a partial one. Readers (a resumed run, the demo's skip logic, a
report) can therefore trust any file that exists. Its permissions are those a plain ``open()``
gives (0666 less the umask, or the folder's default ACL), so teammates who share an output
folder can read what the project writes there.
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pretrain.errors import BadValueError, OutputExistsError, OutputNotWritableError


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (it lives in the directory's own entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty file next to ``path`` to write it under, open for writing: its descriptor and
    name. Created like ``open(name, "x")`` does (mode 0666, which the kernel narrows by the umask
    or the folder's default ACL), unlike ``tempfile.mkstemp``'s fixed 0600, which the rename
    would hand on to the final file. ``O_EXCL`` never opens an existing file."""
    name = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``with atomic_write(path, "wb") as handle:`` writes ``path`` atomically.

    The folder must exist. If the block raises (including ``ENOSPC`` from a full disk), the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    fd, tmp_name = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_options: Any) -> None:
    """``json.dump(data, **dump_options)`` to ``path`` atomically (indent 2 unless given)."""
    dump_options.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(data, **dump_options) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike, name_glob: str) -> None:
    """Delete temporary files that a killed writer left for final names matching ``name_glob``."""
    for stale in Path(directory).glob(f".{name_glob}.*.tmp"):
        stale.unlink(missing_ok=True)


def ensure_writable_directory(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove that files can be written in it, so that a run
    fails before it spends any compute rather than at its first checkpoint."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OutputNotWritableError(
            err.errno, f"{directory}: cannot write files there ({err.strerror}); choose another output "
            "directory or fix its permissions"
        ) from None
    return directory


def check_output_file(path: str | os.PathLike, force: bool) -> Path:
    """Make sure a tool can write its output file ``path`` before it spends any compute: not an
    existing file unless ``force``, not a folder (``--output results/``: the atomic rename failed
    with a traceback once all the work was done), in a folder where files can be written."""
    path = Path(path)
    if path.is_dir():
        raise BadValueError(f"{path}: is a folder; give the name of the file to write, e.g. {path / 'out.json'}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists (pass --force to overwrite)")
    ensure_writable_directory(path.parent)
    return path


def check_output_folder(path: str | os.PathLike, force: bool) -> Path:
    """Make sure a tool can write files into the folder ``path`` before it spends any compute:
    not a file (the first write failed with a traceback after the model had run), not holding
    files unless ``force``; created and proved writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadValueError(f"{path}: is a file; give a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"{path}: not empty (pass --force to write into it)")
    return ensure_writable_directory(path)
