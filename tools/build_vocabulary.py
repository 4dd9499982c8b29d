#!/usr/bin/env python
"""Build the SentencePiece BPE caption vocabulary from a COCO captions file or from shards.

    python tools/build_vocabulary.py --captions datasets/coco/annotations/captions_train2017.json \\
        --output datasets/vocab/coco_10k --vocab-size 10000
    python tools/build_vocabulary.py --shards "datasets/cc3m/{00000..00331}.tar" \\
        --output datasets/vocab/cc3m_10k --vocab-size 10000 --max-captions 1000000

From shards (DATA.SHARDS's forms: a brace pattern, a .txt list, URLs, pipe:), the captions are
those of DATA.CAPTION_FIELD (--caption-field), read shard by shard in an order shuffled with
--seed until --max-captions: a sample of the corpus that reads only a part of a large one.

writes ``datasets/vocab/coco_10k.model`` (what ``DATA.TOKENIZER_MODEL`` points to) and
``coco_10k.vocab``. Ids 0-3 are ``<unk>`` (also padding), ``[SOS]``, ``[EOS]``, ``[MASK]``.
"""
from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.data.captions import read_caption_records
from pretrain.data.shards import expand_shards, sample_captions
from pretrain.tokenizer import train_vocabulary
from virtex_d2.cli import in_range, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="COCO captions JSON (captions_train2017.json)")
    source.add_argument("--shards", help="WebDataset shards: brace pattern, .txt list, URL or pipe:")
    parser.add_argument("--caption-field", default="txt", help="with --shards: 'txt' or 'json:FIELD' (default: txt)")
    parser.add_argument("--max-captions", type=int, default=2_000_000,
                        help="with --shards: captions to sample at most (default: 2000000)")
    parser.add_argument("--seed", type=int, default=0, help="with --shards: seed of the shard order (default: 0)")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=10000, action=in_range(1), help="number of pieces (default: 10000)")
    parser.add_argument(
        "--keep-accents", action="store_true", help="keep accents in the training text (default: NFKD, then drop combining marks); "
        "note that the datasets, like the official ones, always drop accents before encoding"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.shards:
        captions, skipped = sample_captions(expand_shards(args.shards, "--shards"), args.caption_field,
                                            args.max_captions, args.seed)
        logging.getLogger("build_vocabulary").info("%d captions sampled from %s (%d samples without one)", len(captions), args.shards, skipped)
    else:
        captions = [caption for record in read_caption_records(args.captions) for caption in record.captions]
    train_vocabulary(captions, args.output, args.vocab_size, keep_accents=args.keep_accents, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("build_vocabulary", main))
