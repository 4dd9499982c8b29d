"""Periodic validation: loss on the val split and caption metrics (CIDEr-D, BLEU-4).

Every rank evaluates its own shard; losses are summed across ranks, decoded captions are
gathered on rank 0 and scored with pycocoevalcap's ``Cider`` (which is CIDEr-D: Gaussian length
penalty and clipped counts, as on the COCO caption server) and ``Bleu``. The reference captions
come from the split's COCO annotation file.

Tokenisation for scoring: pycocoevalcap's PTBTokenizer runs a Java program, which this project
does not require. Both hypotheses and references are instead lower-cased, stripped of
punctuation and split on white space (:func:`normalise_caption`); on COCO captions this differs
from the PTB tokeniser mainly in contractions, so scores are close to but not identical with the
server's.
"""
from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch import nn
from torch.utils.data import DataLoader

from pretrain.engine.distributed import DistContext, all_gather_objects, all_reduce_sum

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_caption(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def load_references(annotation_file: str | Path) -> dict[int, list[str]]:
    """image_id → normalised reference captions, from a COCO captions json."""
    with open(annotation_file, encoding="utf-8") as handle:
        annotations = json.load(handle)["annotations"]
    references: dict[int, list[str]] = defaultdict(list)
    for ann in annotations:
        references[int(ann["image_id"])].append(normalise_caption(ann["caption"]))
    return dict(references)


def caption_metrics(predictions: dict[int, str], references: dict[int, list[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 of one caption per image against its references."""
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise KeyError(f"no reference captions for image ids {missing[:10]}")
    ids = sorted(predictions)
    gts = {i: references[i] for i in ids}
    res = {i: [normalise_caption(predictions[i]) or "<empty>"] for i in ids}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr-D": float(cider), "BLEU-4": float(bleu[3])}


def val_batches(dataset_size: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """This rank's share of the val split (every ``world_size``-th image), as fixed-seed
    ``(seed, index)`` batches for :class:`~pretrain.engine.sampling.SeededDataset`."""
    indices = list(range(rank, dataset_size, world_size))
    return [[(index, index) for index in indices[i : i + batch_size]] for i in range(0, len(indices), batch_size)]


def strip_special(token_ids: list[int], eos_index: int, first_word_index: int) -> list[int]:
    """Token ids up to the first EOS, without padding and control symbols."""
    if eos_index in token_ids:
        token_ids = token_ids[: token_ids.index(eos_index)]
    return [t for t in token_ids if t >= first_word_index]


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
