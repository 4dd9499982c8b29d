"""Caption metrics: CIDEr-D and BLEU-4 of generated captions against a split's references.

Scored with pycocoevalcap's ``Cider`` (which is CIDEr-D: Gaussian length penalty and clipped
counts, as on the COCO caption server) and ``Bleu``. The reference captions come from the
split's COCO annotation file.

Tokenisation for scoring: pycocoevalcap's PTBTokenizer runs a Java program, which this project
does not require. Both hypotheses and references are instead lower-cased, stripped of
punctuation and split on white space (:func:`text_for_scoring`); on COCO captions this differs
from the PTB tokeniser mainly in contractions, so scores are close to but not identical with the
server's. (The tokenizer's own :func:`pretrain.tokenizer.normalize_caption` is another thing:
what the official dataset applies to a caption before SentencePiece sees it.)
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from pretrain.data.dataset_root import load_json
from pretrain.errors import BadValueError

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def text_for_scoring(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def load_references(annotation_file: str | Path) -> dict[int, list[str]]:
    """image_id → normalised reference captions, from a COCO captions json."""
    annotations = load_json(annotation_file)["annotations"]  # errors name the file
    references: dict[int, list[str]] = defaultdict(list)
    for ann in annotations:
        references[int(ann["image_id"])].append(text_for_scoring(ann["caption"]))
    return dict(references)


def scorer_inputs(predictions: dict[int, str], references: dict[int, list[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's ``(gts, res)``: each image's references and its one normalised caption."""
    ids = sorted(predictions)
    return {i: references[i] for i in ids}, {i: [text_for_scoring(predictions[i]) or "<empty>"] for i in ids}


def caption_metrics(predictions: dict[int, str], references: dict[int, list[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 of one caption per image against its references."""
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise BadValueError(f"no reference captions for image ids {missing[:10]}")
    gts, res = scorer_inputs(predictions, references)
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr-D": float(cider), "BLEU-4": float(bleu[3])}
