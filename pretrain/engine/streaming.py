"""The training loop's iterable path: batches from a shard stream, and its place in checkpoints.

The COCO path is map-style (:mod:`pretrain.engine.sampling`). A shard stream
(:class:`~pretrain.data.shards.ShardDataset`) is read sequentially by every DataLoader worker
of every rank, each from its own shards; :class:`StreamLoader` strips the position that travels
with each sample, keeps it (:class:`~pretrain.data.stream_progress.StreamProgress`), and hands
the loop plain batches. ``state_dict()`` gathers every rank's progress for the checkpoint, with
the stream's layout (:func:`~pretrain.data.stream_layout.layout_of`: a fingerprint of the
shard names in order, the seed, shuffle buffer, open shards, world size and workers). A resumed
run with the same layout continues each reader right after its last trained sample, so nothing
is repeated or skipped. With any other layout the readers do not map onto the new ones: every
reader restarts the earliest epoch any old reader was in, leaving out (for an unchanged shard
list) the shards the old readers had finished in each epoch, and a warning says what changed
and how many samples are read again (:mod:`pretrain.data.stream_layout`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch.utils.data import DataLoader

from pretrain.checkpoint_io import checkpoint_path, read_training_checkpoint
from pretrain.data.shards import (
    ShardDataset,
    ShardError,
    StreamCollate,
    StreamPosition,
    StreamProgress,
    TooManyBadSamplesError,
    TooManyBadShardsError,
)
from pretrain.data.stream_layout import finished_shards, layout_of
from pretrain.distributed import DistContext, all_gather_objects
from pretrain.stop_signals import batches_of, ignore_stop_signals

logger = logging.getLogger("pretrain.engine")


def saved_stream_state(output_dir: Path, iteration: int) -> dict[str, Any] | None:
    """The ``data`` entry of the checkpoint a run resumed from (None for a fresh run)."""
    if not iteration:
        return None
    state = read_training_checkpoint(checkpoint_path(output_dir, iteration)).get("data")
    if state is None:
        logger.warning("checkpoint_%d.pth holds no shard stream position: the stream starts from its beginning", iteration)
    return state


def _restart(saved: dict[str, Any], layout: dict[str, Any], ctx: DistContext, workers: int):
    """This rank's progress and the finished shards per epoch when the saved layout differs:
    every reader restarts the earliest epoch in progress (see the module docstring)."""
    old_layout = saved.get("layout") or {}
    all_positions = {int(r): p for rank in saved["ranks"] for r, p in rank["positions"].items()}
    epoch = min((p[0] for p in all_positions.values()), default=0)
    changed = {key: (old_layout.get(key), value) for key, value in layout.items() if old_layout.get(key) != value}
    same_list = old_layout.get("shard_list") == layout["shard_list"]
    if same_list and all_positions:
        positions = {r: StreamPosition.from_state(p) for r, p in all_positions.items()}
        finished = finished_shards(old_layout, positions, {int(e): s for e, s in saved.get("finished", {}).items()})
        partly = [(p, slot) for p in positions.values() for slot in p.slots]
        again = (f"the {sum(emitted + 1 for _, (_, emitted) in partly)} samples already read of the {len(partly)} "
                 "shards the old readers had open are read again; shards they had finished are left out")
    else:
        finished = {}
        again = "the shard list is another (or the checkpoint predates layouts): that epoch is read whole"
    shown = {key: tuple(str(v)[:12] if key == "shard_list" else v for v in pair) for key, pair in changed.items()}
    logger.warning("the checkpoint's stream layout differs (%s): every reader restarts epoch %d; %s",
                   ", ".join(f"{key} {old} -> {new}" for key, (old, new) in shown.items()), epoch, again)
    per_rank = max(1, workers)
    readers = range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    mine = saved["ranks"][ctx.rank] if ctx.rank < len(saved["ranks"]) else {}
    kept = {key: value for key, value in mine.items() if same_list or key not in ("shards_read", "bad_shards")}
    return {**kept, "positions": {r: StreamPosition.start_of(epoch).to_state() for r in readers}, "batches": 0}, finished


class StreamLoader:
    """This rank's batches of a shard stream, endlessly; see the module docstring."""

    def __init__(
        self, dataset: ShardDataset, cfg: CfgNode, ctx: DistContext, collate_fn: Callable, saved: dict[str, Any] | None
    ):
        workers = cfg.DATA.NUM_WORKERS
        self.dataset, self.ctx, self.workers = dataset, ctx, workers
        dataset.check_readers(ctx.world_size * max(1, workers))
        self.layout = layout_of(dataset.shards, dataset.seed, dataset.shuffle_buffer, dataset.open_shards,
                                ctx.world_size, workers)
        state, self.finished = None, {}
        if saved is not None and saved.get("layout") == self.layout:
            state = saved["ranks"][ctx.rank]
            self.finished = {int(e): set(s) for e, s in saved.get("finished", {}).items()}
        elif saved is not None:
            state, self.finished = _restart(saved, self.layout, ctx, workers)
        self.progress = StreamProgress(cfg.DATA.MAX_BAD_FRACTION, state, num_shards=len(dataset.shards),
                                       max_bad_shard_fraction=cfg.DATA.MAX_BAD_SHARD_FRACTION)
        per_rank = max(1, workers)
        for reader in range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank):  # every reader is in the checkpoint
            self.progress.positions.setdefault(reader, StreamPosition.start_of(0))
        dataset.configure(ctx.rank, ctx.world_size, dict(self.progress.positions),
                          rotation=self.progress.batches % per_rank, finished=self.finished)
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.OPTIM.BATCH_SIZE // ctx.world_size,
            collate_fn=StreamCollate(collate_fn),
            num_workers=workers,
            pin_memory=ctx.device.type != "cpu",
            generator=torch.Generator().manual_seed(cfg.RANDOM_SEED + ctx.rank),  # keeps the global RNG untouched
            worker_init_fn=ignore_stop_signals,
        )

    def __iter__(self) -> Iterator[dict]:
        try:
            with batches_of(self.loader) as batches:
                for batch, metas in batches:
                    self.progress.update(metas)
                    yield batch
        except (ShardError, TooManyBadSamplesError, TooManyBadShardsError) as err:
            raise type(err)(_worker_message(err)) from None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's progress with the layout (a collective: all ranks call it together, as
        they save); finished shards are kept only for epochs some reader has not passed."""
        ranks = all_gather_objects(self.progress.state_dict())
        first = min(p[0] for rank in ranks for p in rank["positions"].values())
        finished = {epoch: sorted(shards) for epoch, shards in self.finished.items() if epoch >= first}
        return {"layout": dict(self.layout), "finished": finished, "ranks": ranks}


def val_stream_batches(dataset: ShardDataset, cfg: CfgNode, ctx: DistContext, collate_fn: Callable) -> Iterator[dict]:
    """One pass over this rank's share of the val shards, as plain batches."""
    dataset.configure(ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_size=cfg.OPTIM.BATCH_SIZE // ctx.world_size, collate_fn=StreamCollate(collate_fn),
                        num_workers=cfg.DATA.NUM_WORKERS, worker_init_fn=ignore_stop_signals)
    with batches_of(loader) as batches:
        for batch, _ in batches:
            yield batch


def _worker_message(error: Exception) -> str:
    """The original message of an error a DataLoader worker raised (the DataLoader re-raises it
    with the worker's traceback in front: 'Caught ... Original Traceback ... Type: message')."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    return text[text.rindex(marker) + len(marker):].strip() if "Original Traceback" in text and marker in text else text
