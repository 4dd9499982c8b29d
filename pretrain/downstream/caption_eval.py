"""Captioning evaluation: decode a COCO-format split with the model's decoder and score it.

CIDEr-D and BLEU-4 come from :func:`pretrain.engine.validation.caption_metrics` (the metric
used during pretraining, with the same caption normalisation), so the numbers of this tool and
of the training logs agree. METEOR and SPICE need Java, and SPICE also needs the Stanford
CoreNLP jars that pycocoevalcap otherwise downloads on first use; each is computed only when
everything it needs is present on this machine. Otherwise it is reported as unavailable, with
the reason, and never as a score of zero.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pretrain.caption_metrics import caption_metrics, scorer_inputs
from pretrain.checkpoint_io import load_model_weights
from pretrain.data.collate import collate_fn
from pretrain.distributed import make_batch_mover
from pretrain.errors import BadValueError
from pretrain.models.decoding import OFFICIAL
from pretrain.tasks import build_model
from pretrain.tokenizer import WORD_START, SentencePieceBPETokenizer, group_pieces

logger = logging.getLogger(__name__)

SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def caption_eval_config(cfg):
    """``cfg`` with ``DATA.IMAGE_TRANSFORM_VAL`` set to ``DATA.IMAGE_TRANSFORM_CAPTION_EVAL``: the
    input the caption tools give the model (by default the official evaluation's: shorter side
    256, central 224 crop), while periodic validation during training keeps the val transform."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATA.IMAGE_TRANSFORM_VAL = list(cfg.DATA.IMAGE_TRANSFORM_CAPTION_EVAL)
    cfg.freeze()
    return cfg


def load_captioning_model(cfg, checkpoint: str | Path) -> tuple[nn.Module, SentencePieceBPETokenizer]:
    """The config's captioning model with all weights of ``checkpoint`` (strictly), in eval
    mode, and the config's tokenizer, checked against the config's special ids and size.

    Raises ``ValueError`` for a model that does not generate captions or a tokenizer that does
    not fit, and :class:`~pretrain.checkpoint_io.CheckpointError` naming the file for a checkpoint
    that does not fit the config's model.
    """
    tokenizer = SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL)
    tokenizer.check_against_config(cfg.DATA)
    model = build_model(cfg)
    if not hasattr(model, "decode_features"):
        raise BadValueError(f"MODEL.NAME '{cfg.MODEL.NAME}' does not generate captions")
    load_model_weights(model, checkpoint)
    return model.eval(), tokenizer


def prediction_text(model: nn.Module, tokenizer: SentencePieceBPETokenizer) -> Callable[[list[int]], str]:
    """How a row of ``model``'s ``predictions`` becomes a caption, as its decoder's rules read it.

    Official rules (MODEL.DECODER.NAME ``beam_search``, ``nucleus_sampling``): the whole row
    through :meth:`~SentencePieceBPETokenizer.decode_official`, as the official captioning
    script does, so an official checkpoint gives the official captions to the character: the
    repeated [EOS] of an ended row and a generated [SOS]/[MASK] vanish, a generated ``<unk>``
    reads " \u2047 ". Our rules: :meth:`~SentencePieceBPETokenizer.decode`, for which id 0 is the
    padding after [EOS] (our decoders never generate ``<unk>``).
    """
    if model.decoder is not None and model.decoder.rules == OFFICIAL:
        return tokenizer.decode_official
    return tokenizer.decode


@torch.no_grad()
def decode_dataset(
    model: nn.Module,
    dataset: Dataset,
    text: Callable[[list[int]], str],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 2,
) -> dict[int, str]:
    """image_id -> generated caption for every image of a captioning dataset.

    ``model`` is a captioning model; an image-only batch makes it decode with its configured
    decoder (beam search by default). ``text`` turns a row of its predictions into the caption
    (:func:`prediction_text`).
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn)
    model = model.to(device).eval()
    captions: dict[int, str] = {}
    for batch in tqdm(loader, desc="decoding", unit="batch", mininterval=2.0):
        predictions = model({"image": batch["image"].to(device)})["predictions"].cpu()
        for image_id, ids in zip(batch["image_id"].tolist(), predictions.tolist()):
            captions[int(image_id)] = text(ids)
    return captions


def _batches_to_compare(
    model: nn.Module, dataset: Dataset, device: torch.device | str, batch_size: int, num_workers: int, desc: str
) -> Iterator[dict[str, Any]]:
    """Each batch of ``dataset`` on ``device``, ``model`` in eval mode there. Every image is in
    one: a last batch of one image, which has no other image to pair its caption with, joins the
    batch before it (:func:`comparison_batches`); only a dataset of one image yields nothing."""
    if batch_size < 2:
        raise BadValueError(f"the {desc} needs batches of at least 2 images (it pairs each caption with another "
                            f"image of its batch), got a batch size of {batch_size}")
    loader = DataLoader(dataset, batch_sampler=comparison_batches(len(dataset), batch_size), num_workers=num_workers,
                        collate_fn=collate_fn)
    model.to(device).eval()
    move = make_batch_mover(torch.device(device), channels_last=False)
    for batch in tqdm(loader, desc=desc, unit="batch", mininterval=2.0):
        if batch["image"].size(0) >= 2:
            yield move(batch)


def comparison_batches(size: int, batch_size: int) -> list[list[int]]:
    """The indices of ``size`` images in order, ``batch_size`` a batch, except that a last batch
    of one image joins the batch before it (which then has ``batch_size + 1``)."""
    batches = [list(range(start, min(start + batch_size, size))) for start in range(0, size, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = batches[-2] + batches[-1]
        del batches[-1]
    return batches


@torch.no_grad()
def grounding_gap(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 2,
) -> dict[str, float]:
    """How much the captioning loss depends on the image: the mean loss with each caption's own
    image, and with the images of every batch rotated by one so that each caption meets another
    image. A model that ignores the image (a language model in disguise) has a gap of zero.
    Every image of ``dataset`` counts: a last batch of one image joins the batch before it
    (``batch_size`` must be 2 or more). The losses are means over the batches.
    """
    matched = shuffled = 0.0
    batches = 0
    for batch in _batches_to_compare(model, dataset, device, batch_size, num_workers, "grounding gap"):
        matched += float(model(batch)["loss"])
        shuffled += float(model({**batch, "image": batch["image"].roll(1, 0)})["loss"])
        batches += 1
    if batches == 0:
        raise BadValueError("the grounding gap needs a split with at least 2 images")
    return {"loss_matched_images": matched / batches, "loss_shuffled_images": shuffled / batches,
            "grounding_gap": (shuffled - matched) / batches}


@dataclass
class WordGrounding:
    """One word of the captions: how often it occurs and its mean loss (nats, summed over its
    pieces) under the forward head with its caption's own image and with another image."""

    word: str
    count: int
    loss_matched_images: float
    loss_shuffled_images: float

    @property
    def gap(self) -> float:
        return self.loss_shuffled_images - self.loss_matched_images


def _forward_token_losses(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) teacher-forced next-token CE of the forward head (0 where the target is padding),
    with each caption's own image and with the images of the batch rotated by one."""
    head = model.textual
    tokens = batch["caption_tokens"]
    projected = head.project_visual(model.visual(batch["image"]))

    def losses(memory: torch.Tensor) -> torch.Tensor:
        logits = head.output(head.hidden_states(memory, tokens[:, :-1], batch["caption_lengths"])).float()
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=head.padding_idx, reduction="none")

    return losses(projected), losses(projected.roll(1, 0))


def mean_gap(words: Sequence[WordGrounding]) -> float | None:
    """The grounding gap of a group of words (e.g. the class words), weighted by their counts."""
    count = sum(w.count for w in words)
    if not count:
        return None
    return sum(w.gap * w.count for w in words) / count


@torch.no_grad()
def word_grounding(
    model: nn.Module,
    dataset: Dataset,
    id_to_piece: Callable[[int], str],
    first_word_index: int,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 2,
) -> list[WordGrounding]:
    """The grounding gap word by word, most frequent words first: which words of the captions
    the model predicts better from their own image (objects, colours, counts) and which it gets
    from the language alone. Punctuation counts as words of its own; special tokens (ids below
    ``first_word_index``) are left out. The captions are those the dataset draws, one per
    image, as for :func:`grounding_gap`."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for batch in _batches_to_compare(model, dataset, device, batch_size, num_workers, "word grounding"):
        matched, shuffled = _forward_token_losses(model, batch)
        for targets, own, other in zip(batch["caption_tokens"][:, 1:].tolist(), matched.tolist(), shuffled.tolist()):
            positions = [i for i, token in enumerate(targets) if token >= first_word_index]
            pieces = [id_to_piece(targets[i]) for i in positions]
            for group in group_pieces(pieces, punctuation_apart=True):
                entry = totals["".join(pieces[i] for i in group).lstrip(WORD_START)]
                entry[0] += 1
                entry[1] += sum(own[positions[i]] for i in group)
                entry[2] += sum(other[positions[i]] for i in group)
    if not totals:
        raise BadValueError("word grounding needs a split with at least 2 images")
    words = [WordGrounding(word, int(n), own / n, other / n) for word, (n, own, other) in totals.items()]
    return sorted(words, key=lambda w: (-w.count, w.word))


def _missing_java_files(module: str, files: Sequence[str]) -> str | None:
    """Why a Java scorer of pycocoevalcap cannot run offline (no Java, or one of ``files``,
    relative to ``module``'s folder, absent), or None when it can."""
    if shutil.which("java") is None:
        return "needs Java (no 'java' on PATH)"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return f"{module} is not installed"
    folder = Path(spec.origin).parent
    for name in files:
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    return None


def meteor_unavailable() -> str | None:
    """Why METEOR cannot be computed here, or None when it can."""
    return _missing_java_files("pycocoevalcap.meteor.meteor", ("meteor-1.5.jar", "data/paraphrase-en.gz"))


def spice_unavailable() -> str | None:
    """Why SPICE cannot be computed offline here (pycocoevalcap would try to download the
    Stanford CoreNLP jars), or None when it can."""
    jars = tuple(f"lib/{jar}" for jar in SPICE_CORENLP_JARS)
    return _missing_java_files("pycocoevalcap.spice.spice", ("spice-1.0.jar", *jars))


def _java_metric(name: str, predictions: dict[int, str], references: dict[int, list[str]]) -> float | str:
    """METEOR or SPICE through pycocoevalcap, or the reason it is unavailable."""
    reason = meteor_unavailable() if name == "METEOR" else spice_unavailable()
    if reason is not None:
        return f"unavailable: {reason}"
    gts, res = scorer_inputs(predictions, references)
    try:
        if name == "METEOR":
            from pycocoevalcap.meteor.meteor import Meteor

            score, _ = Meteor().compute_score(gts, res)
        else:
            from pycocoevalcap.spice.spice import Spice

            score, _ = Spice().compute_score(gts, res)
    except (OSError, ValueError, RuntimeError, AssertionError) as err:
        logger.warning("%s could not be computed: %s", name, err)
        return f"unavailable: the {name} scorer failed ({type(err).__name__}: {err})"
    return float(score)


def score_captions(predictions: dict[int, str], references: dict[int, list[str]]) -> dict[str, float | str]:
    """CIDEr-D, BLEU-4, METEOR and SPICE of one caption per image.

    Values are floats in [0, 1] (CIDEr-D in [0, 10]); METEOR/SPICE are strings starting with
    "unavailable:" when they cannot be computed here.
    """
    if not predictions:
        raise BadValueError("no captions to score")
    scores: dict[str, float | str] = dict(caption_metrics(predictions, references))
    for name in ("METEOR", "SPICE"):
        scores[name] = _java_metric(name, predictions, references)
    return scores
