#!/usr/bin/env python
"""How long the stop at a time-limit signal takes: the iteration in flight plus the checkpoint
write. The signal's lead (scripts/slurm/pretrain.sbatch's --signal, tools/submit_pretrain.py's
--signal-delay) must cover both, with room for a slower file system.

    .venv/bin/python scripts/slurm/time_stop_checkpoint.py \\
        --config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml --dir /tmp/ckpt-timing

Builds the training (model, optimizer, schedule) from the config on this machine's device, runs
``--steps`` steps of a synthetic batch (so the optimizer has its state, as it has at the
signal), then writes the checkpoint the loop writes (``CheckpointManager.save``: model,
optimizer, scheduler, scaler, atomically) ``--repeats`` times into ``--dir``. Prints the step
time, the file size and each write's time. Numbers go to docs/reliability.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "tools")]

from benchmark import synthetic_batch  # tools/benchmark.py: the benchmark's own batch

from pretrain.malloc import (  # standard library only
    allocator_in_use,
    reexec_with_tuned_malloc,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reexec_with_tuned_malloc()  # the allocator tools/pretrain.py trains with (tcmalloc where installed)

    import torch

    from pretrain.config import load_config
    from pretrain.distributed import DistContext, seed_everything
    from pretrain.engine.checkpoint import CheckpointManager
    from pretrain.engine.setup import build_training
    from pretrain.tasks import build_model

    cfg = load_config(args.config, ["OPTIM.BATCH_SIZE", str(args.batch_size)])
    seed_everything(cfg.RANDOM_SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    training = build_training(cfg, DistContext(rank=0, local_rank=0, world_size=1, device=device), build_model(cfg))
    batch = {k: v.to(device) for k, v in synthetic_batch(args.batch_size, cfg.DATA.IMAGE_CROP_SIZE, cfg.DATA.VOCAB_SIZE,
                                                         cfg.DATA.MAX_CAPTION_LENGTH, torch.Generator().manual_seed(0)).items()}
    for step in range(args.steps):
        start = time.perf_counter()
        training.forward_backward(batch)
        training.optimizer_step()
        print(f"step {step + 1}: {time.perf_counter() - start:.2f} s (batch {args.batch_size}, "
              f"{cfg.DATA.IMAGE_CROP_SIZE} px, {device}, {allocator_in_use()})")
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckpt-timing-"))
    manager = CheckpointManager(folder, keep_last=1)
    try:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            path = manager.save(args.steps + repeat, {**training.state_dict(), "config": cfg.dump()})
            elapsed = time.perf_counter() - start
            print(f"checkpoint {repeat + 1}: {path.stat().st_size / 2**20:.0f} MiB in {elapsed:.2f} s "
                  f"({path.stat().st_size / 2**20 / elapsed:.0f} MiB/s) to {folder}")
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
