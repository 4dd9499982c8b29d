"""The transformer head: name parsing, official init, weight tying, masks, pre-norm variant."""
import pytest
import torch
from torch import nn

from pretrain.models.factory import build_transformer_head
from pretrain.models.textual_heads import TransformerSpec, parse_textual_name

from .conftest import MAX_LENGTH, VOCAB, caption_batch, tiny_config


def make_head(textual="transdec_postnorm::L2_H64_A2_F128"):
    torch.manual_seed(0)
    return build_transformer_head(tiny_config(textual=textual))


def test_parse_names():
    assert parse_textual_name("transdec_postnorm::L1_H2048_A32_F8192") == TransformerSpec(1, 2048, 32, 8192, False)
    assert parse_textual_name("transdec_prenorm::L6_H512_A8_F2048").norm_first
    for bad in ("transdec::L1_H64_A2_F128", "transdec_postnorm::L1_H64_A2", "transdec_postnorm::L1_H65_A2_F128"):
        with pytest.raises(ValueError, match="MODEL.TEXTUAL.NAME"):
            parse_textual_name(bad)


def test_official_init():
    head = make_head()
    words = head.embedding.words.weight
    assert words[0].abs().sum() == 0  # padding row
    assert abs(words[1:].std().item() - 0.02) < 0.003
    assert abs(head.embedding.positions.weight.std().item() - 0.02) < 0.005
    layer = head.transformer.layers[0]
    for weight in (layer.self_attn.in_proj_weight, layer.multihead_attn.out_proj.weight, layer.linear1.weight,
                   head.visual_projection.weight):
        assert abs(weight.std().item() - 0.02) < 0.003
    # Biases keep PyTorch's defaults: U(+-1/sqrt(fan_in)) for Linear, zero for the MHA projections.
    assert layer.self_attn.in_proj_bias.abs().sum() == 0
    assert 0 < layer.linear1.bias.abs().max() <= 1 / 64**0.5
    assert 0 < head.output.bias.abs().max() <= 1 / 64**0.5
    assert head.embedding.layer_norm.eps == 1e-8 and layer.norm1.eps == 1e-5
    assert head.embedding.layer_norm.weight.eq(1).all()
    assert layer.activation is nn.functional.gelu and layer.self_attn.batch_first


def test_output_weight_is_the_word_embedding():
    head = make_head()
    assert head.output.weight is head.embedding.words.weight
    assert head.output.weight.shape == (VOCAB, 64) and head.output.bias.shape == (VOCAB,)


def test_prenorm_variant_has_norm_first_layers_and_final_norm():
    head = make_head("transdec_prenorm::L2_H64_A2_F128")
    assert all(layer.norm_first for layer in head.transformer.layers)
    assert isinstance(head.transformer.norm, nn.LayerNorm)
    assert "transformer.norm.weight" in head.state_dict()
    assert make_head().transformer.norm is None
    batch = caption_batch()
    head.eval()
    logits = head(torch.randn(3, 512, 2, 2), batch["caption_tokens"], batch["caption_lengths"])
    assert logits.shape == (*batch["caption_tokens"].shape, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("textual", ["transdec_postnorm::L2_H64_A2_F128", "transdec_prenorm::L2_H64_A2_F128"])
def test_future_tokens_do_not_change_earlier_logits(textual):
    head = make_head(textual).eval()
    visual = torch.randn(1, 512, 2, 2)
    tokens = torch.tensor([[1, 10, 11, 12, 13, 14, 2]])
    changed = tokens.clone()
    changed[0, 4] = 50
    with torch.no_grad():
        a, b = head(visual, tokens), head(visual, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_non_causal_mode_sees_future_tokens_but_not_padding():
    head = make_head().eval()
    visual = torch.randn(1, 512, 2, 2)
    tokens = torch.tensor([[1, 10, 11, 2, 0, 0]])
    changed = tokens.clone()
    changed[0, 2] = 50
    lengths = torch.tensor([4])
    with torch.no_grad():
        a = head(visual, tokens, lengths, causal=False)
        b = head(visual, changed, lengths, causal=False)
        short = head(visual, tokens[:, :4], lengths, causal=False)
    assert not torch.allclose(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, :4], short, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # the official mask types
def test_causal_path_matches_official_masking_on_real_positions():
    """Official: float causal mask + key-padding mask from lengths. Ours: causal only."""
    head = make_head().eval()
    batch = caption_batch(batch_size=4, lengths=[4, 7, MAX_LENGTH, 5])
    tokens, lengths = batch["caption_tokens"], batch["caption_lengths"]
    visual = torch.randn(4, 512, 2, 2)
    length = tokens.size(1)
    causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
    padding = torch.arange(length)[None] >= lengths[:, None]
    with torch.no_grad():
        memory = head.project_visual(visual)
        official = head.transformer(head.embedding(tokens), memory, tgt_mask=causal, tgt_key_padding_mask=padding)
        ours = head.hidden_states(memory, tokens, lengths)
    real = ~padding
    torch.testing.assert_close(ours[real], official[real], rtol=1e-5, atol=1e-5)


def test_embedding_zeroes_padding_and_unknown_positions():
    head = make_head()
    tokens = torch.tensor([[1, 0, 5, 2, 0]])
    embeddings = head.embedding(tokens)
    assert embeddings[0, [1, 4]].abs().sum() == 0
    assert embeddings[0, [0, 2, 3]].abs().sum(-1).gt(0).all()
    with pytest.raises(ValueError, match="MAX_CAPTION_LENGTH"):
        head.embedding(torch.ones(1, MAX_LENGTH + 1, dtype=torch.long))


@pytest.mark.parametrize("textual", ["transdec_postnorm::L2_H64_A2_F128", "transdec_prenorm::L2_H64_A4_F128"])
def test_teacher_forced_packed_states_and_gradients_equal_the_padded_decoder(textual):
    """Packed decoding (real tokens only) against the padded ``nn.TransformerDecoder`` path:
    same hidden states at every needed position and the same gradients for every parameter and
    for the visual memory. Row 1 holds an <unk> (id 0) inside the caption: not a prediction
    target, but still a key for the positions after it."""
    head = make_head(textual).eval()
    batch = caption_batch(batch_size=4, lengths=[4, 7, MAX_LENGTH, 5])
    tokens = batch["caption_tokens"]
    tokens[1, 3] = 0
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    memory = torch.randn(4, 3, 64, requires_grad=True)
    needed = torch.arange(inputs.size(1))[None] < (batch["caption_lengths"][:, None] - 1)
    assert not bool((targets != 0)[~needed].any())

    names, params = zip(*[("memory", memory), *head.transformer.named_parameters(), *head.embedding.named_parameters()])
    padded = head.hidden_states(memory, inputs)[needed]
    probe = torch.randn_like(padded)
    expected_grads = torch.autograd.grad((padded * probe).sum(), params)
    packed, packed_targets = head.teacher_forced_hidden_states(memory, inputs, targets)
    grads = torch.autograd.grad((packed * probe).sum(), params)

    assert torch.equal(packed_targets, targets[needed])
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for name, grad, expected in zip(names, grads, expected_grads):
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_forced_states_skip_the_padding_tail():
    head = make_head().eval()
    batch = caption_batch(batch_size=3, lengths=[4, 5, MAX_LENGTH])
    tokens = batch["caption_tokens"]
    with torch.no_grad():
        hidden, targets = head.teacher_forced_hidden_states(torch.randn(3, 2, 64), tokens[:, :-1], tokens[:, 1:])
    assert hidden.shape == (3 + 4 + MAX_LENGTH - 1, 64)
    assert targets.ne(0).all()
