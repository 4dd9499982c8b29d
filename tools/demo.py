#!/usr/bin/env python
"""The whole VirTex pipeline on the built-in dataset: `make demo` runs this.

Generates the dataset, builds the vocabulary, pretrains a small bicaptioning model, prints
captions with how often they name the objects shown, draws the decoder's attention, converts the
backbone, fine-tunes LVIS Mask R-CNN from VirTex and from the official random init, and writes
outputs/demo/report.md. Each stage is one of our tools (the demo prints its command); complete
stages are skipped on a re-run, interrupted ones resume, --force redoes everything. Uses a GPU
when there is one.

    python tools/demo.py [--force] [--pretrain-iters N] [--finetune-iters N] [--seed S]
    python tools/demo.py --inits virtex random labels default   # + labels control, detectron2's init

``--backbone vit`` runs the same stages with a ViT-Ti/16 pretrained by bicaptioning and
fine-tuned through ViTDet (outputs/demo_vit unless --output-dir says otherwise).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)
import torch

from virtex_d2.cli import report_error, run_tool
from virtex_d2.pipeline.demo import (
    INITS,
    DemoSettings,
    add_timings_to_report,
    build_stages,
    lvis_mask_ap,
)
from virtex_d2.pipeline.estimate import REFERENCE, estimate_seconds, probe_seconds
from virtex_d2.pipeline.stages import (
    StageError,
    format_timings,
    run_stages,
    stages_to_run,
)

CHECKOUT = Path(__file__).resolve().parents[1]  # the stages run this checkout's tools and configs


def parse_args(argv=None) -> DemoSettings:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=defaults.data_root,
                        help=f"built-in dataset root, used as DETECTRON2_DATASETS (default: {defaults.data_root})")
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir,
                        help=f"checkpoints, runs and the report (default: {defaults.output_dir})")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="built-in training images")
    parser.add_argument("--num-val", type=int, default=defaults.num_val, help="built-in validation images")
    parser.add_argument("--pretrain-iters", type=int, default=defaults.pretrain_iters,
                        help=f"bicaptioning iterations (default: {defaults.pretrain_iters})")
    parser.add_argument("--finetune-iters", type=int, default=defaults.finetune_iters,
                        help=f"Mask R-CNN iterations per initialisation (default: {defaults.finetune_iters})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of pretraining and fine-tuning")
    parser.add_argument("--num-captions", type=int, default=defaults.num_captions, help="example captions to show")
    parser.add_argument("--backbone", choices=("resnet", "vit"), default=defaults.backbone,
                        help="resnet: ResNet-18 and FPN Mask R-CNN (default); vit: ViT-Ti/16 and ViTDet Mask R-CNN")
    parser.add_argument("--inits", nargs="+", default=list(defaults.inits), metavar="INIT",
                        help=f"initialisations to fine-tune from, among {', '.join(INITS)} (default: "
                             f"{' '.join(defaults.inits)}); labels: the same backbone trained on the class "
                             "labels; default: detectron2's own random init")
    parser.add_argument("--force", action="store_true", help="redo every stage, replacing its outputs")
    args = parser.parse_args(argv)
    if args.backbone == "vit" and args.output_dir == defaults.output_dir:
        args.output_dir = defaults.output_dir.with_name(defaults.output_dir.name + "_vit")  # keep the ResNet run
    args.inits = tuple(args.inits)
    settings = DemoSettings(checkout=CHECKOUT, **{k: v for k, v in vars(args).items() if k != "force"})
    return settings, args.force


def say_how_long(settings: DemoSettings, to_run: set) -> None:
    """Print roughly how long the stages still to run will take on this machine's CPU."""
    if not to_run:
        print("Every stage's outputs are complete: nothing to run (pass --force to redo them).")
        return
    if torch.cuda.is_available():
        print("A GPU is present: the stages will take less than the CPU estimate of docs/demo.md.")
        return
    probe = probe_seconds(settings.image_size)
    minutes = estimate_seconds(to_run, settings.pretrain_iters, settings.finetune_iters, probe) / 60
    print(f"On this CPU the {len(to_run)} stages to run take about {minutes:.0f} minutes (a probe step took "
          f"{probe:.2f} s against {REFERENCE.probe_s:.2f} s on the {REFERENCE.machine}).")


def main(argv=None) -> int:
    settings, force = parse_args(argv)
    env = dict(os.environ, DETECTRON2_DATASETS=str(settings.data_root.resolve()))
    stages = build_stages(settings)
    try:
        to_run = stages_to_run(stages, force)  # stops here, before any estimate, on outputs made otherwise
        say_how_long(settings, to_run)
        start = time.perf_counter()
        results = run_stages(stages, force=force, env=env, to_run=to_run)
    except StageError as e:
        return report_error("demo", e, 1)  # outputs made otherwise, or a stage failed (its own output says why)
    print("\nStage timings (seconds):\n" + format_timings(results))
    add_timings_to_report(settings, results)
    ap = lvis_mask_ap(settings)
    print("\nLVIS val mask AP: " + ", ".join(f"{init} init {value:.2f}" if value is not None else
                                          f"{init} init none (no detections; see the report)"
                                          for init, value in ap.items()))
    print(f"Report: {settings.output_dir / 'report.md'}  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("demo", main))
