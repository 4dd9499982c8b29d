#!/usr/bin/env python
"""Show where the captioning decoder looks for each word it generates (the paper's figure).

    python tools/visualize_attention.py --config CFG --checkpoint outputs/run/checkpoint_500000.pth \\
        --images photos/ [more images or folders] --output-dir outputs/attention
    python tools/visualize_attention.py --config CFG --checkpoint CKPT --output-dir outputs/attention
        # no --images: the first --max-images images of the config's COCO val split

Each image goes through the config's DATA.IMAGE_TRANSFORM_CAPTION_EVAL (as in tools/caption.py;
by default shorter side 256, centre crop), is captioned with MODEL.DECODER, and every generated
word gets a heat-map of the decoder's cross-attention over the image (averaged over heads;
``--layer`` picks the decoder layer, the last by default). Written to
``--output-dir``: ``<image>_attention.png`` (a grid per image), ``tiles/`` and ``index.html``,
a page to open in a browser. The checkpoint must fit the config's model exactly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.config import load_config
from pretrain.data import list_image_files, load_rgb_image, read_caption_records
from pretrain.data.transforms import build_transform
from pretrain.distributed import select_device
from pretrain.downstream.attention import (
    caption_with_attention,
    denormalize,
    render_image,
    write_html,
)
from pretrain.downstream.caption_eval import caption_eval_config, load_captioning_model
from pretrain.errors import MissingInputError
from pretrain.files import check_output_folder
from pretrain.tokenizer import first_word_index
from virtex_d2.cli import add_common_flags, in_range, run_tool, tool_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("--images", nargs="*", default=[], help="image files and/or folders (default: COCO val split)")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs and index.html")
    parser.add_argument("--max-images", type=int, default=16, action=in_range(1), help="visualise at most this many images")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer whose attention is shown (default: last)")
    add_common_flags(parser, force_help="write into a non-empty --output-dir")
    return parser.parse_args(argv)


def collect_images(inputs: list[str], cfg, limit: int) -> list[Path]:
    """Image files named or found directly inside named folders (sorted), else the val split's."""
    if not inputs:
        root = Path(cfg.DATA.ROOT)
        records = read_caption_records(root / "annotations" / "captions_val2017.json")
        return [root / "val2017" / record.file_name for record in records[:limit]]
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(list_image_files(item))
        elif item.is_file():
            found.append(item)
        else:
            raise MissingInputError(f"{item}: no such image file or folder")
    return found[:limit]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = check_output_folder(args.output_dir, args.force)  # before the model is built
    cfg = caption_eval_config(load_config(args.config, args.opts))
    model, tokenizer = load_captioning_model(cfg, args.checkpoint)
    device = args.device or select_device(0)
    model.to(device)
    transform = build_transform(cfg, "val")
    rendered = []
    for k, path in enumerate(collect_images(args.images, cfg, args.max_images)):
        image = transform(load_rgb_image(path), "")[0]
        [result] = caption_with_attention(
            model, image.unsqueeze(0).to(device), tokenizer,
            cfg.DATA.SOS_INDEX, cfg.DATA.EOS_INDEX, first_word_index(cfg.DATA), args.layer,
        )
        rendered.append(render_image(f"{k:03d}_{path.stem}", denormalize(image), result, output_dir))
        print(f"{path}: {result.caption}", flush=True)
    page = write_html(
        rendered, output_dir,
        f"Checkpoint {args.checkpoint}, config {args.config}, decoder layer {args.layer}; "
        "heat-maps are cross-attention probabilities averaged over heads.",
    )
    print(f"open {page.resolve().as_uri()} in a browser")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("visualize_attention", main))
