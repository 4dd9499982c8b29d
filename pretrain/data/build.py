"""From a pretraining config to the dataset of the configured model."""
from __future__ import annotations

from torch.utils.data import Dataset

from pretrain.data.captions import CocoCaptionsDataset
from pretrain.data.masked_lm import MaskedLmDataset
from pretrain.data.multilabel import MultiLabelClassificationDataset
from pretrain.data.transforms import build_transform
from pretrain.tokenizer import SentencePieceBPETokenizer

DATASETS = {
    "virtex": CocoCaptionsDataset,
    "bicaptioning": CocoCaptionsDataset,
    "captioning": CocoCaptionsDataset,
    "cappa_bicaptioning": CocoCaptionsDataset,
    # The model turns caption_tokens into bag-of-words targets.
    "token_classification": CocoCaptionsDataset,
    "masked_lm": MaskedLmDataset,
    "multilabel_classification": MultiLabelClassificationDataset,
}
"""``MODEL.NAME`` -> dataset class."""


def build_dataset(cfg, split: str, tokenizer: SentencePieceBPETokenizer) -> Dataset:
    """The ``split`` ("train" or "val") dataset for ``cfg.MODEL.NAME``, transforms included.

    Checks first that the tokenizer's special ids are the config's ``DATA.*_INDEX`` values and,
    for the models that predict tokens, that its size is ``DATA.VOCAB_SIZE``; for multi-label
    classification ``DATA.VOCAB_SIZE`` must be the number of object categories instead.
    Batch the samples with :func:`pretrain.data.collate_fn`.
    """
    name = cfg.MODEL.NAME
    if name not in DATASETS:
        raise ValueError(f"MODEL.NAME: no dataset for '{name}'; known: {sorted(DATASETS)}")
    data = cfg.DATA
    tokenizer.check_special_ids(
        {"<unk>": data.UNK_INDEX, "[SOS]": data.SOS_INDEX, "[EOS]": data.EOS_INDEX, "[MASK]": data.MASK_INDEX}
    )
    if name != "multilabel_classification" and tokenizer.get_vocab_size() != data.VOCAB_SIZE:
        raise ValueError(
            f"{tokenizer.model_path}: vocabulary has {tokenizer.get_vocab_size()} pieces but "
            f"DATA.VOCAB_SIZE is {data.VOCAB_SIZE}"
        )
    kwargs = {}
    if name == "masked_lm":
        kwargs = {
            "mask_proportion": data.MASKED_LM.MASK_PROPORTION,
            "mask_probability": data.MASKED_LM.MASK_PROBABILITY,
            "replace_probability": data.MASKED_LM.REPLACE_PROBABILITY,
        }
    dataset = DATASETS[name](
        data.ROOT,
        split,
        tokenizer,
        build_transform(cfg, split),
        max_caption_length=data.MAX_CAPTION_LENGTH,
        skip_bad_images=data.SKIP_BAD_IMAGES,
        **kwargs,
    )
    if name == "multilabel_classification" and dataset.num_classes != data.VOCAB_SIZE:
        raise ValueError(
            f"{data.ROOT}: instances file lists {dataset.num_classes} categories but DATA.VOCAB_SIZE "
            f"is {data.VOCAB_SIZE} (it sets the classifier size)"
        )
    return dataset
