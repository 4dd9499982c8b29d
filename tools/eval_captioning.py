#!/usr/bin/env python
"""Caption the COCO val split with a pretrained model and score the captions.

    python tools/eval_captioning.py --config CFG --checkpoint outputs/run/checkpoint_500000.pth \\
        --output outputs/run/captions_val.json [--opts MODEL.DECODER.BEAM_SIZE 5]

Images of ``DATA.ROOT/val2017`` (references in ``DATA.ROOT/annotations/captions_val2017.json``)
go through the config's DATA.IMAGE_TRANSFORM_CAPTION_EVAL (by default the official evaluation's:
shorter side 256, centre crop; not DATA.IMAGE_TRANSFORM_VAL of the validation during
pretraining) and are decoded by the forward head with MODEL.DECODER (beam search, beam 5, by
default). Reported: CIDEr-D and BLEU-4 (as in the
pretraining logs), and METEOR and SPICE when their Java dependencies are present on this
machine (otherwise "unavailable" with the reason), and the grounding gap: the val loss with
each caption's own image against the loss with the images of a batch rotated, which is zero for
a model that ignores the image. The same gap word by word (forward head, the loss of each word
with its caption's own image and with another one) shows *what* the captions take from the
image: the ``--words`` most frequent words are printed, every word is in the output. Where the
split has an instances file (``instances_val2017.json``), the captions' class words are checked
against the objects of each image: the share of images whose caption names a class they show
and the share naming one they do not, per-class precision and recall, and the mean grounding
gap of the class words (pretrain/downstream/class_words.py). The
output JSON holds the scores, the word gaps and one ``{"image_id", "caption"}`` per image.
The checkpoint must fit the config's model exactly. The official decoders' captions (the
default ``beam_search``) read as the official ``scripts/eval_captioning.py`` writes them: a
generated ``<unk>`` is " \u2047 " (``prediction_text`` in ``pretrain/downstream/caption_eval.py``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)
from torch.utils.data import Subset

from pretrain.caption_metrics import load_references
from pretrain.config import load_config
from pretrain.distributed import select_device
from pretrain.downstream.caption_eval import (
    caption_eval_config,
    decode_dataset,
    grounding_gap,
    load_captioning_model,
    mean_gap,
    prediction_text,
    score_captions,
    word_grounding,
)
from pretrain.downstream.class_words import class_vocabulary, evaluate_class_naming
from pretrain.files import check_output_file, write_json_atomic
from pretrain.tasks import build_dataset
from pretrain.tokenizer import first_word_index
from virtex_d2.cli import add_common_flags, in_range, run_tool, tool_parser

PAIRS = " (the grounding gap pairs images)"
ROTATES = " (the grounding gap pairs each caption with another image of its batch)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("--split", default="val", choices=("val", "train"), help="COCO split to caption (default: val)")
    parser.add_argument("--output", default=None, help="JSON file for scores and captions (default: print only)")
    parser.add_argument("--max-images", type=int, default=None, action=in_range(2, why=PAIRS),
                        help="score only the first N images of the split (e.g. to choose a decoder on training images)")
    parser.add_argument("--batch-size", type=int, default=32, action=in_range(2, why=ROTATES),
                        help="images per decoding batch (at least 2: the grounding gap rotates a batch's images)")
    parser.add_argument("--num-workers", type=int, default=2, action=in_range(0), help="DataLoader worker processes")
    parser.add_argument("--words", type=int, default=20, action=in_range(0),
                        help="most frequent words whose grounding gap is printed")
    add_common_flags(parser, force_help="overwrite an existing --output file")
    return parser.parse_args(argv)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output:
        check_output_file(args.output, args.force)  # before any decoding
    cfg = caption_eval_config(load_config(args.config, args.opts))
    model, tokenizer = load_captioning_model(cfg, args.checkpoint)
    dataset = build_dataset(cfg, args.split, tokenizer)
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    references = load_references(Path(cfg.DATA.ROOT) / "annotations" / f"captions_{args.split}2017.json")
    device = args.device or select_device(0)
    captions = decode_dataset(
        model, dataset, prediction_text(model, tokenizer), device, args.batch_size, args.num_workers
    )
    scores = score_captions(captions, references)
    scores.update(grounding_gap(model, dataset, device, args.batch_size, args.num_workers))
    words = word_grounding(model, dataset, tokenizer.id_to_token, first_word_index(cfg.DATA), device,
                           args.batch_size, args.num_workers)
    instances = Path(cfg.DATA.ROOT) / "annotations" / f"instances_{args.split}2017.json"
    naming = evaluate_class_naming(captions, instances) if instances.is_file() else None
    if naming is not None:
        scores.update(class_names_present=naming["names_present"], class_names_absent=naming["names_absent"])
        class_words = set(class_vocabulary(instances))
        scores["class_word_gap"] = mean_gap([w for w in words if w.word in class_words])
    for name, value in scores.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    if naming is None:
        print(f"class words: not checked ({instances} not found; it lists the objects the class words are "
              "checked against)")
    if args.words > 0:
        print(f"\n{'word':<16}{'count':>7}{'own image':>11}{'other image':>13}{'gap':>8}")
    for w in words[: args.words]:
        print(f"{w.word:<16}{w.count:>7}{w.loss_matched_images:>11.3f}{w.loss_shuffled_images:>13.3f}{w.gap:>8.3f}")
    if naming is not None:
        print(f"\n{'class':<16}{'named':>7}{'shown':>7}{'precision':>11}{'recall':>8}")
        for name, c in sorted(naming["per_class"].items(), key=lambda kv: -kv[1]["present"]):
            print(f"{name:<16}{c['named']:>7}{c['present']:>7}{_rate(c['precision']):>11}{_rate(c['recall']):>8}")
    if args.output:
        payload = {
            "checkpoint": args.checkpoint,
            "split": args.split,
            "scores": scores,
            "word_grounding": [{**asdict(w), "gap": w.gap} for w in words],
            "class_naming": naming,
            "captions": [{"image_id": i, "caption": captions[i]} for i in sorted(captions)],
        }
        write_json_atomic(args.output, payload)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("eval_captioning", main))
