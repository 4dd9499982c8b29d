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
  permuted with ``(RANDOM_SEED, e)`` and reader ``r`` reads shards ``r, r + R, r + 2R, ...`` of
  the permutation, so within an epoch each shard is read by exactly one reader, once.
* **Shuffling.** Each shard's samples pass through a shuffle buffer of ``DATA.SHUFFLE_BUFFER``
  samples (webdataset's) seeded by ``(RANDOM_SEED, e, shard)``; the buffer is emptied at the end
  of the shard, so a shard's order depends on nothing else and a resumed reader can reopen it.
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
* **Positions.** Every sample carries its reader and position ``(epoch, shard cursor, index in
  the shard's shuffled order)``. :class:`StreamProgress` (in the training process) keeps each
  reader's last consumed position; a checkpoint stores it and a resumed reader starts right
  after it, skipping (without decoding) what was consumed. Samples that were prefetched but not
  trained on are read again, so resuming repeats and skips nothing.
* **Bad samples.** An unreadable image, a missing or empty caption (or, for multi-label
  classification, missing labels) is skipped, logged with its shard and key, and counted;
  once more than ``DATA.MAX_BAD_FRACTION`` of the samples a rank has read were bad, the run
  stops with :class:`TooManyBadSamplesError` listing them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from pretrain.data.captions import CaptionSamples, ImageRecord
from pretrain.data.images import BadImageError, load_rgb_image
from pretrain.distributed import seeded_rng

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MAX_BAD_IN_A_ROW = 1000  # a reader that finds only bad samples for this long stops the run
_BAD_EXAMPLES_KEPT = 100  # bad samples a checkpoint remembers (the count is always kept)


class ShardError(ValueError):
    """A shard list or shard that cannot be used; the message names it."""


class TooManyBadSamplesError(RuntimeError):
    """More of a rank's samples were bad than ``DATA.MAX_BAD_FRACTION`` allows."""


class _Bad(Exception):
    """A sample to skip; the message says why."""


@dataclass(frozen=True)
class BadSample:
    """A skipped sample: its shard, its key and why it was skipped."""

    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.reason}"


class StreamPosition(NamedTuple):
    """Where a reader is: ``epoch``, the shard ``cursor`` in its list of that epoch, and the
    index ``emitted`` of the last sample taken from that shard's shuffled order (-1: none)."""

    epoch: int
    cursor: int
    emitted: int


class StreamMeta(NamedTuple):
    """What travels with each sample: who read it, where, and the bad samples skipped before it."""

    reader: int
    position: StreamPosition
    bad: tuple[BadSample, ...]


def is_remote(url: str) -> bool:
    """A URL or a ``pipe:`` command rather than a local path."""
    return "://" in url or url.startswith("pipe:")


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
        lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
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


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (numpy's SeedSequence: well spread, platform-stable)."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def read_shard(url: str, extensions: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them: ``{"__key__", "__url__", ext: bytes}``,
    with only the members whose extension is in ``extensions`` when given.

    A shard that cannot be opened or is not a readable tar raises :class:`ShardError` naming it.
    """
    select = None if extensions is None else (lambda name: wds.tariterators.base_plus_ext(name)[1] in extensions)
    try:
        yield from wds.tarfile_samples([{"url": url}], select_files=select)
    except (OSError, tarfile.TarError, ValueError) as err:
        raise ShardError(f"{url}: cannot read shard ({err.args[0] if err.args else type(err).__name__})") from None


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


def _captions(raw: dict[str, Any], meta: dict[str, Any], field: str) -> tuple[str, ...]:
    if field == "txt":
        if "txt" not in raw:
            raise _Bad("no .txt caption")
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
    ``.json`` members are kept. Returns the captions and the number of samples without one."""
    check_caption_field(caption_field)
    order = np.random.default_rng(seed).permutation(len(shards)).tolist()
    captions: list[str] = []
    skipped = 0
    for index in order:
        for raw in read_shard(shards[index], extensions=("txt", "json")):
            try:
                captions.extend(_captions(raw, _meta(raw), caption_field))
            except _Bad:
                skipped += 1
            if max_captions is not None and len(captions) >= max_captions:
                return captions[:max_captions], skipped
    return captions, skipped


def _labels(meta: dict[str, Any], num_classes: int) -> torch.Tensor:
    labels = meta.get("labels")
    ok = isinstance(labels, list) and labels and all(isinstance(k, int) and 0 <= k < num_classes for k in labels)
    if not ok:
        raise _Bad(f"multi-label classification needs a .json 'labels' list of class indices in [0, {num_classes})")
    multi_hot = torch.zeros(num_classes, dtype=torch.float32)
    multi_hot[labels] = 1.0
    return multi_hot


class ShardDataset(IterableDataset):
    """The endless, seeded, resumable stream of training samples from ``shards`` (see the module
    docstring), or with ``repeat=False`` one unshuffled pass (validation).

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
        repeat: bool = True,
        num_classes: int | None = None,
    ):
        check_caption_field(caption_field)
        self.shards = list(shards)
        self.samples = samples
        self.seed = seed
        self.caption_field = caption_field
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.num_classes = num_classes
        self.configure()

    def configure(
        self, rank: int = 0, world_size: int = 1, positions: dict[int, StreamPosition] | None = None, rotation: int = 0
    ) -> None:
        """This rank of ``world_size``; ``positions``: each reader's last consumed sample;
        ``rotation``: DataLoader worker ``w`` plays this rank's reader ``(w + rotation) % workers``,
        so that a resumed DataLoader, which always starts with worker 0, hands out batches in the
        order the interrupted one would have."""
        self.rank, self.world_size = rank, world_size
        self.positions = dict(positions or {})
        self.rotation = rotation

    def check_readers(self, num_readers: int) -> None:
        """An endless stream needs a shard for every reader, or that reader would yield nothing."""
        if self.repeat and len(self.shards) < num_readers:
            raise ShardError(
                f"{len(self.shards)} shard(s) for {num_readers} readers (ranks × max(1, DATA.NUM_WORKERS)): every "
                "reader needs a shard; write smaller shards (tools/make_shards.py --shard-size) or use fewer workers"
            )

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into :attr:`shards` in the order epoch ``epoch`` deals them to the readers."""
        if not self.repeat:
            return list(range(len(self.shards)))
        return np.random.default_rng(mix_seed(self.seed, epoch)).permutation(len(self.shards)).tolist()

    def __iter__(self) -> Iterator[tuple[dict[str, Any], StreamMeta]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        reader = self.rank * workers + (worker + self.rotation) % workers
        return self.read(reader, self.world_size * workers, self.positions.get(reader))

    def read(self, reader: int, num_readers: int, last: StreamPosition | None = None) -> Iterator[tuple[dict, StreamMeta]]:
        """Reader ``reader`` of ``num_readers``: its samples from just after ``last`` on."""
        self.check_readers(num_readers)
        epoch = last.epoch if last else 0
        pending: list[BadSample] = []
        while True:
            mine = self.shard_order(epoch)[reader::num_readers]
            resuming = last is not None and epoch == last.epoch
            good = 0
            for cursor in range(last.cursor if resuming else 0, len(mine)):
                skip = last.emitted if resuming and cursor == last.cursor else -1
                for emitted, (index, raw) in enumerate(self._shuffled(mine[cursor], epoch)):
                    if emitted <= skip:
                        continue  # consumed before the checkpoint: not even decoded
                    try:
                        sample = self.decode(raw, mix_seed(self.seed, epoch, mine[cursor], index))
                    except _Bad as reason:
                        pending.append(self._skip(raw, str(reason), pending))
                        continue
                    good += 1
                    yield sample, StreamMeta(reader, StreamPosition(epoch, cursor, emitted), tuple(pending))
                    pending = []
            if not self.repeat:
                return
            if good == 0 and not resuming:
                shards = ", ".join(self.shards[i] for i in mine)
                raise TooManyBadSamplesError(f"no usable sample in a whole epoch of reader {reader}'s shards ({shards})")
            epoch += 1

    def _shuffled(self, shard: int, epoch: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(index in the shard, raw sample)`` pairs of one shard, in this epoch's order."""
        raw = enumerate(read_shard(self.shards[shard]))
        if not self.repeat or self.shuffle_buffer <= 1:
            return raw
        return wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=mix_seed(self.seed, epoch, shard))(raw)

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


class StreamProgress:
    """What one rank has consumed of the stream: each reader's last position, the batches, the
    samples read and the bad ones among them; stops the run when too many were bad.

    The bad fraction is judged from the ``1 / max_bad_fraction``-th sample on (at once when it
    is 0), so a single bad sample among the first few does not stop a run.
    """

    def __init__(self, max_bad_fraction: float, state: dict[str, Any] | None = None):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"DATA.MAX_BAD_FRACTION must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        state = state or {}
        self.positions = {int(r): StreamPosition(*p) for r, p in state.get("positions", {}).items()}
        self.batches = int(state.get("batches", 0))
        self.read = int(state.get("read", 0))
        self.num_bad = int(state.get("num_bad", 0))
        self.bad = [BadSample(*b) for b in state.get("bad", [])]

    def update(self, metas: Sequence[StreamMeta]) -> None:
        """Account for one consumed batch."""
        self.batches += 1
        for meta in metas:
            self.positions[meta.reader] = StreamPosition(*meta.position)
            self.read += 1 + len(meta.bad)
            self.num_bad += len(meta.bad)
            self.bad.extend(meta.bad)
        if self.num_bad:
            self.check()

    def check(self) -> None:
        fraction = self.max_bad_fraction
        judged = fraction == 0 or self.read * fraction >= 1
        if judged and self.num_bad > fraction * self.read:
            shown = "; ".join(map(str, self.bad[-20:]))
            more = " (the last 20 shown; each was logged when skipped)" if self.num_bad > 20 else ""
            raise TooManyBadSamplesError(
                f"{self.num_bad} of the {self.read} samples read on this rank were bad, more than "
                f"DATA.MAX_BAD_FRACTION {fraction}{more}: {shown}"
            )

    def state_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint of it loads with ``weights_only=True``."""
        return {
            "positions": {reader: list(position) for reader, position in self.positions.items()},
            "batches": self.batches,
            "read": self.read,
            "num_bad": self.num_bad,
            "bad": [[b.shard, b.key, b.reason] for b in self.bad[-_BAD_EXAMPLES_KEPT:]],
        }


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
        repeat=split == "train",
        num_classes=num_classes,
    )
