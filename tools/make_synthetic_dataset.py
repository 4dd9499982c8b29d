#!/usr/bin/env python
"""Write the built-in dataset (COCO 2017, LVIS v1 and VOC 2007/2012 layouts) under --root.

    python tools/make_synthetic_dataset.py --root datasets/builtin
    export DETECTRON2_DATASETS=datasets/builtin
"""
import argparse
import json
import logging
import sys

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.data.synthetic import make_synthetic_dataset
from virtex_d2.cli import run_tool


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="output folder, usable as DETECTRON2_DATASETS")
    parser.add_argument("--num-train", type=int, default=1000, help="training images (COCO train2017)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (COCO val2017, VOC07 test)")
    parser.add_argument("--image-size", type=int, default=256, help="longest image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing dataset under --root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = make_synthetic_dataset(args.root, args.num_train, args.num_val, args.image_size,
                                      args.seed, force=args.force)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_synthetic_dataset", main))
