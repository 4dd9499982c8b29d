#!/usr/bin/env python
"""Convert the ResNet or ViT of a checkpoint into detectron2 weights for fine-tuning.

Accepts a checkpoint of ours, one from the official VirTex model zoo, a torchvision or timm ResNet
state dict, or the ResNet-50 releases VirTex is compared with (MoCo v1/v2/v3, SwAV, DINO, Barlow
Twins, DenseCL, MMSelfSup, PyTorch Lightning; the encoder each project transfers, its heads
dropped: detectron2_ext/convert.py lists them), and writes
``{"model": ..., "__author__": ..., "matching_heuristics": True}`` as a ``.pth`` of tensors, with
a ``conversion`` record of what ``MODEL.RESNETS`` (or ``MODEL.VIT``) must say, which
tools/train_net.py checks before fine-tuning. The weights are verified by
loading them into the target detectron2 models (by default R50-FPN Mask R-CNN and R50-C4 Faster
R-CNN from configs/detectron2/):

    python tools/convert_backbone.py --input bicaptioning_R_50_L1_H2048.pth --output virtex_r50.pth

For another depth, verify against configs of that depth, e.g. for a ResNet-18:

    python tools/convert_backbone.py --input r18.pth --output r18_d2.pth \\
        --config-file configs/detectron2/coco_segm_default_init_2x.yaml \\
        MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64

and for another width, e.g. torchvision's wide_resnet50_2, add ``MODEL.RESNETS.WIDTH_PER_GROUP 128``.

The paper's baselines, made as the official code makes them:

    # random init: the pretraining model's ResNet, zero_init_residual=True, seeded
    python tools/convert_backbone.py --init random --depth 50 --seed 0 --output random_r50.pth
    # ImageNet-supervised: a local copy of torchvision's IMAGENET1K_V1 file (checked by its hash)
    python tools/convert_backbone.py --init imagenet-v1 --input resnet50-0676ba61.pth --output imagenet_r50.pth

(``imagenet-v2`` takes torchvision's newer IMAGENET1K_V2 file, which the paper did not use.)

A ViT (a checkpoint of ours with ``MODEL.VISUAL.NAME timm::vit_*``, or a timm-format state dict
such as MAE's ``mae_pretrain_vit_base.pth``, DeiT or AugReg) becomes exact ``backbone.net.*``
keys of ViTDet's ``ViT``, verified by default against the ViTDet-B COCO config; for another
width, verify against a config of that width:

    python tools/convert_backbone.py --input mae_pretrain_vit_base.pth --output mae_vitb.pth
    python tools/convert_backbone.py --input outputs/vit_t/checkpoint_600.pth --output vit_t_d2.pth \\
        --config-file configs/detectron2/builtin/lvis_segm_ViTDet_T_builtin.yaml
    # random init: the pretraining ViT (no class token, no LayerScale) at its image size, seeded
    python tools/convert_backbone.py --init random --vit vit_tiny_patch16_224 --image-size 128 \\
        --output random_vit_t.pth --config-file configs/detectron2/builtin/lvis_segm_ViTDet_T_builtin.yaml
"""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from detectron2_ext import load_config
from detectron2_ext.transfer import (
    check_output_path,
    convert_weights,
    describe,
    holds_vit,
)
from pretrain.checkpoint_io import UNSAFE_OPT_IN_FLAG, read_checkpoint
from pretrain.models.visual_backbones import (
    check_torchvision_weights_file,
    initial_resnet_state,
)
from pretrain.models.vit import SUPPORTED_VITS, initial_vit_state, vit_patch_size
from virtex_d2.cli import in_range, run_tool

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
DEFAULT_TARGETS = [CONFIG_DIR / "coco_segm_default_init_2x.yaml", CONFIG_DIR / "voc_det_default_init_24k.yaml"]
DEFAULT_VIT_TARGETS = [CONFIG_DIR / "vitdet" / "coco_mask_rcnn_vitdet_b_100ep.yaml"]


INITS = ("checkpoint", "random", "imagenet-v1", "imagenet-v2")
RESNETS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="checkpoint to convert (.pth/.pt/.ckpt); not with --init random")
    parser.add_argument("--init", choices=INITS, default="checkpoint",
                        help="checkpoint: any checkpoint (default); random: a fresh ResNet of --depth, "
                             "seeded with --seed, as the official random-init baseline; imagenet-v1/v2: "
                             "--input must be torchvision's IMAGENET1K_V1/V2 file of --depth")
    parser.add_argument("--depth", type=int, default=50, choices=sorted(RESNETS),
                        help="ResNet depth for --init random / imagenet-* (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init random (default: 0)")
    parser.add_argument("--vit", choices=SUPPORTED_VITS, default=None,
                        help="--init random: a timm ViT of this architecture instead of a ResNet")
    parser.add_argument("--image-size", type=int, default=224, action=in_range(1),
                        help="--init random --vit: the image size its position embeddings are for, a multiple of "
                             "the patch size (default: 224)")
    parser.add_argument("--backbone-prefix", default=None, metavar="PREFIX",
                        help="the key prefix of the ResNet to convert, for a file that holds several which the "
                             "converter cannot tell apart (it names them); MoCo's encoder_q, MoCo v3's base_encoder, "
                             "MMSelfSup's backbone and DINO's teacher are found without it")
    parser.add_argument("--output", required=True, help="detectron2 weights to write (.pth)")
    parser.add_argument("--config-file", action="append", default=None, metavar="FILE",
                        help="target detectron2 config to verify against (repeatable; default: the "
                             "COCO R50-FPN and VOC R50-C4 configs, for a ViT the COCO ViTDet-B config)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument(UNSAFE_OPT_IN_FLAG, action="store_true",
                        help="load an input that needs arbitrary unpickling (only for trusted files)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config overrides applied to every target config")
    args = parser.parse_args(argv)
    if (args.input is None) != (args.init == "random"):
        parser.error("--input is required, except with --init random (which takes none)")
    if args.backbone_prefix is not None and args.init == "random":
        parser.error("--backbone-prefix chooses among the ResNets of --input; --init random takes no input")
    if args.vit and args.init != "random":
        parser.error("--vit only chooses the architecture of --init random")
    if args.vit and args.image_size % vit_patch_size(args.vit):
        patch = vit_patch_size(args.vit)
        below = args.image_size - args.image_size % patch
        sizes = " or ".join(str(size) for size in sorted({max(below, patch), below + patch}))
        parser.error(f"--image-size {args.image_size} is not a multiple of {args.vit}'s patch size {patch} "
                     f"(the position embeddings are for whole patches; use {sizes})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_path(args.output, args.force)  # before reading a large input
    arch = args.vit or RESNETS[args.depth]
    if args.init == "random":
        source = f"random_{arch}_seed{args.seed}"
        state = initial_vit_state(arch, args.image_size, args.seed) if args.vit else initial_resnet_state(arch, args.seed)
    else:
        if args.init.startswith("imagenet-"):
            check_torchvision_weights_file(args.input, arch, f"IMAGENET1K_{args.init[-2:].upper()}")
        source = args.input
        state = read_checkpoint(args.input, args.allow_unsafe_pickle)
    defaults = DEFAULT_VIT_TARGETS if holds_vit(state) else DEFAULT_TARGETS
    config_files = [Path(p) for p in args.config_file] if args.config_file else defaults
    targets = [(path.name, load_config(path, args.opts)) for path in config_files]
    backbone, checks = convert_weights(state, str(source), args.output, targets, force=args.force, vit_arch=args.vit,
                                       resnet_prefix=args.backbone_prefix)
    print(f"Converted {describe(backbone, source)}")
    for check in checks:
        print(f"  verified {check.summary()}")
        for warning in check.warnings:
            print(f"  warning: {check.name}: {warning}")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("convert_backbone", main))
