"""One tar shard read up to its last readable sample, remote shards retried.

Shards from img2dataset or an interrupted copy are often cut short (mid-member or mid-header),
and a disk or a download can leave garbage after some members. Python's ``tarfile``, which
webdataset reads with, ends a streamed archive *silently* at a header it cannot read (a cut
header, garbage, or no end-of-archive marker at all) exactly as at a proper end, and raises
only when a member's data is cut. So a shard here is read with ``tarfile`` directly, with a
:class:`tarfile.TarInfo` subclass that records why the headers ended; webdataset opens the
stream (``gopen``: paths, URLs, ``pipe:`` commands) and groups members into samples
(``group_by_keys``). What cannot be read becomes a :class:`ShardFault` (the shard, the byte of
the tar and the member index where reading failed, why), logged and handed to the caller; the
samples wholly before it are used. The sample the fault falls in is dropped with the tail
unless the failing member is known to start a later sample, since it may be incomplete.

A remote shard (URL or ``pipe:``) is read again after a fault, up to ``retries`` times,
``retry_delay`` seconds × 1, 2, 4, ... apart, skipping the samples already given; only then
is its tail a fault. A local file is not retried: a cut file stays cut.

A fault of the machine rather than of the shard (an ``OSError`` whose number is in
:data:`pretrain.errors.MACHINE_FAULTS`: EIO, ESTALE, EMFILE, ...) is retried the same way,
local files included, since a network file system often recovers; if it persists it is
raised, naming the shard, and not counted as a cut shard: skipping shards one by one would
train on less data, or stop the run as if the dataset were damaged, for what is the machine's
fault.
"""
from __future__ import annotations

import itertools
import logging
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from typing import Any, NamedTuple

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from pretrain.errors import is_machine_fault

logger = logging.getLogger("pretrain.data.shards")

# What a cut, garbage, a failed download or a failed command raise while a tar is read.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError)

_END_REASONS = {
    tarfile.EmptyHeaderError: "the tar ends without its end-of-archive marker (cut after a member)",
    tarfile.TruncatedHeaderError: "a member header is cut off",
    tarfile.InvalidHeaderError: "not a tar header (garbage, or a cut)",
}


class ShardFault(NamedTuple):
    """An unreadable shard tail: ``offset``, the byte of the (uncompressed) tar where the
    unreadable part starts, and ``member``, the index of the first member not read."""

    shard: str
    offset: int
    member: int
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: unreadable from byte {self.offset} (member {self.member}) on: {self.reason}"


def is_remote(url: str) -> bool:
    """A URL or a ``pipe:`` command rather than a local path."""
    return "://" in url or url.startswith("pipe:")


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Records on the archive the header error that ended it (``EOFHeaderError``: a proper
    end-of-archive block; anything else: a cut or garbage, which ``tarfile`` does not raise)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.header_error = err
            raise


class _Cut(Exception):
    """Reading stopped before the end of the archive; ``keep_last``: the sample read last is
    complete (the failing member started another one); ``machine_fault``: the ``OSError`` of
    the machine that stopped it, if that is what did."""

    def __init__(self, offset: int, member: int, reason: str, keep_last: bool, machine_fault: OSError | None):
        super().__init__(reason)
        self.offset, self.member, self.reason, self.keep_last = offset, member, reason, keep_last
        self.machine_fault = machine_fault


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class _Progress:
    """Where the reading of one attempt is (byte and member of the member being read) and the
    :class:`_Cut` that ended it, if any."""

    def __init__(self):
        self.offset, self.member, self.cut = 0, 0, None

    def stop(self, reason: str, keep_last: bool = False, offset: int | None = None,
             error: BaseException | None = None) -> None:
        machine_fault = error if isinstance(error, OSError) and is_machine_fault(error) else None
        self.cut = _Cut(self.offset if offset is None else offset, self.member, reason, keep_last, machine_fault)


def _members(stream, url: str, keep: Callable[[str], bool], at: _Progress) -> Iterator[dict[str, Any]]:
    """The regular members of a tar stream as webdataset's ``{"fname", "data", "__url__"}``;
    a fault sets ``at.cut`` and ends them."""
    last_prefix = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo) as tar:
            while True:
                at.offset = tar.offset
                info = tar.next()
                if info is None:
                    break
                name, at.offset = info.name, info.offset
                if info.isreg() and keep(name):
                    prefix = base_plus_ext(name)[0]
                    try:
                        data = tar.extractfile(info).read()
                    except READ_ERRORS as err:
                        at.stop(f"{name}: {_reason(err)}", keep_last=prefix != last_prefix, error=err)
                        return
                    yield {"fname": name, "data": data, "__url__": url}
                    last_prefix = prefix
                at.member += 1
                tar.members = []  # a shard can hold 10,000 samples: keep no member list
            end = getattr(tar, "header_error", None)
            if not isinstance(end, tarfile.EOFHeaderError):
                at.stop(_END_REASONS.get(type(end), _reason(end)), offset=tar.offset)
    except READ_ERRORS as err:
        at.stop(_reason(err), error=err)


def _wanted(extensions: Sequence[str] | None) -> Callable[[str], bool]:
    if extensions is None:
        return lambda name: not (name.startswith("__") and name.endswith("__"))
    # By the last suffix, not webdataset's extension (all after the key's first dot), so that a
    # member whose key has a dot in it is still read and can be named as the cause.
    return lambda name: name.rsplit(".", 1)[-1] in extensions


def _samples_once(url: str, keep: Callable[[str], bool], at: _Progress) -> Iterator[dict[str, Any]]:
    """One attempt: the shard's samples (held back by one, so the sample a fault falls in can
    be dropped); a fault (opening included) sets ``at.cut``. A file name twice in a sample is
    that shard's fault; any other ``ValueError`` is ours and is raised."""
    try:
        stream = gopen(url)
    except READ_ERRORS as err:
        at.stop(f"cannot open: {_reason(err)}", error=err)
        return
    try:
        held = None
        for sample in group_by_keys(_members(stream, url, keep, at)):
            if held is not None:
                yield held
            held = sample
        if held is not None and (at.cut is None or at.cut.keep_last):
            yield held
    except ValueError as err:
        if "duplicate file name" not in str(err):  # webdataset's grouping names only that; the rest is a bug
            raise
        at.stop(f"{err.args[0]}")
        if held is not None:  # complete: the name came twice in the sample after it
            yield held
    finally:
        try:
            stream.close()
        except READ_ERRORS:
            pass  # a command's exit status after a complete tar, or one we stopped reading early


def read_shard(
    url: str,
    extensions: Sequence[str] | None = None,
    *,
    retries: int = 0,
    retry_delay: float = 1.0,
    faults: list[ShardFault] | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them: ``{"__key__", "__url__", ext: bytes}``,
    with only the members whose last suffix is in ``extensions`` when given.

    An unreadable tail (or a shard unreadable from byte 0) ends the samples: the fault is
    logged, and appended to ``faults`` when given. A remote shard, or any shard the machine
    failed to read, is first read again up to ``retries`` times; a machine fault that persists
    is raised (see the module docstring).
    """
    keep = _wanted(extensions)
    given = 0
    for attempt in itertools.count():
        at = _Progress()
        with closing(_samples_once(url, keep, at)) as samples:
            for sample in itertools.islice(samples, given, None):
                given += 1
                yield sample
        if at.cut is None:
            return
        cut = at.cut
        if attempt >= max(0, retries) or not (is_remote(url) or cut.machine_fault):
            break
        delay = retry_delay * 2**attempt
        logger.warning("reading shard %s failed at byte %d (%s): retry %d of %d in %g s",
                       url, cut.offset, cut.reason, attempt + 1, retries, delay)
        time.sleep(delay)
    if cut.machine_fault:
        error = cut.machine_fault
        raise OSError(error.errno, f"reading shard {url} at byte {cut.offset} (member {cut.member}): "
                                   f"{error.strerror or error}; the machine's fault, not the shard's") from error
    fault = ShardFault(url, cut.offset, cut.member, cut.reason)
    logger.warning("skipping the rest of shard %s (%d samples read before the fault)", fault, given)
    if faults is not None:
        faults.append(fault)
