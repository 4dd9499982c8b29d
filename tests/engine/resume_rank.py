"""One rank of tests/engine/test_resume_agreement.py, run under torchrun (gloo, CPU).

    torchrun --nproc-per-node 2 tests/engine/resume_rank.py FOLDER OUTPUT_JSON [UNREADABLE_ON_RANK_1]

Every rank asks :func:`pretrain.engine.resume.agreed_resume_state` for the checkpoint of FOLDER
and writes what it got (the iteration, or the error) to ``OUTPUT_JSON.rank{N}``. With a third
argument, rank 1 cannot read that checkpoint file (as a rank whose network filesystem serves it
a stale or damaged copy): its reads of that path raise, while rank 0 reads the real file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint_io import CheckpointError
from pretrain.distributed import init_distributed
from pretrain.engine import checkpoint as checkpoint_module
from pretrain.engine.checkpoint import CheckpointManager
from pretrain.engine.resume import agreed_resume_state


def main() -> None:
    folder, output = Path(sys.argv[1]), Path(sys.argv[2])
    ctx = init_distributed(force_cpu=True)
    if len(sys.argv) > 3 and ctx.rank == 1:
        unreadable, real_read = Path(sys.argv[3]), checkpoint_module.read_training_checkpoint

        def read(path):
            if Path(path) == unreadable:
                raise CheckpointError(f"{path}: corrupt or truncated checkpoint: as seen by rank 1")
            return real_read(path)

        checkpoint_module.read_training_checkpoint = read
    try:
        state = agreed_resume_state(CheckpointManager(folder, keep_last=5), ctx)
        result = {"iteration": state["iteration"] if state else None, "weight": state["model"]["w"].tolist()}
    except Exception as err:  # noqa: BLE001  (the test reads every rank's outcome)
        result = {"error": type(err).__name__, "message": str(err)}
    Path(f"{output}.rank{ctx.rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
