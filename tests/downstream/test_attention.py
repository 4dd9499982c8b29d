"""Cross-attention capture and tools/visualize_attention.py, down to the page in a real browser."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from pretrain.config import load_config
from pretrain.downstream.attention import CrossAttentionRecorder, caption_with_attention
from pretrain.downstream.caption_eval import load_captioning_model
from pretrain.tokenizer import group_pieces
from tests.downstream.conftest import load_tool


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_config, tiny_checkpoint):
    cfg = load_config(str(tiny_config))
    model, tokenizer = load_captioning_model(cfg, tiny_checkpoint)
    return cfg, model, tokenizer


def test_recorder_returns_the_layer_attention_without_changing_outputs(model_and_tokenizer):
    _, model, _ = model_and_tokenizer
    head = model.textual
    torch.manual_seed(0)
    memory = head.project_visual(model.visual(torch.randn(2, 3, 64, 64)))
    tokens = torch.tensor([[1, 7, 9, 11], [1, 5, 6, 8]])
    with torch.no_grad():
        plain = head.hidden_states(memory, tokens)
        with CrossAttentionRecorder(head) as recorder:
            recorded = head.hidden_states(memory, tokens)
        # The same probabilities, computed by calling the layer's modules directly (eval: no dropout).
        layer = head.transformer.layers[0]
        x = head.embedding(tokens)
        causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
        x = layer.norm1(x + layer.self_attn(x, x, x, attn_mask=causal)[0])
        expected = layer.multihead_attn(x, memory, memory, need_weights=True, average_attn_weights=False)[1]
    torch.testing.assert_close(recorded, plain)
    [maps] = recorder.maps
    assert maps.shape == (2, 2, 4, 4)  # batch, heads, caption positions, 2x2 visual tokens
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 4))
    assert not layer.multihead_attn._forward_hooks and not layer.multihead_attn._forward_pre_hooks


def test_words_group_their_pieces_and_each_map_is_a_distribution(model_and_tokenizer):
    _, model, tokenizer = model_and_tokenizer
    assert group_pieces(["\u2581a", "\u2581do", "g", "s", "\u2581on"]) == [[0], [1, 2, 3], [4]]
    pieces = ["\u2581a", "\u2581do", "g", ",", "\u2581a", "\u2581tv", "s", "."]
    assert group_pieces(pieces) == [[0], [1, 2, 3], [4], [5, 6, 7]]  # words as the caption shows them
    assert group_pieces(pieces, punctuation_apart=True) == [[0], [1, 2], [3], [4], [5, 6], [7]]
    assert group_pieces(["\u2581", "3", "\u2581,", "\u2581cats"], punctuation_apart=True) == [[0, 1], [2], [3]]
    torch.manual_seed(0)
    [result] = caption_with_attention(model, torch.randn(1, 3, 96, 96), tokenizer, 1, 2, 4)
    assert result.words and " ".join(w.word for w in result.words) == result.caption
    for word in result.words:
        assert word.attention.shape == (3, 3) and word.attention.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        caption_with_attention(model, torch.randn(1, 3, 64, 64), tokenizer, 1, 2, 4, layer=3)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


# Appended to a copy of the page: after every image has settled, write each one's natural width.
_REPORT_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const report = document.createElement("pre");
  report.id = "report";
  report.textContent = Array.from(document.images).map(i => i.complete + ":" + i.naturalWidth).join(",");
  document.body.appendChild(report);
});
</script>
"""


def test_visualize_attention_page_opens_in_headless_chromium(tiny_config, tiny_checkpoint, tmp_path, capsys):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test: run make test-deps"
    out = tmp_path / "attention"
    tool = load_tool("visualize_attention")
    assert tool.main(["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--output-dir", str(out)]) == 0
    page = (out / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    grids = sorted(out.glob("*_attention.png"))
    assert len(grids) == 4  # the built-in val split
    for grid in grids:
        with Image.open(grid) as image:
            assert image.size[0] > 100 and image.getextrema()[0][1] > 0
    # One tile for the input and one per generated word, for every image.
    captions = re.findall(r'<p class="caption">(.*?)</p>', page)
    assert len(parser.sources) == sum(1 + len(c.split()) for c in captions) > 4

    (out / "check.html").write_text(page.replace("</body>", _REPORT_SCRIPT + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
             (out / "check.html").as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
    report = re.search(r'<pre id="report">(.*?)</pre>', dom)
    assert report, f"the page's load handler did not run; DOM was:\n{dom[:2000]}"
    states = report.group(1).split(",")
    assert len(states) == len(parser.sources)
    assert all(s.startswith("true:") and int(s.split(":")[1]) > 0 for s in states), states


def test_unreadable_image_is_named(tiny_config, tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    tool = load_tool("visualize_attention")
    argv = ["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--images", str(broken),
            "--output-dir", str(tmp_path / "out")]
    assert tool.main(argv) == 2
    assert f"{broken}: cannot read image" in capsys.readouterr().err


def test_caption_of_maximum_length_fits_the_learned_positions(model_and_tokenizer, monkeypatch):
    """A caption that never produced [EOS] has MAX_CAPTION_LENGTH tokens; re-reading it must not
    need more positions than decoding did."""
    cfg, model, tokenizer = model_and_tokenizer
    full = torch.full((1, cfg.DATA.MAX_CAPTION_LENGTH), 10, dtype=torch.long)
    monkeypatch.setattr(model, "decode_features", lambda features: full)
    [result] = caption_with_attention(model, torch.randn(1, 3, 64, 64), tokenizer, 1, 2, 4)
    assert sum(len(tokenizer.encode(w.word)) for w in result.words) == cfg.DATA.MAX_CAPTION_LENGTH
