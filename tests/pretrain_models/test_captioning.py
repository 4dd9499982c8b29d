"""Captioning models: losses against manual cross-entropy, head sharing, CapPa batches, AMP."""
import pytest
import torch
from torch.nn import functional as F

from pretrain.models.captioning import gathered_cross_entropy
from pretrain.tasks import build_model, list_tasks

from .conftest import VOCAB, caption_batch, tiny_config


def build(name="virtex", seed=0, **extra):
    torch.manual_seed(seed)
    return build_model(tiny_config(name, **extra))


def manual_ce(head, visual_features, tokens, lengths):
    """The official computation: full (B, T, V) logits, CE(ignore_index=0) on the shifted pairs."""
    logits = head(visual_features, tokens, lengths)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), ignore_index=0)


def test_task_table_names():
    assert set(list_tasks()) == {
        "virtex", "bicaptioning", "captioning", "cappa_bicaptioning",
        "token_classification", "multilabel_classification", "masked_lm",
    }
    with pytest.raises(ValueError, match="MODEL.NAME 'nope' is unknown"):
        build_model(tiny_config("nope"))


@pytest.mark.parametrize("name", ["virtex", "bicaptioning"])
def test_bicaptioning_loss_is_sum_of_manual_cross_entropies(name, batch):
    model = build(name).eval()
    with torch.no_grad():
        out = model(batch)
        visual = model.visual(batch["image"])
        forward = manual_ce(model.textual, visual, batch["caption_tokens"], batch["caption_lengths"])
        backward = manual_ce(model.backward_textual, visual, batch["noitpac_tokens"], batch["caption_lengths"])
    components = out["loss_components"]
    assert set(components) == {"captioning_forward", "captioning_backward"}
    torch.testing.assert_close(components["captioning_forward"], forward, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(components["captioning_backward"], backward, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], forward + backward, rtol=1e-5, atol=1e-5)
    # Untrained tied embeddings make the loss large (official: well above ln V at step 0).
    assert forward > torch.log(torch.tensor(float(VOCAB))) * 0.5


def test_training_step_backward_and_gradients(batch):
    model = build()
    out = model(batch)
    assert out["loss"].requires_grad and not out["loss_components"]["captioning_forward"].requires_grad
    out["loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["backward_textual.transformer.layers.0.linear1.weight"].abs().sum() > 0


def test_backward_head_shares_exactly_projection_embedding_and_output():
    model = build()
    forward, backward = model.textual, model.backward_textual
    for name in ("visual_projection", "embedding", "output"):
        assert getattr(backward, name) is getattr(forward, name)
    assert backward.transformer is not forward.transformer
    forward_params = {id(p) for p in forward.transformer.parameters()}
    assert not forward_params & {id(p) for p in backward.transformer.parameters()}
    # A deep copy of the initialised forward head: identical initial decoder weights.
    for a, b in zip(forward.transformer.parameters(), backward.transformer.parameters()):
        assert torch.equal(a, b)
    state = model.state_dict()
    assert state["backward_textual.output.weight"].data_ptr() == state["textual.embedding.words.weight"].data_ptr()
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith("backward_textual.") and ".transformer." not in n]


def test_forward_only_captioning(batch):
    model = build("captioning").eval()
    assert not hasattr(model, "backward_textual")
    assert not [k for k in model.state_dict() if k.startswith("backward_textual")]
    with torch.no_grad():
        out = model(batch)
        visual = model.visual(batch["image"])
        expected = manual_ce(model.textual, visual, batch["caption_tokens"], batch["caption_lengths"])
    assert set(out["loss_components"]) == {"captioning_forward"}
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)


def test_gathered_logits_loss_and_gradients_equal_full_logits_loss(batch):
    head = build().textual
    tokens = batch["caption_tokens"]
    hidden = torch.randn(*tokens[:, :-1].shape, 64, requires_grad=True)
    loss = gathered_cross_entropy(head, hidden, tokens[:, 1:])
    (grad,) = torch.autograd.grad(loss, hidden)
    full = F.cross_entropy(head.output(hidden).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), ignore_index=0)
    (full_grad,) = torch.autograd.grad(full, hidden)
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-7)


def test_cappa_parallel_batches_use_masked_non_causal_inputs(batch):
    model = build("cappa_bicaptioning", **{"MODEL.CAPPA.PARALLEL_FRACTION": 1.0})
    model.textual.embedding.dropout.p = 0.0
    for layer in (*model.textual.transformer.layers, *model.backward_textual.transformer.layers):
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = layer.dropout3.p = 0.0
        layer.self_attn.dropout = layer.multihead_attn.dropout = 0.0
    model.visual.eval()
    out = model(batch)
    assert out["loss_components"]["parallel_batch"] == 1.0
    with torch.no_grad():
        visual = model.visual(batch["image"])
        for head, key, component in ((model.textual, "caption_tokens", "captioning_forward"),
                                     (model.backward_textual, "noitpac_tokens", "captioning_backward")):
            tokens = batch[key]
            inputs = torch.where(tokens[:, :-1] != 0, 3, 0)
            logits = head(visual, inputs, batch["caption_lengths"], causal=False)
            expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), ignore_index=0)
            torch.testing.assert_close(out["loss_components"][component], expected, rtol=1e-5, atol=1e-5)
    # Evaluation always uses the autoregressive loss.
    model.eval()
    with torch.no_grad():
        assert model(batch)["loss_components"]["parallel_batch"] == 0.0


def test_cappa_batch_choice_is_reproducible_and_follows_the_fraction(batch):
    model = build("cappa_bicaptioning", **{"MODEL.CAPPA.PARALLEL_FRACTION": 0.5})

    def draws(seed):
        torch.manual_seed(seed)
        return [model._is_parallel_batch() for _ in range(200)]

    first = draws(7)
    assert first == draws(7)
    assert 60 < sum(first) < 140
    assert build("cappa_bicaptioning")._is_parallel_batch() is False
    # A model given its own generator does not depend on (or advance) the global RNG.
    model.generator = torch.Generator().manual_seed(7)
    state = torch.get_rng_state()
    assert [model._is_parallel_batch() for _ in range(200)] == first
    assert torch.equal(state, torch.get_rng_state())


def test_parallel_fraction_is_refused_for_other_models():
    with pytest.raises(ValueError, match="PARALLEL_FRACTION"):
        build("virtex", **{"MODEL.CAPPA.PARALLEL_FRACTION": 0.5})


def test_bf16_autocast_and_channels_last():
    batch = caption_batch(batch_size=2)
    model = build()
    model.visual.eval()  # BatchNorm statistics would otherwise differ run to run
    model.eval()
    with torch.no_grad():
        reference = model(batch)["loss"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch)["loss"]
        model.to(memory_format=torch.channels_last)
        channels_last = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(model(channels_last)["loss"], reference, rtol=1e-4, atol=1e-4)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, rtol=0.03, atol=0.0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(channels_last)["loss"]
    loss.backward()
    assert torch.isfinite(model.textual.embedding.words.weight.grad).all()


def test_eval_without_captions_decodes():
    # Our decoding rules never generate [SOS] or [MASK]; the official ones (the default) may.
    model = build(**{"MODEL.DECODER.NAME": "beam_search_ours", "MODEL.DECODER.BEAM_SIZE": 3,
                     "MODEL.DECODER.MAX_DECODING_STEPS": 6}).eval()
    with torch.no_grad():
        predictions = model({"image": torch.randn(2, 3, 64, 64)})["predictions"]
    assert predictions.shape[0] == 2 and predictions.shape[1] <= 6
    assert not ((predictions == 1) | (predictions == 3)).any()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as validation decodes
        assert model({"image": torch.randn(2, 3, 64, 64)})["predictions"].dtype == torch.long
    model.train()
    with pytest.raises(ValueError, match="caption_tokens"):
        model({"image": torch.randn(2, 3, 64, 64)})


def test_decoding_steps_cannot_exceed_positions():
    with pytest.raises(ValueError, match="MAX_DECODING_STEPS"):
        build(**{"MODEL.DECODER.MAX_DECODING_STEPS": 50})
