#!/usr/bin/env python
"""Compare downstream runs side by side: COCO, LVIS and VOC AP per initialisation.

Each RUN is a tools/train_net.py output directory, optionally labelled as LABEL=DIR (default
label: the run's VIRTEX.INIT_NAME). Writes report.md, report.json and PNG plots (training loss;
AP by frequency group for LVIS) into --output:

    python tools/report.py virtex=outputs/lvis_virtex random=outputs/lvis_random \\
        imagenet=outputs/lvis_imagenet --output outputs/report_lvis

With --pretrain-dir (and --captions/--caption-references) the report also shows the pretraining
loss curves and generated captions beside reference captions.
"""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.errors import MissingInputError
from virtex_d2.cli import run_tool
from virtex_d2.reports.downstream import read_run, write_report
from virtex_d2.reports.pretraining import (
    PretrainingSummary,
    read_caption_eval,
    read_caption_examples,
    read_curves,
)


def parse_run(text: str):
    """``LABEL=DIR`` or ``DIR`` -> (label or None, directory)."""
    label, sep, directory = text.partition("=")
    if sep and not Path(text).exists():
        return label, Path(directory)
    return None, Path(text)


def _attention_folder(path: str) -> Path:
    folder = Path(path)
    if not (folder / "index.html").is_file():
        raise MissingInputError(f"{folder}: no index.html; give tools/visualize_attention.py's --output-dir")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="output directory, or LABEL=DIR")
    parser.add_argument("--output", required=True, help="folder for report.md, report.json and plots")
    parser.add_argument("--force", action="store_true", help="overwrite existing report files")
    pretraining = parser.add_argument_group("pretraining section (optional)")
    pretraining.add_argument("--pretrain-dir", help="tools/pretrain.py output directory: adds its loss curves")
    pretraining.add_argument("--captions", help="tools/caption.py output: adds generated captions ...")
    pretraining.add_argument("--caption-references", help="... beside these COCO captions (captions_val2017.json)")
    pretraining.add_argument("--num-captions", type=int, default=8, help="example captions to show (default: 8)")
    pretraining.add_argument("--caption-eval", help="tools/eval_captioning.py --output: adds what the captions name")
    pretraining.add_argument("--attention", help="tools/visualize_attention.py --output-dir: adds its attention maps")
    args = parser.parse_args(argv)
    if bool(args.captions) != bool(args.caption_references):
        parser.error("--captions and --caption-references go together")
    for flag in ("captions", "caption_eval", "attention"):
        if getattr(args, flag) and not args.pretrain_dir:
            parser.error(f"--{flag.replace('_', '-')} needs --pretrain-dir")
    runs = [read_run(directory, label) for label, directory in map(parse_run, args.runs)]
    summary = None
    if args.pretrain_dir:
        examples = (read_caption_examples(args.captions, args.caption_references, args.num_captions)
                    if args.captions else [])
        summary = PretrainingSummary(Path(args.pretrain_dir), read_curves(args.pretrain_dir), examples,
                                     read_caption_eval(args.caption_eval) if args.caption_eval else None,
                                     _attention_folder(args.attention) if args.attention else None)
    paths = write_report(runs, args.output, force=args.force, pretraining=summary)
    print((Path(args.output) / "report.md").read_text())
    print("Wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("report", main))
