#!/usr/bin/env python
"""Check datasets before spending compute on them, as tools/train_net.py and tools/pretrain.py
do before their first iteration: the detectron2 datasets of a fine-tuning config (DATASETS.TRAIN
and DATASETS.TEST, read from DETECTRON2_DATASETS) and/or the caption data of a pretraining config.

    DETECTRON2_DATASETS=datasets python tools/check_dataset.py \\
        --config-file configs/detectron2/voc_det_default_init_24k.yaml
    python tools/check_dataset.py --pretrain-config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml \\
        --check-images all --pretrain-opts DATA.ROOT datasets/coco

Exit status 0 when the data are usable (warnings, e.g. VOC fields given their defaults, are
printed), 2 with one line per problem naming the file, the field and what to do (a traceback
only with ``--debug``).
"""
import logging
import sys
import time

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.config import load_config
from pretrain.data.checks import CHECK_IMAGES_MODES, check_caption_data
from virtex_d2.cli import run_tool, tool_parser

TOOL = "check_dataset"


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--config-file", help="detectron2 config whose datasets to check")
    parser.add_argument("--eval-only", action="store_true", help="check only DATASETS.TEST (as train_net --eval-only)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="detectron2 config overrides")
    parser.add_argument("--pretrain-config", help="pretraining config whose caption data to check")
    parser.add_argument("--pretrain-opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="pretraining config overrides (e.g. DATA.ROOT datasets/coco)")
    parser.add_argument("--check-images", choices=CHECK_IMAGES_MODES, default=None,
                        help="images to decode for the pretraining data (default: the config's DATA.CHECK_IMAGES)")
    args = parser.parse_args(argv)
    if not args.config_file and not args.pretrain_config:
        parser.error("give --config-file and/or --pretrain-config")
    return args


def check_detectron2(config_file: str, opts: list[str], eval_only: bool) -> list[str]:
    from detectron2_ext import load_config as load_detectron2_config
    from detectron2_ext.dataset_checks import check_config_datasets
    from detectron2_ext.datasets import check_datasets_root

    check_datasets_root()
    return check_config_datasets(load_detectron2_config(config_file, opts), eval_only=eval_only)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    warnings = []
    if args.config_file:
        warnings += check_detectron2(args.config_file, args.opts, args.eval_only)
    if args.pretrain_config:
        cfg = load_config(args.pretrain_config, args.pretrain_opts)
        warnings += check_caption_data(cfg, check_images=args.check_images)
    for warning in warnings:
        print(f"{TOOL}: warning: {warning}", file=sys.stderr)
    print(f"{TOOL}: ok, {len(warnings)} warning(s), {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(TOOL, main))
