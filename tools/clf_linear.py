#!/usr/bin/env python
"""Linear probe of a frozen visual backbone on an ImageFolder dataset (VirTex's ImageNet protocol).

    python tools/clf_linear.py --config CFG --checkpoint outputs/run/checkpoint_500000.pth \\
        --data-root datasets/imagenet --output-dir outputs/run/in_linear
    torchrun --nproc-per-node 8 tools/clf_linear.py --config CFG --checkpoint CKPT \\
        --data-root datasets/imagenet --output-dir outputs/run/in_linear
    python tools/clf_linear.py --config CFG --random-init ...              # baseline

``--data-root`` holds ``train/<class>/*`` and ``val/<class>/*``. Defaults are the official
settings (frozen backbone with frozen BatchNorm statistics, one linear layer, SGD LR 0.3 at batch
256, momentum 0.9, no weight decay, cosine decay, 500,500 iterations = 100 ImageNet epochs); see
pretrain/downstream/linear_probe.py. Only the backbone of the checkpoint (``visual.*``) is used,
so official VirTex checkpoints work. Rank 0 writes TensorBoard scalars, ``linear_probe.pth``
and ``linear_probe_metrics.json`` (top-1/top-5 accuracy on val) to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.config import load_config
from pretrain.distributed import (
    init_distributed,
    seed_everything,
    shutdown_distributed,
)
from pretrain.downstream.features import check_crop_fits, load_frozen_backbone
from pretrain.downstream.linear_probe import (
    LinearProbe,
    ProbeSettings,
    build_datasets,
    train_linear_probe,
)
from pretrain.errors import OutputExistsError
from virtex_d2.cli import add_common_flags, in_range, run_tool, tool_parser

DEFAULTS = ProbeSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--random-init", action="store_true", help="randomly initialised backbone (baseline)")
    parser.add_argument("--data-root", required=True, help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--output-dir", required=True, help="TensorBoard events, linear layer, metrics")
    parser.add_argument("--iterations", type=int, default=DEFAULTS.iterations, action=in_range(1))
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, action=in_range(1),
                        help="global batch size")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, action=in_range(0, low_open=True))
    parser.add_argument("--momentum", type=float, default=DEFAULTS.momentum, action=in_range(0))
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, action=in_range(0))
    parser.add_argument("--warmup-iterations", type=int, default=DEFAULTS.warmup_iterations, action=in_range(0),
                        help="at most --iterations")
    parser.add_argument("--crop", type=int, default=DEFAULTS.crop, action=in_range(1), help="training and val crop size")
    parser.add_argument("--resize", type=int, default=DEFAULTS.resize, action=in_range(1),
                        help="val shorter side before the crop")
    parser.add_argument("--min-crop-scale", type=float, default=DEFAULTS.min_crop_scale,
                        action=in_range(0, 1, low_open=True), help="smallest share of the image a training crop covers")
    parser.add_argument("--eval-period", type=int, default=DEFAULTS.eval_period, action=in_range(0),
                        help="0: evaluate at the end only")
    parser.add_argument("--log-period", type=int, default=DEFAULTS.log_period, action=in_range(1))
    parser.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers, action=in_range(0),
                        help="DataLoader workers per rank")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    add_common_flags(parser, force_help="overwrite results already in --output-dir", checkpoint=source, device=False)
    args = parser.parse_args(argv)
    if args.warmup_iterations > args.iterations:
        parser.error(f"--warmup-iterations ({args.warmup_iterations}) must be at most --iterations "
                     f"({args.iterations}): the run would end before its learning rate is warmed up")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ProbeSettings(**{
        name: getattr(args, name) for name in ProbeSettings.__dataclass_fields__
    })
    ctx = init_distributed()
    try:
        metrics_file = Path(args.output_dir) / "linear_probe_metrics.json"
        if metrics_file.exists() and not args.force:
            raise OutputExistsError(f"{metrics_file}: results already exist (pass --force to overwrite)")
        cfg = load_config(args.config, args.opts)
        check_crop_fits(cfg, settings.crop)
        seed_everything(settings.seed)  # the same linear-layer init on every rank
        backbone = load_frozen_backbone(cfg, None if args.random_init else args.checkpoint)
        train_set, val_set = build_datasets(args.data_root, settings)
        probe = LinearProbe(backbone, cfg.MODEL.VISUAL.FEATURE_SIZE, len(train_set.classes))
        metrics = train_linear_probe(probe, train_set, val_set, settings, ctx, args.output_dir)
    finally:
        shutdown_distributed()
    if ctx.is_main:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("clf_linear", main))
