"""Pretraining data: COCO Captions datasets, caption-aware transforms, batching.

:func:`pretrain.tasks.build_dataset` returns the dataset for ``cfg.MODEL.NAME``; batch it with
the module-level :func:`collate_fn` (one function for every variant). Samples draw all
their randomness from torch's global RNG, which ``DataLoader`` seeds per worker from the main
process's seed, so a seeded run is reproducible.
"""
from pretrain.data.captions import (
    CocoCaptionsDataset,
    ImageRecord,
    read_caption_records,
)
from pretrain.data.collate import collate_fn
from pretrain.data.images import BadImageError, list_image_files, load_rgb_image
from pretrain.data.masked_lm import MaskedLmDataset, mask_caption_tokens
from pretrain.data.multilabel import (
    MultiLabelClassificationDataset,
    read_instance_labels,
)
from pretrain.data.transforms import build_transform, make_transform

__all__ = [
    "BadImageError",
    "CocoCaptionsDataset",
    "ImageRecord",
    "MaskedLmDataset",
    "MultiLabelClassificationDataset",
    "build_transform",
    "collate_fn",
    "list_image_files",
    "load_rgb_image",
    "make_transform",
    "mask_caption_tokens",
    "read_caption_records",
    "read_instance_labels",
]
