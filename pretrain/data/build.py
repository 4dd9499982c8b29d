"""Builders from a pretraining config to the dataset of each task, transforms included.

Which builder serves which ``MODEL.NAME`` is the task table's business (:mod:`pretrain.tasks`).
Every builder first checks the tokenizer against the config's ``DATA`` node, then reads
``DATA.FORMAT``: ``coco`` gives a map-style dataset of ``DATA.ROOT``, ``webdataset`` the shard
stream of ``DATA.SHARDS`` (:mod:`pretrain.data.shards`) with the same samples. Batch the
samples with :func:`pretrain.data.collate_fn`.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from pretrain.data.captions import CaptionSamples, CocoCaptionsDataset
from pretrain.data.masked_lm import MaskedLmDataset, MaskedLmSamples
from pretrain.data.multilabel import MultiLabelClassificationDataset
from pretrain.data.shards import build_shard_dataset
from pretrain.data.transforms import build_transform
from pretrain.errors import BadValueError
from pretrain.tokenizer import SentencePieceBPETokenizer

FORMATS = ("coco", "webdataset")


def _from_shards(cfg) -> bool:
    """Whether ``DATA.FORMAT`` asks for shards; ``ValueError`` for an unknown format."""
    if cfg.DATA.FORMAT not in FORMATS:
        raise BadValueError(f"DATA.FORMAT must be one of {', '.join(FORMATS)}, got '{cfg.DATA.FORMAT}'")
    return cfg.DATA.FORMAT == "webdataset"


def _sample_args(cfg, split: str) -> dict:
    """The arguments of every task's sample maker, from the config."""
    return {"transform": build_transform(cfg, split), "max_caption_length": cfg.DATA.MAX_CAPTION_LENGTH}


def _common(cfg, split: str) -> dict:
    """The arguments every COCO dataset class takes, from the config."""
    return {**_sample_args(cfg, split), "skip_bad_images": cfg.DATA.SKIP_BAD_IMAGES}


def build_caption_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """Images with their tokenized captions (captioning, bicaptioning, token classification)."""
    tokenizer.check_against_config(cfg.DATA)
    if _from_shards(cfg):
        return build_shard_dataset(cfg, split, CaptionSamples(tokenizer, **_sample_args(cfg, split)))
    return CocoCaptionsDataset(cfg.DATA.ROOT, split, tokenizer, **_common(cfg, split))


def build_masked_lm_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """Images with captions whose tokens are masked as ``DATA.MASKED_LM`` says."""
    tokenizer.check_against_config(cfg.DATA)
    masking = cfg.DATA.MASKED_LM
    args = {
        "mask_proportion": masking.MASK_PROPORTION,
        "mask_probability": masking.MASK_PROBABILITY,
        "replace_probability": masking.REPLACE_PROBABILITY,
    }
    if _from_shards(cfg):
        return build_shard_dataset(cfg, split, MaskedLmSamples(tokenizer, **_sample_args(cfg, split), **args))
    return MaskedLmDataset(cfg.DATA.ROOT, split, tokenizer, **_common(cfg, split), **args)


def build_multilabel_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """Images with the set of COCO categories of their instances; ``DATA.VOCAB_SIZE`` is the
    number of categories here (it sets the classifier size), not the tokenizer's size. From
    shards, each sample's ``.json`` must list its class indices under ``labels``."""
    tokenizer.check_against_config(cfg.DATA, check_size=False)
    if _from_shards(cfg):
        samples = CaptionSamples(tokenizer, **_sample_args(cfg, split))
        return build_shard_dataset(cfg, split, samples, num_classes=cfg.DATA.VOCAB_SIZE)
    dataset = MultiLabelClassificationDataset(cfg.DATA.ROOT, split, tokenizer, **_common(cfg, split))
    if dataset.num_classes != cfg.DATA.VOCAB_SIZE:
        raise BadValueError(
            f"{cfg.DATA.ROOT}: instances file lists {dataset.num_classes} categories but DATA.VOCAB_SIZE "
            f"is {cfg.DATA.VOCAB_SIZE} (it sets the classifier size)"
        )
    return dataset
