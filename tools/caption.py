#!/usr/bin/env python
"""Write captions for a folder of images with a pretrained captioning model.

    python tools/caption.py --config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml \\
        --checkpoint checkpoint_500000.pth --images photos/ --output captions.json

The checkpoint may be an official VirTex file or one of ours (both keep the weights under
``"model"``). The images of the folder (not recursive; IMAGE_SUFFIXES)
go through the config's DATA.IMAGE_TRANSFORM_CAPTION_EVAL (by default the official evaluation's:
shorter side 256, centre crop; not DATA.IMAGE_TRANSFORM_VAL of the validation during
pretraining) and are decoded by the forward head with MODEL.DECODER (beam search or nucleus
sampling); override any config key after ``--opts``, e.g. ``--opts MODEL.DECODER.BEAM_SIZE 3``.
The output is a JSON list of ``{"image": <file name>, "caption": <text>}`` in file-name order.
The official decoders' captions (the default ``beam_search``) read as the official
``scripts/eval_captioning.py`` writes them: a generated ``<unk>`` is " \u2047 "
(``prediction_text`` in ``pretrain/downstream/caption_eval.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)
import torch
from tqdm import tqdm

from pretrain.config import load_config
from pretrain.data.images import IMAGE_SUFFIXES, list_image_files, load_rgb_image
from pretrain.data.transforms import build_transform
from pretrain.distributed import select_device
from pretrain.downstream.caption_eval import (
    caption_eval_config,
    load_captioning_model,
    prediction_text,
)
from pretrain.files import check_output_file, write_json_atomic
from virtex_d2.cli import add_common_flags, in_range, run_tool, tool_parser

__doc__ = __doc__.replace("IMAGE_SUFFIXES", " ".join(IMAGE_SUFFIXES))  # the suffixes list_image_files reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("--images", required=True, help="folder of images to caption")
    parser.add_argument("--output", default="captions.json", help="JSON file to write (default: captions.json)")
    parser.add_argument("--batch-size", type=int, default=8, action=in_range(1),
                        help="images per forward pass (default: 8)")
    add_common_flags(parser)
    return parser.parse_args(argv)


@torch.no_grad()
def caption_images(cfg, checkpoint: str, images: list[Path], batch_size: int, device: torch.device | str) -> list[dict]:
    """Load the model and tokenizer of ``cfg`` and caption ``images``; one dict per image. A
    progress bar counts the images (a folder of photos takes minutes on a CPU)."""
    model, tokenizer = load_captioning_model(cfg, checkpoint)
    model.to(device)
    text = prediction_text(model, tokenizer)
    transform = build_transform(cfg, "val")
    results = []
    with tqdm(total=len(images), desc="captioning", unit="image", mininterval=2.0) as progress:
        for start in range(0, len(images), batch_size):
            paths = images[start : start + batch_size]
            batch = torch.stack([transform(load_rgb_image(path), "")[0] for path in paths]).to(device)
            predictions = model({"image": batch})["predictions"].cpu()
            for path, ids in zip(paths, predictions.tolist()):
                results.append({"image": path.name, "caption": text(ids)})
            progress.update(len(paths))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = check_output_file(args.output, args.force)  # before any captioning
    cfg = caption_eval_config(load_config(args.config, args.opts))
    images = list_image_files(args.images)
    results = caption_images(cfg, args.checkpoint, images, args.batch_size, args.device or select_device(0))
    write_json_atomic(output, results, indent=1)
    print(f"caption: wrote {len(results)} captions to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("caption", main))
