"""The training loop's iterable path: batches from a shard stream, and its place in checkpoints.

The COCO path is map-style (:mod:`pretrain.engine.sampling`). A shard stream
(:class:`~pretrain.data.shards.ShardDataset`) is read sequentially by every DataLoader worker
of every rank, each from its own shards; :class:`StreamLoader` strips the position that travels
with each sample, keeps it (:class:`~pretrain.data.shards.StreamProgress`), and hands the loop
plain batches. ``state_dict()`` gathers every rank's progress for the checkpoint; a resumed run
continues each reader right after its last trained sample, so nothing is repeated or skipped as
long as the world size, ``DATA.NUM_WORKERS`` and the shard list are those of the checkpoint.
When they differ the readers do not map onto the new ones: every reader then starts the
earliest epoch any old reader was in from its beginning (up to one epoch repeated), with a
warning.
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
)
from pretrain.distributed import DistContext, all_gather_objects

logger = logging.getLogger("pretrain.engine")


def saved_stream_state(output_dir: Path, iteration: int) -> dict[str, Any] | None:
    """The ``data`` entry of the checkpoint a run resumed from (None for a fresh run)."""
    if not iteration:
        return None
    state = read_training_checkpoint(checkpoint_path(output_dir, iteration)).get("data")
    if state is None:
        logger.warning("checkpoint_%d.pth holds no shard stream position: the stream starts from its beginning", iteration)
    return state


def _rank_progress(saved: dict[str, Any] | None, dataset: ShardDataset, ctx: DistContext, workers: int) -> dict | None:
    """This rank's saved progress, or, when the saved layout differs, a restart of the earliest
    epoch in progress for each of this rank's readers."""
    if saved is None:
        return None
    layout = {"world_size": ctx.world_size, "num_workers": workers, "num_shards": len(dataset.shards)}
    if all(saved.get(key) == value for key, value in layout.items()):
        return saved["ranks"][ctx.rank]
    epochs = [p[0] for rank in saved["ranks"] for p in rank["positions"].values()]
    epoch = min(epochs, default=0)
    logger.warning(
        "the checkpoint's stream was read by %s; this run has %s: every reader restarts epoch %d from its "
        "beginning (samples of that epoch already trained on are seen again)",
        {key: saved.get(key) for key in layout}, layout, epoch,
    )
    per_rank = max(1, workers)
    readers = range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    mine = saved["ranks"][ctx.rank] if ctx.rank < len(saved["ranks"]) else {}
    return {**mine, "positions": {r: [epoch, 0, -1] for r in readers}, "batches": 0}


class StreamLoader:
    """This rank's batches of a shard stream, endlessly; see the module docstring."""

    def __init__(
        self, dataset: ShardDataset, cfg: CfgNode, ctx: DistContext, collate_fn: Callable, saved: dict[str, Any] | None
    ):
        workers = cfg.DATA.NUM_WORKERS
        self.dataset, self.ctx, self.workers = dataset, ctx, workers
        dataset.check_readers(ctx.world_size * max(1, workers))
        self.progress = StreamProgress(cfg.DATA.MAX_BAD_FRACTION, _rank_progress(saved, dataset, ctx, workers))
        positions = {reader: StreamPosition(*p) for reader, p in self.progress.positions.items()}
        dataset.configure(ctx.rank, ctx.world_size, positions, rotation=self.progress.batches % max(1, workers))
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.OPTIM.BATCH_SIZE // ctx.world_size,
            collate_fn=StreamCollate(collate_fn),
            num_workers=workers,
            pin_memory=ctx.device.type != "cpu",
            generator=torch.Generator().manual_seed(cfg.RANDOM_SEED + ctx.rank),  # keeps the global RNG untouched
        )

    def __iter__(self) -> Iterator[dict]:
        try:
            for batch, metas in self.loader:
                self.progress.update(metas)
                yield batch
        except (ShardError, TooManyBadSamplesError) as err:
            raise type(err)(_worker_message(err)) from None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's progress (a collective: all ranks call it together, as they save)."""
        return {
            "world_size": self.ctx.world_size,
            "num_workers": self.workers,
            "num_shards": len(self.dataset.shards),
            "ranks": all_gather_objects(self.progress.state_dict()),
        }


def val_stream_batches(dataset: ShardDataset, cfg: CfgNode, ctx: DistContext, collate_fn: Callable) -> Iterator[dict]:
    """One pass over this rank's share of the val shards, as plain batches."""
    dataset.configure(ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_size=cfg.OPTIM.BATCH_SIZE // ctx.world_size, collate_fn=StreamCollate(collate_fn),
                        num_workers=cfg.DATA.NUM_WORKERS)
    for batch, _ in loader:
        yield batch


def _worker_message(error: Exception) -> str:
    """The original message of an error a DataLoader worker raised (the DataLoader re-raises it
    with the worker's traceback in front: 'Caught ... Original Traceback ... Type: message')."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    return text[text.rindex(marker) + len(marker):].strip() if "Original Traceback" in text and marker in text else text
