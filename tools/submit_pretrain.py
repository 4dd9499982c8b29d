#!/usr/bin/env python
"""Submit pretraining to Slurm with submitit: requeued at the time limit or on preemption, and
resumed from the newest checkpoint every time it starts.

    python tools/submit_pretrain.py --config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml \\
        --output-dir outputs/bicap_h2048 --nodes 2 --gpus-per-node 8 --partition gpu --time 2880 \\
        [KEY VALUE ...]

One task per GPU runs ``tools/pretrain.py --resume`` as one rank (submitit exports RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on --cpus-per-task cores (the rank and its
DATA.NUM_WORKERS loader workers; default 8). Slurm sends USR2 --signal-delay seconds before --time
runs out; every rank stops after the same iteration, a checkpoint is written, and once rank 0's
training process has ended submitit requeues the job, at most --max-requeues times. --local runs the same
tasks on this machine (one node; --tasks-per-node without GPUs), e.g. to try a config.
Job files and logs go to --log-dir (default: OUTPUT_DIR/submitit).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)
from submitit.core.utils import FailedSubmissionError, UncompletedJobError

from virtex_d2.cli import report_error, run_tool, tool_parser
from virtex_d2.cluster import DEFAULT_CPUS_PER_TASK, ClusterSettings, submit_pretraining


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("--config", required=True, help="pretraining config YAML")
    parser.add_argument("--output-dir", required=True, help="checkpoints, logs, TensorBoard events")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (default: 8)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: one per GPU)")
    parser.add_argument("--cpus-per-task", type=int, default=DEFAULT_CPUS_PER_TASK,
                        help="cores per rank, for it and its DataLoader workers (default: %(default)s)")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit of one job in minutes (default: 1440)")
    parser.add_argument("--signal-delay", type=int, default=300,
                        help="seconds before the time limit at which training stops and saves: the iteration in "
                             "flight plus the checkpoint write (default: 300, see docs/reliability.md)")
    parser.add_argument("--max-requeues", type=int, default=20, help="requeues at most (default: 20)")
    parser.add_argument("--log-dir", default=None, help="submitit's job files and logs (default: OUTPUT_DIR/submitit)")
    parser.add_argument("--local", action="store_true", help="run the tasks on this machine instead of Slurm")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end (its last start)")
    parser.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.config).is_file():
        return report_error("submit_pretrain", FileNotFoundError(f"{args.config}: config file not found"), 2)
    if len(args.overrides) % 2:
        return report_error("submit_pretrain", ValueError(f"overrides must be KEY VALUE pairs: {args.overrides}"), 2)
    settings = ClusterSettings(
        folder=args.log_dir or str(Path(args.output_dir) / "submitit"), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time_min=args.time, signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
        cluster="local" if args.local else "slurm",
    )
    try:
        job = submit_pretraining(settings, Path(__file__).with_name("pretrain.py"), args.config, args.output_dir,
                                 args.overrides)
    except (UncompletedJobError, FailedSubmissionError) as err:  # sbatch refused the job: its own message
        return report_error("submit_pretrain", err, 2)
    print(f"submitted job {job.job_id}; logs in {settings.folder}")
    if args.wait:
        job.wait()
        print(f"job {job.job_id} ended: {job.state}")
        return 0 if job.state in ("COMPLETED", "FINISHED") else 1
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("submit_pretrain", main))
