"""Masked LM, token and multi-label classification datasets, and the config factory."""
from __future__ import annotations

import json
import re

import pytest
import torch

from pretrain.config import load_config
from pretrain.data import (
    CocoCaptionsDataset,
    MaskedLmDataset,
    MultiLabelClassificationDataset,
    collate_fn,
    mask_caption_tokens,
)
from pretrain.tasks import build_dataset, build_model, list_tasks, register_task

from .conftest import VOCAB_SIZE

SPECIAL = (0, 1, 2, 3)


def config(root, tokenizer_path, *overrides):
    return load_config(overrides=[
        "DATA.ROOT", str(root), "DATA.TOKENIZER_MODEL", str(tokenizer_path), "DATA.VOCAB_SIZE", str(VOCAB_SIZE),
        "DATA.IMAGE_CROP_SIZE", "16", *overrides,
    ])


def test_masking_statistics_follow_the_probabilities():
    torch.manual_seed(0)
    tokens = torch.tensor([1, *range(10, 30), 2])  # 20 ordinary tokens -> 3 chosen
    masked_count = replaced = kept = 0
    for _ in range(2000):
        masked, labels = mask_caption_tokens(tokens, SPECIAL, 3, VOCAB_SIZE, 0.15, 0.85, 0.10)
        chosen = labels.nonzero().flatten()
        assert chosen.numel() == 3
        assert labels[chosen].tolist() == tokens[chosen].tolist()  # original ids at chosen positions
        assert masked[0] == 1 and masked[-1] == 2  # boundary tokens are never chosen
        unchosen = torch.ones_like(tokens, dtype=torch.bool)
        unchosen[chosen] = False
        assert torch.equal(masked[unchosen], tokens[unchosen]) and labels[unchosen].eq(0).all()
        at = masked[chosen]
        masked_count += int((at == 3).sum())
        kept += int((at == tokens[chosen]).sum())
        replaced += int(((at != 3) & (at != tokens[chosen])).sum())
        assert at[at != 3].ge(4).all() and at.lt(VOCAB_SIZE).all()  # replacements are ordinary tokens
    total = 6000
    assert abs(masked_count / total - 0.85) < 0.02
    # A replacement may draw the original token (1 in 246), which then counts as kept.
    assert abs(replaced / total - 0.10) < 0.015 and abs(kept / total - 0.05) < 0.015


def test_a_lone_chosen_token_is_always_masked_and_specials_are_never_chosen():
    torch.manual_seed(0)
    tokens = torch.tensor([1, 7, 0, 3, 2])  # one ordinary token among specials (incl. a genuine <unk>)
    for _ in range(50):
        masked, labels = mask_caption_tokens(tokens, SPECIAL, 3, VOCAB_SIZE, 0.15, 0.0, 1.0)
        assert masked.tolist() == [1, 3, 0, 3, 2] and labels.tolist() == [0, 7, 0, 0, 0]
    masked, labels = mask_caption_tokens(torch.tensor([1, 2]), SPECIAL, 3, VOCAB_SIZE)
    assert masked.tolist() == [1, 2] and labels.tolist() == [0, 0]


def test_masked_lm_dataset_and_collate(coco_root, tokenizer_path, tokenizer):
    cfg = config(coco_root, tokenizer_path, "MODEL.NAME", "masked_lm", "DATA.IMAGE_TRANSFORM_TRAIN",
                 "['smallest_resize', 'center_crop', 'normalize']")
    dataset = build_dataset(cfg, "train", tokenizer)
    assert isinstance(dataset, MaskedLmDataset)
    torch.manual_seed(0)
    sample = dataset[2]
    assert set(sample) == {"image_id", "image", "caption_tokens", "masked_labels", "caption_lengths"}
    original = torch.tensor([1, *tokenizer.encode("A bright kitchen counter with a pizza."), 2])
    chosen = sample["masked_labels"].nonzero().flatten()
    assert chosen.numel() == -(-(len(original) - 2) * 15 // 100)  # ceil(15 % of the ordinary tokens)
    assert torch.equal(sample["masked_labels"][chosen], original[chosen])
    assert sample["caption_lengths"].item() == len(original)
    batch = collate_fn([dataset[i] for i in range(4)])
    assert batch["masked_labels"].shape == batch["caption_tokens"].shape
    for row, n in enumerate(batch["caption_lengths"].tolist()):
        assert batch["masked_labels"][row, n:].eq(0).all() and batch["caption_tokens"][row, n:].eq(0).all()


def test_masked_lm_rejects_bad_probabilities(coco_root, tokenizer_path, tokenizer):
    cfg = config(coco_root, tokenizer_path, "MODEL.NAME", "masked_lm", "DATA.MASKED_LM.REPLACE_PROBABILITY", "0.3")
    with pytest.raises(ValueError, match="MASK_PROBABILITY .* must be probabilities summing to at most 1"):
        build_dataset(cfg, "train", tokenizer)


@pytest.mark.parametrize("name", ["virtex", "bicaptioning", "captioning", "cappa_bicaptioning", "token_classification"])
def test_caption_models_get_the_captioning_dataset(coco_root, tokenizer_path, tokenizer, name):
    dataset = build_dataset(config(coco_root, tokenizer_path, "MODEL.NAME", name), "val", tokenizer)
    assert type(dataset) is CocoCaptionsDataset and len(dataset) == 2
    sample = dataset[0]
    assert sample["image"].shape == (3, 16, 16)
    assert sample["caption_tokens"].tolist() == [1, *tokenizer.encode("A girl holding an umbrella on the right."), 2]


def test_multilabel_labels_are_multi_hot_in_sorted_category_order(coco_root, tokenizer_path, tokenizer):
    cfg = config(coco_root, tokenizer_path, "MODEL.NAME", "multilabel_classification", "DATA.VOCAB_SIZE", "3")
    dataset = build_dataset(cfg, "train", tokenizer)
    assert isinstance(dataset, MultiLabelClassificationDataset)
    assert dataset.category_ids == [1, 18, 24]  # the file lists them as 18, 1, 24
    assert dataset.image_ids.tolist() == [9, 25, 42]  # image 30 has no instance
    expected = {9: [1, 0, 0], 25: [0, 1, 0], 42: [1, 0, 1]}
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["labels"].dtype == torch.float32
        assert sample["labels"].tolist() == expected[sample["image_id"].item()]
        assert {"caption_tokens", "noitpac_tokens", "caption_lengths"} <= set(sample)
    batch = collate_fn([dataset[i] for i in range(3)])
    assert batch["labels"].shape == (3, 3)


def test_multilabel_checks_the_config_and_the_instances_file(coco_root, tokenizer_path, tokenizer):
    cfg = config(coco_root, tokenizer_path, "MODEL.NAME", "multilabel_classification", "DATA.VOCAB_SIZE", "80")
    with pytest.raises(ValueError, match="lists 3 categories but DATA.VOCAB_SIZE is 80"):
        build_dataset(cfg, "train", tokenizer)
    path = coco_root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: annotations[0] needs an integer 'image_id' and a listed")):
        build_dataset(cfg, "train", tokenizer)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json: file not found"):
        build_dataset(cfg, "train", tokenizer)


def test_factory_checks_the_vocabulary_against_the_config(coco_root, tokenizer_path, tokenizer):
    with pytest.raises(ValueError, match=r"tiny\.model: vocabulary has 250 pieces but DATA.VOCAB_SIZE is 10000"):
        build_dataset(config(coco_root, tokenizer_path, "DATA.VOCAB_SIZE", "10000"), "train", tokenizer)
    with pytest.raises(ValueError, match=r"'\[EOS\]' has id 2, expected 5"):
        build_dataset(config(coco_root, tokenizer_path, "DATA.EOS_INDEX", "5"), "train", tokenizer)
    with pytest.raises(ValueError, match="MODEL.NAME 'clip' is unknown"):
        build_dataset(config(coco_root, tokenizer_path, "MODEL.NAME", "clip"), "train", tokenizer)


LINEAR_HEAD_TASKS = {"token_classification", "multilabel_classification"}


#: MODEL.VISUAL.{NAME, FEATURE_SIZE} of the two kinds of backbone every task must accept.
BACKBONES = {"resnet": ("torchvision::resnet18", "512"), "vit": ("timm::vit_tiny_patch16_224", "192")}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("name", list_tasks())
def test_every_registered_task_builds_a_model_and_a_dataset_that_train_together(
    coco_root, tokenizer_path, tokenizer, name, backbone
):
    """The task table's promise: a MODEL.NAME builds both halves, and they fit each other,
    with a ResNet or a ViT (16 px images: one 16 x 16 patch) as the visual backbone."""
    visual_name, feature_size = BACKBONES[backbone]
    overrides = ["MODEL.NAME", name, "MODEL.VISUAL.NAME", visual_name, "MODEL.VISUAL.FEATURE_SIZE", feature_size,
                 "MODEL.TEXTUAL.NAME", "none" if name in LINEAR_HEAD_TASKS else "transdec_postnorm::L1_H64_A2_F128"]
    if name == "multilabel_classification":
        overrides += ["DATA.VOCAB_SIZE", "3"]  # the tiny instances file lists 3 categories
    if name == "cappa_bicaptioning":
        overrides += ["MODEL.CAPPA.PARALLEL_FRACTION", "0.5"]
    cfg = config(coco_root, tokenizer_path, *overrides)
    dataset = build_dataset(cfg, "train", tokenizer)
    model = build_model(cfg)
    torch.manual_seed(0)
    loss = model(collate_fn([dataset[i] for i in range(2)]))["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    visual_grads = [p.grad for p in model.visual.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in visual_grads)  # the backbone trains


def test_a_registered_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="MODEL.NAME 'virtex' is already registered"):
        register_task("virtex", build_model, build_dataset)
