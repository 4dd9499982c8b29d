"""Periodic validation during pretraining: loss on the val split, caption metrics, and for
multi-label classifiers the mean average precision of their class scores.

Every rank evaluates its own shard; losses are summed across ranks, decoded captions and class
scores are gathered on rank 0 and scored there (captions by
:func:`pretrain.caption_metrics.caption_metrics`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from pretrain.caption_metrics import caption_metrics
from pretrain.distributed import DistContext, all_gather_objects, all_reduce_sum
from pretrain.tokenizer import strip_special


def val_batches(dataset_size: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """This rank's share of the val split (every ``world_size``-th image), as fixed-seed
    ``(seed, index)`` batches for :class:`~pretrain.engine.sampling.SeededDataset`."""
    indices = list(range(rank, dataset_size, world_size))
    return [[(index, index) for index in indices[i : i + batch_size]] for i in range(0, len(indices), batch_size)]


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of scikit-learn's average precision of ``scores`` (N, C) against the
    multi-hot ``labels`` (N, C); classes without a positive image are left out (their AP is
    undefined), as in the VOC07 evaluation."""
    present = labels.sum(axis=0) > 0
    if not present.any():
        return float("nan")
    return float(np.mean([average_precision_score(labels[:, k], scores[:, k]) for k in np.flatnonzero(present)]))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    ctx: DistContext,
    move_batch: Callable[[dict], dict],
    decode: Callable[[list[int]], str] | None,
    references: dict[int, list[str]] | None,
    eos_index: int,
    first_word_index: int,
    autocast: Callable[[], object],
) -> dict[str, float]:
    """Mean val loss over all ranks' images; when ``decode`` is given, CIDEr-D and BLEU-4 of
    the captions the model generates (``predictions`` of a forward pass without captions); and
    when the model scores classes (``scores``) of batches with ``labels``, their mAP.

    ``model`` is the unwrapped module; it is put in eval mode and back in train mode afterwards.
    """
    model.eval()
    try:
        totals = torch.zeros(2, dtype=torch.float64)
        predictions: dict[int, str] = {}
        scored: list[tuple[np.ndarray, np.ndarray]] = []
        for batch in loader:
            batch = move_batch(batch)
            with autocast():
                output = model(batch)
            loss = output["loss"]
            if "scores" in output and "labels" in batch:
                scored.append((output["scores"].float().cpu().numpy(), batch["labels"].cpu().numpy()))
            size = batch["image"].shape[0]
            totals += torch.tensor([float(loss) * size, size], dtype=torch.float64)
            if decode is not None:
                with autocast():
                    output = model({"image": batch["image"]})
                for image_id, ids in zip(batch["image_id"].tolist(), output["predictions"].tolist()):
                    predictions[int(image_id)] = decode(strip_special(ids, eos_index, first_word_index))
        totals = all_reduce_sum(totals.to(ctx.device)).cpu()
        results = {"val/loss": float(totals[0] / totals[1])}
        gathered = [part for parts in all_gather_objects(scored) for part in parts]  # [] unless a classifier
        if gathered and ctx.is_main:
            results["val/mAP"] = mean_average_precision(np.concatenate([s for s, _ in gathered]),
                                                        np.concatenate([y for _, y in gathered]))
        if decode is not None:
            merged: dict[int, str] = {}
            for part in all_gather_objects(predictions):
                merged.update(part)
            if ctx.is_main:
                results.update({f"val/{k}": v for k, v in caption_metrics(merged, references).items()})
        return results
    finally:
        model.train()
