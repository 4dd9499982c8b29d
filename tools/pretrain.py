#!/usr/bin/env python
"""Pretrain a VirTex model: one CPU process, or one process per device under torchrun.

    python tools/pretrain.py --config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml \\
        --output-dir outputs/bicap_h2048 [--resume] [KEY VALUE ...]
    torchrun --nproc-per-node 8 tools/pretrain.py --config CFG --output-dir DIR

``KEY VALUE`` pairs override config keys (``OPTIM.BATCH_SIZE 64``). ``--resume`` continues from
the newest valid checkpoint in the output directory. SIGTERM saves a checkpoint and exits 0.

On Linux with glibc the script re-executes itself once for a faster allocator (see
``pretrain/malloc.py``): with tcmalloc preloaded where it is installed (``libtcmalloc-minimal4``),
else with glibc tuned (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_=10^12``). It keeps the
allocator it started with when ``LD_PRELOAD`` already names one, when ``MALLOC_MMAP_MAX_`` is set,
or with ``VIRTEX_D2_MALLOC=default``.
"""
from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.malloc import (
    reexec_with_tuned_malloc,  # standard library only: runs before torch loads
)
from virtex_d2.cli import report_error, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pretraining config YAML")
    parser.add_argument("--output-dir", required=True, help="checkpoints, logs, TensorBoard events")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.config import load_config
    from pretrain.engine.trainer import NonFiniteLossError, run_pretraining

    cfg = load_config(args.config, args.overrides)  # bad input: run_tool's one line and status 2
    try:
        run_pretraining(cfg, args.output_dir, resume=args.resume)
    except NonFiniteLossError as err:  # the run diverged: neither bad input nor a bug to trace
        return report_error("pretrain", err, 1)
    return 0


if __name__ == "__main__":
    reexec_with_tuned_malloc()
    sys.exit(run_tool("pretrain", main))
