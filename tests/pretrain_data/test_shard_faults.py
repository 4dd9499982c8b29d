"""Shard faults and the stream's order: real tar files cut with real byte cuts (mid-member,
mid-header, at a member boundary, garbage after members) read through webdataset, remote
shards retried through real ``pipe:`` commands, batches that mix shards, and resumes under
another layout compared as multisets of the samples read.

Shards here are written in source order: shard ``s`` holds the samples with ids
``100 s + i``, so ``id // 100`` is a sample's shard.
"""
from __future__ import annotations

import gzip
import logging
import os
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pretrain.data import collate_fn
from pretrain.data.shards import (
    StreamPosition,
    StreamProgress,
    TooManyBadShardsError,
    read_shard,
)
from pretrain.data.stream_layout import finished_shards, layout_of
from pretrain.distributed import DistContext
from pretrain.engine.streaming import StreamLoader
from pretrain.tasks import build_dataset

from .test_shards import config, jpeg, write_tar

CPU = DistContext(0, 0, 1, __import__("torch").device("cpu"))


def source_order_shards(folder: Path, sizes: list[int]) -> list[Path]:
    """Shards of ``sizes`` samples, shard ``s`` holding ids ``100 s + i`` in order."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tar(folder / f"{s:05d}.tar", [
        {"__key__": str(100 * s + i), "jpg": jpeg(100 * s + i), "txt": f"sample {100 * s + i}".encode()}
        for i in range(size)]) for s, size in enumerate(sizes)]


def members(path: Path) -> list[tarfile.TarInfo]:
    """The tar's members as Python's tarfile lists them (offsets of headers and data)."""
    with tarfile.open(path) as tar:
        return tar.getmembers()


def keys(url, **kwargs) -> tuple[list[str], list]:
    faults: list = []
    return [raw["__key__"] for raw in read_shard(str(url), faults=faults, **kwargs)], faults


# --- one cut shard -----------------------------------------------------------------------------------

# Sample k = 3 of 6 (members 2k: its .jpg, 2k + 1: its .txt). Where the cut falls, the samples
# kept, and the member where reading fails. A cut in a header (or at a member boundary, or
# garbage) also drops the sample before it: it might have had more members.
CUTS = {
    "mid-data of a sample's first member": (lambda m: m[6].offset_data + 100, 3, 6),
    "mid-data of a sample's last member": (lambda m: m[7].offset_data + 3, 3, 7),
    "mid-header": (lambda m: m[7].offset + 700, 3, 7),
    "at a member boundary, no end-of-archive marker": (lambda m: m[6].offset, 2, 6),
}


@pytest.mark.parametrize("where", CUTS)
def test_a_cut_shard_gives_the_samples_before_the_cut_and_names_the_byte(tmp_path, caplog, where):
    (full,) = source_order_shards(tmp_path, [6])
    listing = members(full)
    assert [m.name for m in listing[6:8]] == ["3.jpg", "3.txt"]
    cut_at, kept, member = CUTS[where]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: cut_at(listing)])
    with caplog.at_level(logging.WARNING, logger="pretrain.data.shards"):
        got, faults = keys(cut)
    assert got == [str(i) for i in range(kept)]
    (fault,) = faults
    assert (fault.shard, fault.offset, fault.member) == (str(cut), listing[member].offset, member)
    assert f"skipping the rest of shard {cut}: unreadable from byte {listing[member].offset} (member {member})" in caplog.text


def test_garbage_after_some_members_ends_the_shard_there(tmp_path):
    (full,) = source_order_shards(tmp_path, [6])
    listing = members(full)
    damaged = tmp_path / "garbage.tar"
    damaged.write_bytes(full.read_bytes()[: listing[6].offset] + os.urandom(5000))
    got, (fault,) = keys(damaged)
    assert got == ["0", "1"] and (fault.offset, fault.member) == (listing[6].offset, 6)
    assert "not a tar header" in fault.reason
    assert keys(full) == ([str(i) for i in range(6)], [])  # the intact shard: every sample, no fault


def test_a_member_twice_in_one_sample_ends_the_shard_and_a_fault_of_ours_does_not(tmp_path, monkeypatch):
    """webdataset's grouping refuses a file name twice in a sample: that shard's fault. Any other
    ValueError while reading comes from our code and is raised (it used to end the shard)."""
    import io

    from pretrain.data import shard_reader

    path = tmp_path / "twice.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("0.jpg", "0.txt", "1.jpg", "1.txt", "1.txt", "2.jpg", "2.txt"):
            data = jpeg() if name.endswith(".jpg") else b"a caption"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got, (fault,) = keys(path)
    assert got == ["0"] and "1.txt: duplicate file name" in fault.reason

    def broken(*args, **kwargs):
        raise ValueError("not enough values to unpack")
        yield
    monkeypatch.setattr(shard_reader, "_members", broken)
    with pytest.raises(ValueError, match="not enough values"):
        keys(source_order_shards(tmp_path / "intact", [2])[0])


def test_a_cut_gzipped_shard_gives_the_samples_before_the_cut(tmp_path):
    """A ``.tar.gz`` (webdataset reads it through tarfile's stream decompression) cut at 60 %
    of its compressed bytes: offsets are in the uncompressed tar."""
    (full,) = source_order_shards(tmp_path, [6])
    listing = members(full)
    packed = gzip.compress(full.read_bytes())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(packed[: len(packed) * 6 // 10])
    got, (fault,) = keys(cut)
    assert 0 < len(got) < 6 and got == [str(i) for i in range(len(got))]
    assert fault.member in (2 * len(got), 2 * len(got) + 1)  # in the next sample's .jpg or, cut in its .txt
    assert fault.offset == listing[fault.member].offset and "unexpected end of data" in fault.reason


def test_a_local_cut_shard_is_not_retried_and_a_remote_one_is(tmp_path, caplog):
    (full,) = source_order_shards(tmp_path, [6])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: members(full)[6].offset_data + 100])
    with caplog.at_level(logging.WARNING, logger="pretrain.data.shards"):
        assert keys(cut, retries=3, retry_delay=0.01)[0] == ["0", "1", "2"]
    assert "retry" not in caplog.text
    # A command that fails (exit 1 after part of the shard) the first time, then works.
    count = tmp_path / "count"
    count.write_text("0")
    flaky = (f"pipe:sh -c 'n=$(cat {count}); echo $((n + 1)) > {count}; "
             f"if [ $n -eq 0 ]; then head -c 20000 {full}; exit 1; else cat {full}; fi'")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.data.shards"):
        got, faults = keys(flaky, retries=3, retry_delay=0.01)
    assert got == [str(i) for i in range(6)] and faults == [] and count.read_text().strip() == "2"
    assert "retry 1 of 3" in caplog.text
    # One that always fails: 1 + 3 attempts, then its tail is a fault; no sample given twice.
    attempts = tmp_path / "attempts"
    broken = f"pipe:sh -c 'echo x >> {attempts}; head -c 20000 {full}; exit 1'"
    got, (fault,) = keys(broken, retries=3, retry_delay=0.01)
    assert attempts.read_text().count("x") == 4 and fault.shard == broken
    assert got == [str(i) for i in range(len(got))] and len(got) < 6


class _FailingFile:
    """A local shard's bytes whose reads raise ``error`` once past byte ``at`` (how a disk or a
    network file system fails mid-read; the machine here cannot be made to)."""

    def __init__(self, path: str, at: int, error: OSError):
        self.file = open(path, "rb")  # noqa: SIM115 -- a stream the reader closes, as gopen's are
        self.at, self.error = at, error

    def read(self, size: int = -1) -> bytes:
        if self.file.tell() >= self.at:
            raise self.error
        return self.file.read(size if 0 <= size <= self.at - self.file.tell() else self.at - self.file.tell())

    def close(self) -> None:
        self.file.close()


def test_a_machine_fault_is_retried_on_a_local_shard_and_raised_if_it_persists(tmp_path, monkeypatch, caplog):
    """EIO mid-read is the machine's fault, not the shard's: read again (a network file system
    often recovers), and if it persists raised with the shard named, never counted as a cut
    shard (that would drop the data, or stop the run as if the dataset were damaged)."""
    import errno

    from pretrain.data import shard_reader

    (full,) = source_order_shards(tmp_path, [6])
    fail_at = members(full)[6].offset_data + 100  # in sample 3
    opened = []

    def flaky(url, failures):
        opened.append(url)
        eio = OSError(errno.EIO, os.strerror(errno.EIO))
        return _FailingFile(url, fail_at, eio) if len(opened) <= failures else open(url, "rb")

    monkeypatch.setattr(shard_reader, "gopen", lambda url: flaky(url, failures=1))
    with caplog.at_level(logging.WARNING, logger="pretrain.data.shards"):
        got, faults = keys(full, retries=3, retry_delay=0.01)
    assert got == [str(i) for i in range(6)] and faults == [] and len(opened) == 2
    assert "retry 1 of 3" in caplog.text and "Input/output error" in caplog.text

    opened.clear()
    monkeypatch.setattr(shard_reader, "gopen", lambda url: flaky(url, failures=99))
    given, faults = [], []
    with pytest.raises(OSError, match=rf"reading shard {full} at byte .*Input/output error.*not the shard") as err:
        for raw in read_shard(str(full), retries=2, retry_delay=0.01, faults=faults):
            given.append(raw["__key__"])
    assert err.value.errno == errno.EIO and len(opened) == 3 and faults == []
    assert given == ["0", "1", "2"]  # each sample before the fault once, over three attempts

    # A fault of the file's bytes (no error number) on a local file is still not retried.
    opened.clear()
    cut = OSError("unexpected end of data")
    monkeypatch.setattr(shard_reader, "gopen", lambda url: (opened.append(url), _FailingFile(url, fail_at, cut))[1])
    got, (fault,) = keys(full, retries=3, retry_delay=0.01)
    assert got == ["0", "1", "2"] and len(opened) == 1 and "unexpected end of data" in fault.reason


class _DroppingServer(ThreadingHTTPServer):
    """Serves one file over HTTP; the first ``drops`` requests get the full Content-Length but
    only the first 60 % of the bytes, then the connection closes (a download cut mid-way)."""

    def __init__(self, path: Path, drops: int):
        self.data, self.drops, self.requests = path.read_bytes(), drops, 0
        super().__init__(("127.0.0.1", 0), _DroppingHandler)


class _DroppingHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # http.server calls it by this name
        server = self.server
        server.requests += 1
        body = server.data if server.requests > server.drops else server.data[: len(server.data) * 6 // 10]
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.data)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("drops", [1, 9])
def test_a_url_shard_whose_download_is_cut_is_fetched_again(tmp_path, caplog, drops):
    """A real URL through webdataset's gopen (curl) from a local HTTP server: a download cut
    once is fetched again and gives every sample once; one cut every time gives up after
    1 + 3 requests with the samples before the cut."""
    (full,) = source_order_shards(tmp_path, [6])
    server = _DroppingServer(full, drops)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/00000.tar"
        with caplog.at_level(logging.WARNING, logger="pretrain.data.shards"):
            got, faults = keys(url, retries=3, retry_delay=0.01)
    finally:
        server.shutdown()
        server.server_close()
    if drops == 1:
        assert got == [str(i) for i in range(6)] and faults == [] and server.requests == 2
        assert f"reading shard {url} failed" in caplog.text and "retry 1 of 3" in caplog.text
    else:
        (fault,) = faults
        assert server.requests == 4 and fault.shard == url
        assert got == [str(i) for i in range(len(got))] and 0 < len(got) < 6


# --- the stream around a cut shard -------------------------------------------------------------------

def test_the_stream_skips_a_cut_tail_counts_the_shard_and_resumes_through_it(coco_root, tokenizer_path, tokenizer,
                                                                            tmp_path):
    shards = source_order_shards(tmp_path / "s", [6, 6, 6, 6, 6])
    listing = members(shards[2])
    shards[2].write_bytes(shards[2].read_bytes()[: listing[6].offset_data + 100])  # samples 203-205 lost
    spec = str(tmp_path / "s" / "{00000..00004}.tar")
    dataset = build_dataset(config(coco_root, tokenizer_path, spec, "DATA.SHUFFLE_BUFFER", "8"), "train", tokenizer)
    items = [next(it) for it in [dataset.read(0, 1)] for _ in range(27 * 3)]
    everything = Counter(100 * s + i for s in range(5) for i in range(6) if (s, i) not in {(2, 3), (2, 4), (2, 5)})
    for epoch in range(3):
        assert Counter(int(x["image_id"]) for x, m in items if m.position.epoch == epoch) == everything
    faults = [f for _, m in items for f in m.faults]
    assert [(f.shard, f.offset, f.member) for f in faults] == [(str(shards[2]), listing[6].offset, 6)] * 3
    opened = [s for _, m in items for s in m.opened]
    assert Counter(opened) == Counter({s: 3 for s in range(5)})
    # Resuming right after any sample, that of the cut shard's too, continues the same stream.
    for cut in (3, 11, 26, 40):
        resumed = [next(it) for it in [dataset.read(0, 1, items[cut][1].position)] for _ in range(20)]
        assert [int(x["image_id"]) for x, _ in resumed] == [int(x["image_id"]) for x, _ in items[cut + 1 : cut + 21]]
    # 1 of 5 shards: within a bound of 0.2, beyond one of 0.1 (judged once 5 = min(1 / 0.1, 5) shards were read).
    lenient, strict = (StreamProgress(0.5, max_bad_shard_fraction=f, num_shards=5) for f in (0.2, 0.1))
    lenient.update([m for _, m in items])
    assert lenient.state_dict()["bad_shards"] == [list(faults[0])]
    with pytest.raises(TooManyBadShardsError, match=rf"1 of the 5 shards read on this rank have an unreadable tail, "
                                                    rf"more than DATA.MAX_BAD_SHARD_FRACTION 0.1: {shards[2]}: "
                                                    rf"unreadable from byte {listing[6].offset}"):
        strict.update([m for _, m in items])


# --- mixing ---------------------------------------------------------------------------------------------

def shard_counts_of_batches(coco_root, tokenizer_path, tokenizer, spec, *overrides, batches=6) -> list[int]:
    cfg = config(coco_root, tokenizer_path, spec, "DATA.NUM_WORKERS", "0", "OPTIM.BATCH_SIZE", "8", *overrides)
    loader = StreamLoader(build_dataset(cfg, "train", tokenizer), cfg, CPU, collate_fn, None)
    stream = iter(loader)
    return [len({int(i) // 100 for i in next(stream)["image_id"]}) for _ in range(batches)]


def test_a_batch_mixes_several_shards_written_in_source_order(coco_root, tokenizer_path, tokenizer, tmp_path):
    source_order_shards(tmp_path / "s", [12] * 8)
    spec = str(tmp_path / "s" / "{00000..00007}.tar")
    mixed = shard_counts_of_batches(coco_root, tokenizer_path, tokenizer, spec)
    assert min(mixed) >= 3, mixed  # 4 shards open: batches of 8 from 3 or 4 shards
    assert shard_counts_of_batches(coco_root, tokenizer_path, tokenizer, spec) == mixed  # seeded
    one_at_a_time = shard_counts_of_batches(coco_root, tokenizer_path, tokenizer, spec, "DATA.OPEN_SHARDS", "1")
    assert max(one_at_a_time) <= 2 and min(one_at_a_time) == 1, one_at_a_time  # what the mixing replaces


# --- resuming under another layout -------------------------------------------------------------------------

def test_a_resume_under_another_layout_skips_nothing_and_repeats_only_open_shards(coco_root, tokenizer_path,
                                                                                tokenizer, tmp_path):
    """7 shards of unequal size over 3 readers (3, 2 and 2 shards an epoch), read unevenly so
    that the old readers are in epochs 1, 2 and 5 at the checkpoint; resumed with 2 readers.
    Compared as multisets per epoch: before + after holds every sample at least once in every
    epoch from the earliest one on, and the extra copies are exactly samples the old readers
    had read of the shards they had open (at most 3 readers × 4 open shards)."""
    sizes = [5, 9, 4, 7, 3, 8, 6]
    source_order_shards(tmp_path / "s", sizes)
    spec = str(tmp_path / "s" / "{00000..00006}.tar")
    cfg = config(coco_root, tokenizer_path, spec, "DATA.SHUFFLE_BUFFER", "8")
    old = build_dataset(cfg, "train", tokenizer)
    consumed = {0: 25, 1: 40, 2: 72}  # samples each old reader had trained on
    before = {r: [next(it) for it in [old.read(r, 3)] for _ in range(n)] for r, n in consumed.items()}
    positions = {r: items[-1][1].position for r, items in before.items()}
    assert sorted(p.epoch for p in positions.values()) == [1, 2, 5]  # drifted apart by 4 epochs
    layout = layout_of(old.shards, old.seed, old.shuffle_buffer, old.open_shards, 3, 0)
    finished = finished_shards(layout, positions, {})
    first = min(p.epoch for p in positions.values())
    new = build_dataset(cfg, "train", tokenizer)
    new.configure(finished=finished)
    after = [[next(it) for it in [new.read(r, 2, StreamPosition.start_of(first))] for _ in range(140)] for r in range(2)]

    def per_epoch(items):
        counts: dict[int, Counter] = {}
        for sample, meta in items:
            counts.setdefault(meta.position.epoch, Counter())[int(sample["image_id"])] += 1
        return counts

    old_seen = per_epoch([x for items in before.values() for x in items])
    new_seen = per_epoch([x for items in after for x in items])
    done = min(items[-1][1].position.epoch for items in after)  # every new reader has passed these epochs
    assert done >= 5
    everything = {100 * s + i for s, size in enumerate(sizes) for i in range(size)}
    repeated = Counter()
    for epoch in range(first, done):
        both = old_seen.get(epoch, Counter()) + new_seen.get(epoch, Counter())
        assert set(both) == everything, epoch  # nothing skipped
        repeated += Counter({(epoch, i): n - 1 for i, n in both.items() if n > 1})
    open_shards = {(p.epoch, old.shards_of(p.epoch, r, 3)[c]) for r, p in positions.items() for c, _ in p.slots}
    assert repeated and {(e, i // 100) for e, i in repeated} <= open_shards
    read_of_open = sum(n for e, c in old_seen.items() for i, n in c.items() if (e, i // 100) in open_shards)
    assert sum(repeated.values()) == read_of_open == sum(e + 1 for p in positions.values() for _, e in p.slots)
    assert len(open_shards) <= 3 * 4
    # Restarting the earliest epoch whole (all the old code did) would repeat far more.
    whole = sum(n for e, c in old_seen.items() if e >= first for n in c.values())
    assert whole > 4 * sum(repeated.values()), (whole, sum(repeated.values()))


@pytest.mark.parametrize("change", [
    ("DATA.SHUFFLE_BUFFER", "9", "shuffle_buffer 8 -> 9"),
    ("RANDOM_SEED", "1", "seed 0 -> 1"),
    ("DATA.OPEN_SHARDS", "2", "open_shards 4 -> 2"),
    ("DATA.SHARDS", "reversed", "shard_list "),
])
def test_any_change_of_layout_is_detected_and_the_same_layout_resumes_exactly(coco_root, tokenizer_path, tokenizer,
                                                                             tmp_path, caplog, change):
    """The same number of shards, readers and workers each time: the old check (counts only)
    saw none of these changes."""
    paths = source_order_shards(tmp_path / "s", [7, 5, 6, 4])
    overrides = ["DATA.NUM_WORKERS", "0", "OPTIM.BATCH_SIZE", "4", "DATA.SHUFFLE_BUFFER", "8"]

    def loader(saved, *more):
        cfg = config(coco_root, tokenizer_path, str(tmp_path / "s" / "{00000..00003}.tar"), *overrides, *more)
        return StreamLoader(build_dataset(cfg, "train", tokenizer), cfg, CPU, collate_fn, saved)

    def ids(stream, n):
        return [int(i) for _ in range(n) for i in next(stream)["image_id"]]

    reference = loader(None)
    stream = iter(reference)
    ids(stream, 3)
    saved = reference.state_dict()
    tail = ids(stream, 5)
    with caplog.at_level(logging.WARNING, logger="pretrain.engine"):
        assert ids(iter(loader(saved)), 5) == tail  # same layout: exactly where it was
    assert "layout differs" not in caplog.text
    key, value, expected = change
    if key == "DATA.SHARDS":  # the same files, listed in another order: as many shards as before
        listing = tmp_path / "reversed.txt"
        listing.write_text("".join(f"{p}\n" for p in reversed(paths)))
        value = str(listing)
    resumed = loader(saved, key, value)
    assert f"layout differs ({expected}" in caplog.text
    assert "every reader restarts epoch 0" in caplog.text
    assert len(ids(iter(resumed), 2)) == 8
