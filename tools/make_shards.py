#!/usr/bin/env python
"""Write a caption corpus as WebDataset shards for DATA.FORMAT webdataset.

    python tools/make_shards.py --coco-captions datasets/coco/annotations/captions_train2017.json \\
        --image-root datasets/coco/train2017 --output datasets/coco_shards/train --shard-size 1000
    python tools/make_shards.py --captions-csv captions.csv --image-root photos/ \\
        --output datasets/my_shards/train --shard-size 1000

A table (.csv, .tsv or .parquet) has columns ``image`` (path under --image-root) and
``caption``, one row per caption; the rows of one image become one sample. Writes
``00000.tar, 00001.tar, ...`` ({key}.jpg, {key}.txt with one caption a line, {key}.json),
``shards.txt`` (use it as DATA.SHARDS) and ``make_shards.json``. The same input gives
byte-identical shards. Images that cannot be read and rows without a caption are left out and
listed on stderr, one line per file.
"""
from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.data.shard_writer import read_coco_corpus, read_table_corpus, write_shards
from virtex_d2.cli import run_tool, tool_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco-captions", help="COCO captions JSON (captions_train2017.json)")
    source.add_argument("--captions-csv", help="caption table: .csv, .tsv or .parquet with columns image, caption")
    parser.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    parser.add_argument("--output", required=True, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--force", action="store_true", help="replace shards already in --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    left_out: list[tuple[str, str]] = []
    if args.coco_captions:
        images = read_coco_corpus(args.coco_captions)
    else:
        images = read_table_corpus(args.captions_csv, left_out)
    report = write_shards(images, args.image_root, args.output, args.shard_size, args.force, left_out)
    for name, reason in report.left_out:
        print(f"make_shards: left out {name}: {reason}", file=sys.stderr)
    print(f"{report.num_samples} samples in {len(report.shards)} shard(s) under {args.output} "
          f"({len(report.left_out)} left out); DATA.SHARDS {args.output}/shards.txt")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_shards", main))
