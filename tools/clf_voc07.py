#!/usr/bin/env python
"""VOC07 linear-SVM classification of a frozen visual backbone (VirTex's checkpoint selection).

    python tools/clf_voc07.py --config CFG --checkpoint outputs/run/checkpoint_500000.pth
    python tools/clf_voc07.py --config CFG --checkpoint-dir outputs/run      # every checkpoint_N.pth
    python tools/clf_voc07.py --config CFG --random-init                     # baseline

The backbone named by the config's MODEL.VISUAL gets the ``visual.*`` weights of the
checkpoint (ours or an official VirTex one). Global-average-pooled, L2-normalised features of
VOC2007 ``trainval`` train one linear SVM per class (cost by 3-fold cross-validation); AP is
measured on ``test`` (see pretrain/downstream/voc07.py for the exact protocol). Results go to
``--output-dir``: ``voc07_results.md`` (a table, one row per checkpoint), ``voc07_results.json``
(per-class APs) and TensorBoard scalars ``metrics/voc07_mAP`` at each checkpoint's iteration.
Override config keys after ``--opts``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.checkpoint_io import (
    checkpoint_iteration,
    list_checkpoints,
)
from pretrain.config import load_config
from pretrain.distributed import select_device
from pretrain.downstream.features import check_crop_fits, load_frozen_backbone
from pretrain.downstream.voc07 import (
    SVM_COSTS,
    evaluate_backbone,
    results_table,
)
from pretrain.errors import MissingInputError, OutputExistsError
from pretrain.files import write_json_atomic, write_text_atomic
from virtex_d2.cli import add_common_flags, in_range, run_tool, tool_parser


def default_voc_root() -> str:
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "VOC2007")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint-dir", help="evaluate every checkpoint_<iteration>.pth in this folder")
    source.add_argument("--random-init", action="store_true", help="randomly initialised backbone (baseline)")
    parser.add_argument("--voc-root", default=default_voc_root(),
                        help="VOC2007 folder (default: $DETECTRON2_DATASETS/VOC2007, else datasets/VOC2007)")
    parser.add_argument("--output-dir", default="outputs/voc07", help="where results are written")
    parser.add_argument("--batch-size", type=int, default=64, action=in_range(1),
                        help="images per feature-extraction batch")
    parser.add_argument("--num-workers", type=int, default=2, action=in_range(0), help="DataLoader worker processes")
    parser.add_argument("--jobs", type=int, default=1, action=in_range(1),
                        help="classes whose SVMs are trained in parallel")
    parser.add_argument("--resize", type=int, default=256, action=in_range(1),
                        help="shorter image side before the crop (default 256)")
    parser.add_argument("--crop", type=int, default=224, action=in_range(1), help="centre crop size (default 224)")
    parser.add_argument("--costs", type=float, nargs="+", default=list(SVM_COSTS), action=in_range(0, low_open=True),
                        help="SVM costs to cross-validate")
    add_common_flags(parser, config_help="pretraining config (YAML) of the checkpoint(s)", checkpoint_help="one checkpoint file (.pth)", force_help="overwrite results already in --output-dir", checkpoint=source)
    return parser.parse_args(argv)


def checkpoints_to_evaluate(args: argparse.Namespace) -> list[tuple[str, str | None, int | None]]:
    """``(name, path, iteration)`` of each backbone to score; path None means random init."""
    if args.random_init:
        return [("random init", None, None)]
    if args.checkpoint:
        return [(Path(args.checkpoint).name, args.checkpoint, checkpoint_iteration(args.checkpoint))]
    found = list_checkpoints(args.checkpoint_dir)
    if not found:
        raise MissingInputError(f"{args.checkpoint_dir}: no checkpoint_<iteration>.pth files")
    return [(path.name, str(path), iteration) for iteration, path in found]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from torch.utils.tensorboard import SummaryWriter

    cfg = load_config(args.config, args.opts)
    check_crop_fits(cfg, args.crop)
    device = args.device or select_device(0)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = [output_dir / "voc07_results.md", output_dir / "voc07_results.json"]
    if not args.force and any(p.exists() for p in outputs):
        raise OutputExistsError(f"{outputs[0]}: results already exist (pass --force to overwrite)")
    rows, details = [], {}
    with SummaryWriter(log_dir=str(output_dir)) as writer:
        for name, path, iteration in checkpoints_to_evaluate(args):
            backbone = load_frozen_backbone(cfg, path)
            result = evaluate_backbone(
                backbone, args.voc_root, device, args.batch_size, args.num_workers,
                args.resize, args.crop, args.costs, args.jobs,
            )
            print(f"{name}: VOC07 mAP {100 * result.mean_ap:.2f} "
                  f"({len(result.scored)}/{len(result.classes)} classes)", flush=True)
            writer.add_scalar("metrics/voc07_mAP", 100 * result.mean_ap, iteration or 0)
            rows.append((name, iteration, result))
            details[name] = {"checkpoint": path, "iteration": iteration, **result.to_dict()}
    table = results_table(rows)
    write_text_atomic(outputs[0], table)
    write_json_atomic(outputs[1], details)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("clf_voc07", main))
