"""Periodic validation during pretraining: loss on the val split and caption metrics.

Every rank evaluates its own shard; losses are summed across ranks, decoded captions are
gathered on rank 0 and scored by :func:`pretrain.caption_metrics.caption_metrics`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from pretrain.caption_metrics import caption_metrics
from pretrain.distributed import DistContext, all_gather_objects, all_reduce_sum
from pretrain.tokenizer import strip_special


def val_batches(dataset_size: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """This rank's share of the val split (every ``world_size``-th image), as fixed-seed
    ``(seed, index)`` batches for :class:`~pretrain.engine.sampling.SeededDataset`."""
    indices = list(range(rank, dataset_size, world_size))
    return [[(index, index) for index in indices[i : i + batch_size]] for i in range(0, len(indices), batch_size)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    move_batch: Callable[[dict], dict],
    decode: Callable[[list[int]], str] | None,
    references: dict[int, list[str]] | None,
    eos_index: int,
    first_word_index: int,
    autocast: Callable[[], object],
) -> dict[str, float]:
    """Mean val loss over all ranks' images and, when ``decode`` is given, CIDEr-D and BLEU-4 of
    the captions the model generates (``predictions`` of a forward pass without captions).

    ``model`` is the unwrapped module; it is put in eval mode and back in train mode afterwards.
    """
    model.eval()
    try:
        totals = torch.zeros(2, dtype=torch.float64)
        predictions: dict[int, str] = {}
        for batch in loader:
            batch = move_batch(batch)
            with autocast():
                loss = model(batch)["loss"]
            size = batch["image"].shape[0]
            totals += torch.tensor([float(loss) * size, size], dtype=torch.float64)
            if decode is not None:
                with autocast():
                    output = model({"image": batch["image"]})
                for image_id, ids in zip(batch["image_id"].tolist(), output["predictions"].tolist()):
                    predictions[int(image_id)] = decode(strip_special(ids, eos_index, first_word_index))
        totals = all_reduce_sum(totals.to(ctx.device)).cpu()
        results = {"val/loss": float(totals[0] / totals[1])}
        if decode is not None:
            merged: dict[int, str] = {}
            for part in all_gather_objects(predictions):
                merged.update(part)
            if ctx.is_main:
                results.update({f"val/{k}": v for k, v in caption_metrics(merged, references).items()})
        return results
    finally:
        model.train()
