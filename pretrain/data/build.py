"""Builders from a pretraining config to the dataset of each task, transforms included.

Which builder serves which ``MODEL.NAME`` is the task table's business (:mod:`pretrain.tasks`).
Every builder first checks the tokenizer against the config's ``DATA`` node. Batch the
samples with :func:`pretrain.data.collate_fn`.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from pretrain.data.captions import CocoCaptionsDataset
from pretrain.data.masked_lm import MaskedLmDataset
from pretrain.data.multilabel import MultiLabelClassificationDataset
from pretrain.data.transforms import build_transform
from pretrain.tokenizer import SentencePieceBPETokenizer


def _common(cfg, split: str) -> dict:
    """The arguments every dataset class takes, from the config."""
    data = cfg.DATA
    return {
        "transform": build_transform(cfg, split),
        "max_caption_length": data.MAX_CAPTION_LENGTH,
        "skip_bad_images": data.SKIP_BAD_IMAGES,
    }


def build_caption_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """Images with their tokenized captions (captioning, bicaptioning, token classification)."""
    tokenizer.check_against_config(cfg.DATA)
    return CocoCaptionsDataset(cfg.DATA.ROOT, split, tokenizer, **_common(cfg, split))


def build_masked_lm_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """Images with captions whose tokens are masked as ``DATA.MASKED_LM`` says."""
    tokenizer.check_against_config(cfg.DATA)
    masking = cfg.DATA.MASKED_LM
    return MaskedLmDataset(
        cfg.DATA.ROOT, split, tokenizer, **_common(cfg, split),
        mask_proportion=masking.MASK_PROPORTION,
        mask_probability=masking.MASK_PROBABILITY,
        replace_probability=masking.REPLACE_PROBABILITY,
    )


def build_multilabel_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """Images with the set of COCO categories of their instances; ``DATA.VOCAB_SIZE`` is the
    number of categories here (it sets the classifier size), not the tokenizer's size."""
    tokenizer.check_against_config(cfg.DATA, check_size=False)
    dataset = MultiLabelClassificationDataset(cfg.DATA.ROOT, split, tokenizer, **_common(cfg, split))
    if dataset.num_classes != cfg.DATA.VOCAB_SIZE:
        raise ValueError(
            f"{cfg.DATA.ROOT}: instances file lists {dataset.num_classes} categories but DATA.VOCAB_SIZE "
            f"is {cfg.DATA.VOCAB_SIZE} (it sets the classifier size)"
        )
    return dataset
