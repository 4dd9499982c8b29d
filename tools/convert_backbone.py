#!/usr/bin/env python
"""Convert the ResNet of a checkpoint into detectron2 weights for SyncBN fine-tuning.

Accepts a checkpoint of ours, one from the official VirTex model zoo, or a torchvision ResNet
state dict, and writes ``{"model": ..., "__author__": ..., "matching_heuristics": True}`` as a
``.pth`` of tensors. The weights are verified by loading them into the target detectron2 models
(by default R50-FPN Mask R-CNN and R50-C4 Faster R-CNN from configs/detectron2/):

    python tools/convert_backbone.py --input bicaptioning_R_50_L1_H2048.pth --output virtex_r50.pth

For another depth, verify against configs of that depth, e.g. for a ResNet-18:

    python tools/convert_backbone.py --input r18.pth --output r18_d2.pth \
        --config-file configs/detectron2/coco_segm_default_init_2x.yaml \
        MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64
"""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from detectron2_ext import load_config
from detectron2_ext.convert import ConversionError
from detectron2_ext.transfer import convert_checkpoint_file, describe
from pretrain.checkpoint_io import UNSAFE_OPT_IN_FLAG, CheckpointError
from virtex_d2.cli import report_error, run_tool

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
DEFAULT_TARGETS = [CONFIG_DIR / "coco_segm_default_init_2x.yaml", CONFIG_DIR / "voc_det_default_init_24k.yaml"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="checkpoint to convert (.pth/.pt/.ckpt)")
    parser.add_argument("--output", required=True, help="detectron2 weights to write (.pth)")
    parser.add_argument("--config-file", action="append", default=None, metavar="FILE",
                        help="target detectron2 config to verify against (repeatable; "
                             "default: the COCO R50-FPN and VOC R50-C4 configs)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument(UNSAFE_OPT_IN_FLAG, action="store_true",
                        help="load an input that needs arbitrary unpickling (only for trusted files)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config overrides applied to every target config")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config_files = [Path(p) for p in args.config_file] if args.config_file else DEFAULT_TARGETS
    try:
        targets = [(path.name, load_config(path, args.opts)) for path in config_files]
        backbone, checks = convert_checkpoint_file(
            args.input, args.output, targets, force=args.force, allow_unsafe_pickle=args.allow_unsafe_pickle
        )
    except (CheckpointError, ConversionError, FileExistsError) as e:
        return report_error("convert_backbone", e)
    print(f"Converted {describe(backbone, args.input)}")
    for check in checks:
        print(f"  verified {check.summary()}")
        for warning in check.warnings:
            print(f"  warning: {check.name}: {warning}")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("convert_backbone", main))
