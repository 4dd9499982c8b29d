"""Which shards each reader of a shard stream reads in an epoch, and what a checkpoint's
positions mean when a run resumes with another layout.

The *layout* is everything that fixes the stream's order: the shard names in order (as a
fingerprint), ``RANDOM_SEED``, ``DATA.SHUFFLE_BUFFER``, ``DATA.OPEN_SHARDS``, the world size
and ``DATA.NUM_WORKERS``. Positions saved under one layout continue the stream exactly under
the same layout. Under another, old readers do not map onto new ones, so every reader restarts
the earliest epoch any old reader was in, and (when the shard list is unchanged) each epoch
from there leaves out the shards the old readers had *finished* in it. What is read twice is
then only the part the old readers had read of the shards they had open (at most old readers
× ``DATA.OPEN_SHARDS`` shards), however far apart the old readers' epochs had drifted (they
drift when the shards do not divide evenly among readers: a reader with fewer samples per
epoch runs through its epochs faster). Nothing is skipped. With another shard list, the old
indices mean nothing: every reader restarts the earliest epoch whole.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


class StreamPosition(NamedTuple):
    """Where a reader is, after its last consumed sample: ``epoch``; ``cursor``, the next shard
    to open in its list of that epoch; ``draws``, the draws among its open shards so far; and
    ``slots``, its open shards as ``(index in its list, index of the last sample taken from
    that shard's shuffled order)``, in slot order. ``StreamPosition(e, 0, 0, ())``: epoch ``e``
    from its beginning."""

    epoch: int
    cursor: int
    draws: int
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def start_of(cls, epoch: int) -> StreamPosition:
        return cls(epoch, 0, 0, ())

    @classmethod
    def from_state(cls, state: Sequence) -> StreamPosition:
        epoch, cursor, draws, slots = state
        return cls(int(epoch), int(cursor), int(draws), tuple((int(c), int(e)) for c, e in slots))

    def to_state(self) -> list:
        """Plain lists, so a checkpoint of it loads with ``weights_only=True``."""
        return [self.epoch, self.cursor, self.draws, [list(slot) for slot in self.slots]]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (numpy's SeedSequence: well spread, platform-stable)."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def shard_list_fingerprint(shards: Sequence[str]) -> str:
    """SHA-256 of the shard names in order: another list (even of the same length) is another stream."""
    return hashlib.sha256(json.dumps(list(shards)).encode("utf-8")).hexdigest()


def layout_of(shards: Sequence[str], seed: int, shuffle_buffer: int, open_shards: int, world_size: int,
              workers: int) -> dict[str, Any]:
    """The layout a checkpoint's positions belong to (plain types)."""
    return {"shard_list": shard_list_fingerprint(shards), "num_shards": len(shards), "seed": seed,
            "shuffle_buffer": shuffle_buffer, "open_shards": open_shards, "world_size": world_size,
            "num_workers": workers}


def num_readers(layout: Mapping[str, Any]) -> int:
    return layout["world_size"] * max(1, layout["num_workers"])


def deal(seed: int, num_shards: int, epoch: int, reader: int, readers: int, finished: Iterable[int] = ()) -> list[int]:
    """Reader ``reader``'s shards (indices) in epoch ``epoch``: the shards are permuted with
    ``(seed, epoch)``, those in ``finished`` left out, and dealt round-robin, starting at a
    reader that moves on by one each epoch, so that the readers who get one shard more than
    the others change from epoch to epoch (their epochs drift less apart)."""
    order = np.random.default_rng(mix_seed(seed, epoch)).permutation(num_shards).tolist()
    finished = set(finished)
    if finished:
        order = [shard for shard in order if shard not in finished]
    return order[(reader + epoch) % readers :: readers]


def finished_shards(layout: Mapping[str, Any], positions: Mapping[int, StreamPosition],
                    finished: Mapping[int, Iterable[int]]) -> dict[int, set[int]]:
    """Per epoch from the earliest one in ``positions`` on, the shards finished in it by the
    readers of ``layout`` (whose epochs already left out ``finished``)."""
    first = min(p.epoch for p in positions.values())
    done = {e: set(finished.get(e, ())) for e in range(first, max(p.epoch for p in positions.values()) + 1)}
    readers = num_readers(layout)
    for reader, position in positions.items():
        for epoch in range(first, position.epoch + 1):
            mine = deal(layout["seed"], layout["num_shards"], epoch, reader, readers, finished.get(epoch, ()))
            if epoch < position.epoch:
                done[epoch].update(mine)
            else:
                still_open = {cursor for cursor, _ in position.slots}
                done[epoch].update(s for i, s in enumerate(mine[: position.cursor]) if i not in still_open)
    return {epoch: shards for epoch, shards in done.items() if shards}
