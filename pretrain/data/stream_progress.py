"""What one rank has consumed of a shard stream, and the bounds on bad input it enforces.

Each sample a reader yields carries a :class:`StreamMeta`: its reader, the reader's position
after it, and what was skipped since the reader's previous sample (bad samples, shards
opened, unreadable shard tails). :class:`StreamProgress`, in the training process, folds the
metas of every consumed batch: each reader's last position (what a checkpoint stores) and the
counts behind two bounds, each stopping the run with exit status 2 and a list:

* bad samples: more than ``DATA.MAX_BAD_FRACTION`` of the samples the rank has read;
* bad shards: more than ``DATA.MAX_BAD_SHARD_FRACTION`` of the *distinct* shards the rank has
  opened had an unreadable tail. Distinct, because a cut shard is cut in every epoch: counting
  reads would make the fraction swing with where the shard falls in each epoch's order.

Both are judged only once enough was read for one fault not to exceed the bound on its own
(the ``1 / fraction``-th sample; the ``1 / fraction``-th distinct shard or every shard).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pretrain.data.shard_reader import ShardFault
from pretrain.data.stream_layout import StreamPosition
from pretrain.errors import BadValueError, InputError

_BAD_EXAMPLES_KEPT = 100  # bad samples a checkpoint remembers (the count is always kept)


class TooManyBadSamplesError(InputError, RuntimeError):
    """More of a rank's samples were bad than ``DATA.MAX_BAD_FRACTION`` allows."""


class TooManyBadShardsError(InputError, RuntimeError):
    """More of a rank's shards had an unreadable tail than ``DATA.MAX_BAD_SHARD_FRACTION`` allows."""


@dataclass(frozen=True)
class BadSample:
    """A skipped sample: its shard, its key and why it was skipped."""

    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.reason}"


class StreamMeta(NamedTuple):
    """What travels with each sample: who read it, the reader's position after it, and since
    the reader's previous sample the bad samples skipped, the shards opened (indices) and the
    unreadable shard tails met."""

    reader: int
    position: StreamPosition
    bad: tuple[BadSample, ...] = ()
    opened: tuple[int, ...] = ()
    faults: tuple[ShardFault, ...] = ()


def _check_fraction(key: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise BadValueError(f"{key} must be in [0, 1], got {value}")
    return value


class StreamProgress:
    """One rank's consumption of the stream (see the module docstring). ``num_shards``: the
    length of the shard list, which caps how many distinct shards must be read before the
    bad-shard fraction is judged."""

    def __init__(self, max_bad_fraction: float, state: dict[str, Any] | None = None, *,
                 max_bad_shard_fraction: float = 1.0, num_shards: int = 1):
        self.max_bad_fraction = _check_fraction("DATA.MAX_BAD_FRACTION", max_bad_fraction)
        self.max_bad_shard_fraction = _check_fraction("DATA.MAX_BAD_SHARD_FRACTION", max_bad_shard_fraction)
        self.num_shards = num_shards
        state = state or {}
        self.positions = {int(r): StreamPosition.from_state(p) for r, p in state.get("positions", {}).items()}
        self.batches = int(state.get("batches", 0))
        self.read = int(state.get("read", 0))
        self.num_bad = int(state.get("num_bad", 0))
        self.bad = [BadSample(*b) for b in state.get("bad", [])]
        self.shards_read = {int(s) for s in state.get("shards_read", [])}
        self.bad_shards = {f[0]: ShardFault(*f) for f in state.get("bad_shards", [])}

    def update(self, metas: Sequence[StreamMeta]) -> None:
        """Account for one consumed batch."""
        self.batches += 1
        for meta in metas:
            self.positions[meta.reader] = meta.position
            self.read += 1 + len(meta.bad)
            self.num_bad += len(meta.bad)
            self.bad.extend(meta.bad)
            self.shards_read.update(meta.opened)
            for fault in meta.faults:
                self.bad_shards[fault.shard] = fault  # its shard is in this or an earlier meta's opened
        if self.bad_shards:
            self.check_shards()
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

    def check_shards(self) -> None:
        fraction = self.max_bad_shard_fraction
        needed = self.num_shards if fraction == 0 else min(self.num_shards, math.ceil(1 / fraction))
        read = len(self.shards_read)
        if read >= needed and len(self.bad_shards) > fraction * read:
            shown = "; ".join(map(str, list(self.bad_shards.values())[:20]))
            raise TooManyBadShardsError(
                f"{len(self.bad_shards)} of the {read} shards read on this rank have an unreadable tail, more than "
                f"DATA.MAX_BAD_SHARD_FRACTION {fraction}: {shown}"
            )

    def state_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint of it loads with ``weights_only=True``."""
        return {
            "positions": {reader: position.to_state() for reader, position in self.positions.items()},
            "batches": self.batches,
            "read": self.read,
            "num_bad": self.num_bad,
            "bad": [[b.shard, b.key, b.reason] for b in self.bad[-_BAD_EXAMPLES_KEPT:]],
            "shards_read": sorted(self.shards_read),
            "bad_shards": [list(f) for _, f in sorted(self.bad_shards.items())],
        }
