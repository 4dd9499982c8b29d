"""Pretraining samples from WebDataset tar shards: Conceptual Captions, RedCaps, your own corpus.

A shard is a tar file in img2dataset's layout: per sample ``{key}.jpg`` (or ``.jpeg``, ``.png``,
``.webp``), ``{key}.txt`` and optionally ``{key}.json``. Captions come from ``.txt`` (each
non-empty line is one caption) or from a field of ``.json`` (a string or a list of strings),
as ``DATA.CAPTION_FIELD`` says; when an image has several, each visit draws one, as the COCO
reader does. ``tools/make_shards.py`` writes such shards from COCO captions or a CSV. The tar
files are read with the ``webdataset`` library, so a shard may be a local path, a URL or
``pipe:COMMAND`` (whatever ``webdataset.gopen`` opens: ``pipe:aws s3 cp s3://b/x.tar -``).

The stream, and why it is built this way:

* **Disjoint readers.** Every DataLoader worker of every rank is one *reader*; there are
  ``R = world_size × max(1, DATA.NUM_WORKERS)`` of them. In epoch ``e`` the shard list is
  permuted with ``(RANDOM_SEED, e)`` and dealt round-robin to the readers
  (:func:`~pretrain.data.stream_layout.deal`), so within an epoch each shard is read by
  exactly one reader, once.
* **Mixing.** A reader keeps ``DATA.OPEN_SHARDS`` of its shards open and draws each sample
  from one of them at random (seeded by ``(RANDOM_SEED, e, reader, draw)``); a finished shard's
  slot takes the reader's next shard. Within a shard, samples pass through a shuffle buffer
  (webdataset's) of ``DATA.SHUFFLE_BUFFER / DATA.OPEN_SHARDS`` samples seeded by
  ``(RANDOM_SEED, e, shard)``, emptied at the shard's end. So one batch mixes several shards
  even when shards were written in source order, a reader holds ``DATA.SHUFFLE_BUFFER``
  samples as before, and a shard's order depends on nothing else, so a resumed reader can
  reopen it.
* **An endless stream.** A reader that has finished its shards of epoch ``e`` goes on to its
  shards of ``e + 1``; the stream never ends. The training loop runs a fixed
  ``OPTIM.NUM_ITERATIONS``, so a rank whose shards are fewer or smaller never runs dry while the
  others wait in an all-reduce (no DDP hang at an epoch's end). The price: the readers' epoch
  boundaries do not line up. What holds exactly: every sample of every epoch a reader has
  finished was seen once, and each epoch's samples are disjoint across readers and ranks.
* **Seeded samples.** A sample is loaded with python, numpy and torch seeded from
  ``(RANDOM_SEED, epoch, shard, index in the shard)``, so caption choice and augmentation do
  not depend on the number of workers, and one image read from a shard or from the COCO folder
  with the same seed gives identical tensors (the transforms are the same objects).
* **Positions.** Every sample carries its reader's position after it
  (:class:`~pretrain.data.stream_layout.StreamPosition`: epoch, next shard, draws, and each
  open shard with the index of its last sample taken). The training process keeps each
  reader's last consumed position; a checkpoint stores it with the stream's layout, and a
  resumed reader reopens its open shards right after their last consumed samples (skipping,
  without decoding, what was consumed). Samples that were prefetched but not trained on are
  read again, so resuming repeats and skips nothing. A resume under another layout is
  described in :mod:`pretrain.data.stream_layout`.
* **Bad samples.** An unreadable image, a missing or empty caption (or, for multi-label
  classification, missing labels) is skipped, logged with its shard and key, and counted
  against ``DATA.MAX_BAD_FRACTION`` (:mod:`pretrain.data.stream_progress`).
* **Unreadable shard tails.** A shard cut short or with garbage after some members gives its
  samples up to the fault; the rest is skipped, logged with the shard and the byte where
  reading failed (:mod:`pretrain.data.shard_reader`; remote shards are retried
  ``DATA.SHARD_RETRIES`` times first) and counted against ``DATA.MAX_BAD_SHARD_FRACTION``.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from pretrain.data.captions import CaptionSamples, ImageRecord
from pretrain.data.images import BadImageError, load_rgb_image
from pretrain.data.shard_reader import ShardFault, is_remote, read_shard
from pretrain.data.stream_layout import StreamPosition, deal, mix_seed
from pretrain.data.stream_progress import (
    BadSample,
    StreamMeta,
    StreamProgress,
    TooManyBadSamplesError,
    TooManyBadShardsError,
)
from pretrain.distributed import seeded_rng
from pretrain.errors import BadValueError, InputError

__all__ = [  # the stream's types live in the modules it is built from; users import them from here
    "BadSample", "ShardDataset", "ShardError", "ShardFault", "StreamCollate", "StreamMeta", "StreamPosition",
    "StreamProgress", "TooManyBadSamplesError", "TooManyBadShardsError", "build_shard_dataset", "expand_shards",
    "is_remote", "read_shard", "sample_captions",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MAX_BAD_IN_A_ROW = 1000  # a reader that finds only bad samples for this long stops the run
RETRY_DELAY = 1.0  # seconds before the first retry of a remote shard (then 2x, 4x, ...)


class ShardError(InputError, ValueError):
    """A shard list or shard that cannot be used; the message names it."""


class _Bad(Exception):
    """A sample to skip; the message says why."""


def expand_shards(spec: str, key: str = "DATA.SHARDS") -> list[str]:
    """The shards of ``spec``: a brace pattern (``corpus/{00000..00999}.tar``; several joined by
    ``::``), or a ``.txt`` file listing one shard a line (blank lines and ``#`` comments are
    skipped; relative paths are relative to the list's folder). Local shards must exist; the
    error names the first missing one and ``key``, the config key the spec came from."""
    spec = spec.strip()
    if not spec:
        raise ShardError(f"{key} is empty: DATA.FORMAT webdataset needs shards (a brace pattern or a .txt list)")
    if spec.endswith(".txt") and not is_remote(spec):
        listing = Path(spec)
        if not listing.is_file():
            raise ShardError(f"{listing}: shard list not found ({key})")
        lines = [line.strip() for line in listing.read_text(encoding="utf-8-sig").splitlines()]  # -sig: a BOM
        shards = [
            line if is_remote(line) or os.path.isabs(line) else str(listing.parent / line)
            for line in lines
            if line and not line.startswith("#")
        ]
    else:
        shards = expand_urls(spec)
    if not shards:
        raise ShardError(f"{spec}: lists no shards ({key})")
    missing = [shard for shard in shards if not is_remote(shard) and not os.path.isfile(shard)]
    if missing:
        raise ShardError(f"{missing[0]}: shard not found ({len(missing)} of the {len(shards)} shards of {key} are missing)")
    return shards


def image_id_of(key: str, meta: dict[str, Any]) -> int:
    """The sample's ``image_id``: the ``.json``'s integer ``image_id`` (COCO ids, written by
    ``tools/make_shards.py``), else a numeric key (img2dataset's), else a stable hash of the key."""
    image_id = meta.get("image_id")
    if isinstance(image_id, int) and not isinstance(image_id, bool) and 0 <= image_id < 2**63:
        return image_id
    name = key.rsplit("/", 1)[-1]
    if name.isdigit() and int(name) < 2**63:
        return int(name)
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def check_caption_field(field: str) -> None:
    """``ValueError`` unless ``field`` is ``txt`` or ``json:FIELD``."""
    if field != "txt" and not (field.startswith("json:") and len(field) > len("json:")):
        raise ValueError(f"the caption field (DATA.CAPTION_FIELD) must be 'txt' or 'json:FIELD', got '{field}'")


def _no_txt_caption(raw: dict[str, Any], meta: dict[str, Any]) -> _Bad:
    """Why a sample has no ``.txt``, where the cause can be seen: member names with a dot in their
    key (webdataset ends a key at the first dot, so a whole shard becomes one sample whose
    extensions are ``000001.txt``, ...), or the caption in the ``.json`` instead."""
    dotted = sorted(name for name in raw if name.endswith(".txt"))
    if dotted:
        return _Bad(f"no .txt caption: webdataset ends a key at its first dot, so the member "
                    f"'{raw.get('__key__')}.{dotted[0]}' has the extension '{dotted[0]}'; name the members KEY.txt, "
                    "KEY.jpg with no dot in KEY")
    if isinstance(meta.get("caption"), (str, list)):
        return _Bad("no .txt caption, but its .json has one: set DATA.CAPTION_FIELD json:caption")
    return _Bad("no .txt caption")


def _captions(raw: dict[str, Any], meta: dict[str, Any], field: str) -> tuple[str, ...]:
    if field == "txt":
        if "txt" not in raw:
            raise _no_txt_caption(raw, meta)
        try:
            lines = raw["txt"].decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise _Bad(".txt is not UTF-8") from None
    else:
        name = field.split(":", 1)[1]
        value = meta.get(name)
        if value is None:
            raise _Bad(f"no '{name}' caption in .json")
        lines = [value] if isinstance(value, str) else value
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise _Bad(f".json '{name}' is neither a string nor a list of strings")
    captions = tuple(line.strip() for line in lines if line.strip())
    if not captions:
        raise _Bad("empty caption")
    return captions


def _meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's parsed ``.json`` (empty without one); ``_Bad`` when it is not a JSON object."""
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Bad(".json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _Bad(".json is not an object")
    return meta


def sample_captions(
    shards: Sequence[str], caption_field: str = "txt", max_captions: int | None = None, seed: int = 0
) -> tuple[list[str], int]:
    """Captions to learn a vocabulary from: the shards in an order shuffled with ``seed``, every
    caption of every sample until ``max_captions`` (all when None). Only the ``.txt`` and
    ``.json`` members are kept; an unreadable shard tail is skipped and logged. Returns the
    captions and the number of samples without one."""
    check_caption_field(caption_field)
    order = np.random.default_rng(seed).permutation(len(shards)).tolist()
    captions: list[str] = []
    skipped, first_problem = 0, ""
    for index in order:
        for raw in read_shard(shards[index], extensions=("txt", "json")):
            try:
                captions.extend(_captions(raw, _meta(raw), caption_field))
            except _Bad as bad:
                skipped += 1
                first_problem = first_problem or f"{shards[index]} {raw.get('__key__')}: {bad}"
            if max_captions is not None and len(captions) >= max_captions:
                return captions[:max_captions], skipped
    if not captions:
        raise ShardError(f"no caption in any of the {skipped} samples of {len(shards)} shards (the first: "
                         f"{first_problem or 'no samples'})")
    return captions, skipped


def _labels(meta: dict[str, Any], num_classes: int) -> torch.Tensor:
    labels = meta.get("labels")
    ok = isinstance(labels, list) and labels and all(isinstance(k, int) and 0 <= k < num_classes for k in labels)
    if not ok:
        raise _Bad(f"multi-label classification needs a .json 'labels' list of class indices in [0, {num_classes})")
    multi_hot = torch.zeros(num_classes, dtype=torch.float32)
    multi_hot[labels] = 1.0
    return multi_hot


class _OpenShard:
    """One of a reader's open shards: its index ``cursor`` in the reader's list of the epoch,
    its samples (``(index in the shard, raw)`` in the epoch's order) and the index of the
    last one taken (-1: none)."""

    def __init__(self, cursor: int, shard: int, samples: Iterator[tuple[int, dict]], emitted: int):
        self.cursor, self.shard, self.samples, self.emitted = cursor, shard, samples, emitted


class _Skipped:
    """What a reader skipped since its previous sample; it travels with the next one."""

    def __init__(self):
        self.bad: list[BadSample] = []
        self.opened: list[int] = []
        self.faults: list[ShardFault] = []

    def meta(self, reader: int, position: StreamPosition) -> StreamMeta:
        meta = StreamMeta(reader, position, tuple(self.bad), tuple(self.opened), tuple(self.faults))
        for found in (self.bad, self.opened, self.faults):
            found.clear()  # in place: the open shards' readers append to these very lists
        return meta


class ShardDataset(IterableDataset):
    """The endless, seeded, resumable stream of training samples from ``shards`` (see the module
    docstring), or with ``repeat=False`` one unshuffled pass, one shard at a time (validation).

    Iterating yields ``(sample, StreamMeta)`` pairs; :class:`StreamCollate` batches them. The
    sample dict is what ``samples`` (the task's :class:`CaptionSamples`) makes, plus a float32
    multi-hot ``labels`` over ``num_classes`` when given (from the ``.json``'s ``labels`` list).
    Call :meth:`configure` in the training process, before the DataLoader starts its workers,
    to say which rank this is and where each reader resumes.
    """

    def __init__(
        self,
        shards: Sequence[str],
        samples: CaptionSamples,
        seed: int,
        *,
        caption_field: str = "txt",
        shuffle_buffer: int = 1000,
        open_shards: int = 4,
        repeat: bool = True,
        num_classes: int | None = None,
        retries: int = 0,
        retry_delay: float = RETRY_DELAY,
    ):
        check_caption_field(caption_field)
        if open_shards < 1 or retries < 0:
            raise BadValueError(f"DATA.OPEN_SHARDS must be at least 1 (got {open_shards}) and DATA.SHARD_RETRIES at "
                                f"least 0 (got {retries})")
        self.shards = list(shards)
        self.samples = samples
        self.seed = seed
        self.caption_field = caption_field
        self.shuffle_buffer = shuffle_buffer
        self.open_shards = open_shards if repeat else 1
        self.repeat = repeat
        self.num_classes = num_classes
        self.retries, self.retry_delay = retries, retry_delay
        self.configure()

    def configure(
        self,
        rank: int = 0,
        world_size: int = 1,
        positions: dict[int, StreamPosition] | None = None,
        rotation: int = 0,
        finished: dict[int, set[int]] | None = None,
    ) -> None:
        """This rank of ``world_size``; ``positions``: each reader's last consumed sample;
        ``rotation``: DataLoader worker ``w`` plays this rank's reader ``(w + rotation) % workers``,
        so that a resumed DataLoader, which always starts with worker 0, hands out batches in the
        order the interrupted one would have; ``finished``: per epoch, shards to leave out
        (finished before a resume under another layout, :mod:`pretrain.data.stream_layout`)."""
        self.rank, self.world_size = rank, world_size
        self.positions = dict(positions or {})
        self.rotation = rotation
        self.finished = {int(e): set(s) for e, s in (finished or {}).items()}

    def check_readers(self, num_readers: int) -> None:
        """An endless stream needs a shard for every reader, or that reader would yield nothing."""
        if self.repeat and len(self.shards) < num_readers:
            raise ShardError(
                f"{len(self.shards)} shard(s) for {num_readers} readers (ranks × max(1, DATA.NUM_WORKERS)): every "
                "reader needs a shard; write smaller shards (tools/make_shards.py --shard-size) or use fewer workers"
            )

    def shards_of(self, epoch: int, reader: int, num_readers: int) -> list[int]:
        """Indices into :attr:`shards` that reader ``reader`` reads in epoch ``epoch``, in order."""
        if not self.repeat:
            return list(range(reader, len(self.shards), num_readers))
        return deal(self.seed, len(self.shards), epoch, reader, num_readers, self.finished.get(epoch, ()))

    def __iter__(self) -> Iterator[tuple[dict[str, Any], StreamMeta]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        reader = self.rank * workers + (worker + self.rotation) % workers
        return self.read(reader, self.world_size * workers, self.positions.get(reader))

    def read(self, reader: int, num_readers: int, last: StreamPosition | None = None) -> Iterator[tuple[dict, StreamMeta]]:
        """Reader ``reader`` of ``num_readers``: its samples from just after ``last`` on."""
        self.check_readers(num_readers)
        position = last or StreamPosition.start_of(0)
        skipped = _Skipped()
        while True:
            epoch = position.epoch
            mine = self.shards_of(epoch, reader, num_readers)
            whole = position == StreamPosition.start_of(epoch) and epoch not in self.finished
            good = yield from self._read_epoch(reader, mine, position, skipped)
            if not self.repeat:
                return
            if good == 0 and whole and mine:
                shards = ", ".join(self.shards[i] for i in mine)
                faults = "; ".join(map(str, skipped.faults))
                raise TooManyBadSamplesError(f"no usable sample in a whole epoch of reader {reader}'s shards ({shards})"
                                             + (f"; the first: {skipped.bad[0]}" if skipped.bad else "")
                                             + (f"; unreadable: {faults}" if faults else ""))
            position = StreamPosition.start_of(epoch + 1)

    def _read_epoch(self, reader: int, mine: list[int], position: StreamPosition, skipped: _Skipped):
        """The samples of one epoch of a reader from ``position`` on; returns how many were good."""
        epoch, cursor, draws = position.epoch, position.cursor, position.draws
        slots = [self._open(mine, c, epoch, emitted, skipped) for c, emitted in position.slots]
        while len(slots) < self.open_shards and cursor < len(mine):
            slots.append(self._open(mine, cursor, epoch, -1, skipped))
            cursor += 1
        good = 0
        while slots:
            chosen = mix_seed(self.seed, epoch, reader, draws) % len(slots) if len(slots) > 1 else 0
            draws += 1
            item = next(slots[chosen].samples, None)
            while item is None and cursor < len(mine):  # a finished shard: the next one takes its slot
                slots[chosen] = self._open(mine, cursor, epoch, -1, skipped)
                cursor += 1
                item = next(slots[chosen].samples, None)
            if item is None:
                del slots[chosen]
                continue
            slot = slots[chosen]
            slot.emitted += 1
            index, raw = item
            try:
                sample = self.decode(raw, mix_seed(self.seed, epoch, slot.shard, index))
            except _Bad as reason:
                skipped.bad.append(self._skip(raw, str(reason), skipped.bad))
                continue
            good += 1
            yield sample, skipped.meta(reader, StreamPosition(epoch, cursor, draws, tuple((s.cursor, s.emitted) for s in slots)))
        return good

    def _open(self, mine: list[int], cursor: int, epoch: int, emitted: int, skipped: _Skipped) -> _OpenShard:
        """The reader's shard ``mine[cursor]``, its samples after the ``emitted``-th (not decoded)."""
        shard = mine[cursor]
        skipped.opened.append(shard)
        samples = self._shuffled(shard, epoch, skipped.faults)
        return _OpenShard(cursor, shard, itertools.islice(samples, emitted + 1, None), emitted)

    def _shuffled(self, shard: int, epoch: int, faults: list[ShardFault]) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(index in the shard, raw sample)`` pairs of one shard, in this epoch's order."""
        raw = enumerate(read_shard(self.shards[shard], retries=self.retries, retry_delay=self.retry_delay, faults=faults))
        buffer = self.shuffle_buffer // self.open_shards
        if not self.repeat or buffer <= 1:
            return raw
        return wds.shuffle(buffer, buffer, seed=mix_seed(self.seed, epoch, shard))(raw)

    def _skip(self, raw: dict[str, Any], reason: str, pending: list[BadSample]) -> BadSample:
        bad = BadSample(str(raw.get("__url__")), str(raw.get("__key__")), reason)
        logger.warning("skipping bad sample %s", bad)
        if len(pending) + 1 >= _MAX_BAD_IN_A_ROW:
            raise TooManyBadSamplesError(f"{len(pending) + 1} bad samples in a row, the last {bad}")
        return bad

    def decode(self, raw: dict[str, Any], seed: int) -> dict[str, Any]:
        """The training sample of one raw webdataset sample, loaded with the RNGs seeded by
        ``seed``; raises ``_Bad`` for a sample to skip."""
        url, key = raw["__url__"], raw["__key__"]
        meta = _meta(raw)
        captions = _captions(raw, meta, self.caption_field)
        labels = _labels(meta, self.num_classes) if self.num_classes is not None else None
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if extension is None:
            raise _Bad(f"no image (.{', .'.join(IMAGE_EXTENSIONS)})")
        try:
            image = load_rgb_image(io.BytesIO(raw[extension]), name=f"{url} {key}.{extension}")
        except BadImageError as err:
            raise _Bad(f"unreadable image ({str(err).split(': ', 1)[-1]})") from None
        record = ImageRecord(image_id_of(key, meta), f"{key}.{extension}", captions)
        with seeded_rng(seed):
            sample = self.samples(record, image)
        if labels is not None:
            sample["labels"] = labels
        return sample

    def raw_samples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(shard, raw sample)`` for every sample of every shard once, in list order."""
        for shard in self.shards:
            for raw in read_shard(shard):
                yield shard, raw


class StreamCollate:
    """Batches ``(sample, meta)`` pairs: ``(collate_fn(samples), [meta, ...])``."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[tuple[dict, StreamMeta]]) -> tuple[dict, list[StreamMeta]]:
        return self.collate_fn([sample for sample, _ in items]), [meta for _, meta in items]


def build_shard_dataset(cfg, split: str, samples: CaptionSamples, num_classes: int | None = None) -> ShardDataset:
    """The ``split`` ("train": ``DATA.SHARDS``, endless and shuffled; "val": ``DATA.VAL_SHARDS``,
    one pass in list order) of a ``DATA.FORMAT webdataset`` config."""
    key = "DATA.SHARDS" if split == "train" else "DATA.VAL_SHARDS"
    data = cfg.DATA
    return ShardDataset(
        expand_shards(data[key.split(".")[1]], key),
        samples,
        cfg.RANDOM_SEED,
        caption_field=data.CAPTION_FIELD,
        shuffle_buffer=data.SHUFFLE_BUFFER,
        open_shards=data.OPEN_SHARDS,
        repeat=split == "train",
        num_classes=num_classes,
        retries=data.SHARD_RETRIES,
    )
