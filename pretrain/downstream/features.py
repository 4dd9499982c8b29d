"""Frozen visual backbones and batched, global-average-pooled features for linear evaluation.

Linear protocols (VOC07 SVMs, linear probes) judge the representation of a checkpoint's
``visual`` backbone alone, so only the ``visual.*`` weights are read: a checkpoint of any
pretraining task (ours, or an official VirTex one whose ResNet sits under ``visual.cnn.*``)
can be evaluated with a config that names the same backbone. The backbone is frozen: no
gradients, and BatchNorm stays in eval mode with the checkpoint's running statistics.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from fvcore.common.config import CfgNode
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from pretrain.checkpoint_io import CheckpointError, load_model_state
from pretrain.data.images import load_rgb_image
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.errors import BadValueError
from pretrain.models.factory import build_visual_backbone
from pretrain.models.visual_backbones import TorchvisionVisualBackbone


def load_frozen_backbone(cfg: CfgNode, checkpoint: str | os.PathLike | None) -> TorchvisionVisualBackbone:
    """The config's visual backbone with the ``visual.*`` weights of ``checkpoint``, frozen.

    ``checkpoint=None`` keeps the config's random initialisation (the baseline of the paper's
    tables). Raises :class:`~pretrain.checkpoint_io.CheckpointError` naming the file when it holds no
    backbone or one that does not fit ``MODEL.VISUAL`` (e.g. a ResNet-18 checkpoint read with a
    ResNet-50 config).
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.VISUAL.FROZEN = True
    backbone = build_visual_backbone(cfg)
    if checkpoint is not None:
        state = load_model_state(checkpoint)
        visual = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
        if not visual:
            raise CheckpointError(f"{os.fspath(checkpoint)}: no visual backbone weights ('visual.*' keys) in 'model'")
        try:
            backbone.load_state_dict(visual, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{os.fspath(checkpoint)}: its visual backbone does not fit MODEL.VISUAL.NAME "
                f"'{cfg.MODEL.VISUAL.NAME}' of the config: {err}"
            ) from err
    return backbone.eval()


def check_crop_fits(cfg: CfgNode, crop: int) -> None:
    """:class:`BadValueError` when the config's backbone is a ViT whose patch size does not divide
    ``--crop`` (timm would refuse the first batch)."""
    from pretrain.models.vit import requested_vit, vit_patch_size

    arch = requested_vit(cfg.MODEL.VISUAL.NAME)
    if arch and crop % (patch := vit_patch_size(arch)):
        raise BadValueError(f"--crop {crop}: {cfg.MODEL.VISUAL.NAME} needs a multiple of its patch size {patch} "
                            f"(e.g. {crop // patch * patch or patch})")


def eval_transform(resize: int = 256, crop: int = 224) -> v2.Compose:
    """Shorter side to ``resize``, central ``crop`` x ``crop``, ImageNet normalisation (the
    official evaluation transform: 256 then 224)."""
    if crop > resize:
        raise BadValueError(f"crop size {crop} is larger than the resize {resize}")
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFiles(Dataset):
    """Images read from a list of files, each with an integer ``index`` into that list.

    Unreadable or missing files raise :class:`~pretrain.data.BadImageError` naming the file.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: v2.Transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.transform(load_rgb_image(self.paths[index])), "index": torch.tensor(index)}


def pooled_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, C) float32 global-average-pooled backbone features."""
    return backbone(images).float().mean(dim=(2, 3))


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 2,
    l2_normalize: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """(N, C) pooled features of every image of ``dataset`` (in dataset order) on the CPU.

    ``l2_normalize`` scales each feature vector to unit length, as the VOC07 SVM protocol does.
    """
    if len(dataset) == 0:
        raise BadValueError(f"{desc}: no images to extract features from")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    backbone = backbone.to(device).eval()
    features = []
    for batch in tqdm(loader, desc=desc, unit="batch", mininterval=2.0):
        pooled = pooled_features(backbone, batch["image"].to(device))
        if l2_normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=1)
        features.append(pooled.cpu())
    return torch.cat(features)
