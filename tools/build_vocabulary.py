#!/usr/bin/env python
"""Build the SentencePiece BPE caption vocabulary from a COCO captions file.

    python tools/build_vocabulary.py --captions datasets/coco/annotations/captions_train2017.json \\
        --output datasets/vocab/coco_10k --vocab-size 10000

writes ``datasets/vocab/coco_10k.model`` (what ``DATA.TOKENIZER_MODEL`` points to) and
``coco_10k.vocab``. Ids 0-3 are ``<unk>`` (also padding), ``[SOS]``, ``[EOS]``, ``[MASK]``.
"""
from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.data.captions import read_caption_records
from pretrain.tokenizer import train_vocabulary
from virtex_d2.cli import report_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True, help="COCO captions JSON (captions_train2017.json)")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=10000, help="number of pieces (default: 10000)")
    parser.add_argument(
        "--keep-accents", action="store_true", help="keep accents in the training text (default: NFKD, then drop combining marks); "
        "note that the datasets, like the official ones, always drop accents before encoding"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        captions = [caption for record in read_caption_records(args.captions) for caption in record.captions]
        train_vocabulary(captions, args.output, args.vocab_size, keep_accents=args.keep_accents, force=args.force)
    except (OSError, ValueError) as err:
        return report_error("build_vocabulary", err, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
