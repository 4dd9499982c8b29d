"""Token / multi-label classification and masked LM: losses against the official formulas."""
import pytest
import torch
from torch.nn import functional as F

from pretrain.tasks import build_model

from .conftest import VOCAB, caption_batch, tiny_config


def build(name, **extra):
    torch.manual_seed(0)
    return build_model(tiny_config(name, **{"MODEL.TEXTUAL.NAME": "none", **extra}))


def official_k_hot_loss(logits, target_sets):
    """The official per-image loop: minus the mean log-probability of each image's unique targets."""
    logprobs = F.log_softmax(logits, dim=1)
    return -sum(logprobs[i, sorted(targets)].mean() for i, targets in enumerate(target_sets)) / len(target_sets)


def test_token_classification_loss_matches_official_loop(batch):
    model = build("token_classification").eval()
    with torch.no_grad():
        out = model(batch)
        logits = model.textual(model.visual(batch["image"]))
    targets = [set(row.tolist()) - {0, 1, 2} for row in batch["caption_tokens"]]
    torch.testing.assert_close(out["loss"], official_k_hot_loss(logits, targets), rtol=1e-5, atol=1e-5)
    assert set(out["loss_components"]) == {"classification"}
    assert out["predictions"].shape == (3, 10)
    assert list(model.state_dict())[-2:] == ["textual.output.weight", "textual.output.bias"]
    assert model.textual.output.weight.shape == (VOCAB, 512)


def test_multilabel_classification_loss_and_empty_images():
    model = build("multilabel_classification", **{"DATA.VOCAB_SIZE": 80}).eval()
    labels = torch.zeros(3, 80)
    labels[0, [3, 7]] = 1
    labels[1, 50] = 1  # image 2 has no objects: contributes 0, never NaN
    batch = {"image": torch.randn(3, 3, 64, 64), "labels": labels}
    with torch.no_grad():
        out = model(batch)
        logits = model.textual(model.visual(batch["image"]))
    expected = official_k_hot_loss(logits[:2], [{3, 7}, {50}]) * 2 / 3
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"labels.*\(batch, 80\)"):
        model({"image": batch["image"], "labels": labels[:, :10]})


def test_multilabel_binary_cross_entropy_sums_a_sigmoid_loss_per_class():
    """MODEL.CLASSIFICATION_LOSS binary_cross_entropy: per image, -log sigmoid(z) over its classes
    and -log(1 - sigmoid(z)) over the others, summed; then the mean over images (an image without
    objects still learns that it has none)."""
    model = build("multilabel_classification", **{"DATA.VOCAB_SIZE": 80,
                                                   "MODEL.CLASSIFICATION_LOSS": "binary_cross_entropy"}).eval()
    labels = torch.zeros(3, 80)
    labels[0, [3, 7]] = 1
    labels[1, 50] = 1
    batch = {"image": torch.randn(3, 3, 64, 64), "labels": labels}
    with torch.no_grad():
        out = model(batch)
        z = model.textual(model.visual(batch["image"]))
    by_hand = -(labels * F.logsigmoid(z) + (1 - labels) * F.logsigmoid(-z)).sum() / 3
    torch.testing.assert_close(out["loss"], by_hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown classification loss 'hinge'"):
        type(model)(model.visual, model.textual, loss="hinge")


def test_classification_models_train_and_require_linear_head():
    model = build("token_classification")
    model(caption_batch())["loss"].backward()
    assert model.textual.output.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="MODEL.TEXTUAL.NAME to 'none'"):
        build_model(tiny_config("token_classification"))


def test_masked_lm_loss_predictions_and_bidirectional_context():
    torch.manual_seed(0)
    model = build_model(tiny_config("masked_lm")).eval()
    batch = caption_batch()
    tokens = batch["caption_tokens"]
    labels = torch.zeros_like(tokens)
    labels[0, 2], labels[1, 1], labels[2, 3] = tokens[0, 2], tokens[1, 1], tokens[2, 3]
    masked_tokens = torch.where(labels != 0, 3, tokens)
    batch = dict(batch, caption_tokens=masked_tokens, masked_labels=labels)
    with torch.no_grad():
        out = model(batch)
        logits = model.textual(model.visual(batch["image"]), masked_tokens, batch["caption_lengths"], causal=False)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=0)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert set(out["loss_components"]) == {"masked_lm"}
    predictions = out["predictions"]
    assert (predictions[labels == 0] == 0).all()
    assert torch.equal(predictions[labels != 0], logits.argmax(-1)[labels != 0])
    model.train()
    model(batch)["loss"].backward()
