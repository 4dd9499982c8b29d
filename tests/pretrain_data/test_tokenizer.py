"""The SentencePiece vocabulary builder, its command-line tool, and the tokenizer."""
from __future__ import annotations

import json
import pickle
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm

from pretrain.tokenizer import (
    SentencePieceBPETokenizer,
    normalize_caption,
    train_vocabulary,
)
from tests.tool_main import Tool

from .conftest import VOCAB_SIZE, vocabulary_corpus, write_captions_json

REPO = Path(__file__).resolve().parents[2]


def load_tool() -> Tool:
    return Tool("build_vocabulary")


def test_special_ids_follow_the_official_layout(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    for token, token_id in {"<unk>": 0, "[SOS]": 1, "[EOS]": 2, "[MASK]": 3}.items():
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.id_to_token(token_id) == token
    tokenizer.check_special_ids({"<unk>": 0, "[SOS]": 1, "[EOS]": 2, "[MASK]": 3})
    with pytest.raises(ValueError, match=r"tiny\.model.*'\[SOS\]' has id 1, expected 4"):
        tokenizer.check_special_ids({"[SOS]": 4})


def test_encode_decode_round_trip_and_special_ids_are_skipped(tokenizer):
    text = "a black dog riding a skateboard on the left"
    ids = tokenizer.encode(text)
    assert ids and all(4 <= i < VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([1, *ids, 2, 3, 0, 0]) == text  # [SOS] [EOS] [MASK] and padding left out
    assert tokenizer.token_to_id("no-such-piece") == 0
    with pytest.raises(IndexError, match="tiny.model"):
        tokenizer.id_to_token(VOCAB_SIZE)


def test_official_decoding_writes_unk_as_sentencepiece_itself_does(tokenizer, tokenizer_path):
    ids = tokenizer.encode("a black dog riding a skateboard")
    # [SOS] a black <unk> dog riding a skateboard [MASK] <unk> [EOS] [EOS], as a decoder might give it.
    row = [1, *ids[:2], 0, *ids[2:], 3, 0, 2, 2]
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    assert tokenizer.decode_official(row) == processor.DecodeIds(row)
    assert tokenizer.decode_official(row) == "a black \u2047  dog riding a skateboard \u2047 "
    assert tokenizer.decode_official([0]) == " \u2047 "
    assert tokenizer.decode(row) == "a black dog riding a skateboard"  # ours: <unk> is padding


def test_normalisation_lower_cases_and_strips_accents(tokenizer):
    assert normalize_caption("A Café, NAÏVE Zoë") == "a cafe, naive zoe"
    assert normalize_caption("Việt Nam, ΆΝΘΡΩΠΟΣ, Ёлка") == "viet nam, ανθρωπος, елка"
    assert normalize_caption("A Café", keep_accents=True) == "a café"
    assert tokenizer.encode("A DOG inside a Café") == tokenizer.encode("a dog inside a cafe")


@pytest.mark.parametrize("caption", ["एक कुत्ता पार्क में दौड़ रहा है", "สุนัขวิ่งในสวน", "がっこうのいぬ"])
def test_normalisation_keeps_the_marks_that_are_part_of_letters(caption):
    # Devanagari's virama and nukta, Thai vowels and tone marks, the Japanese voicing mark are
    # combining marks too; dropping them (the official rule, made for accents) changes the words.
    assert normalize_caption(caption) == unicodedata.normalize("NFKD", caption)


def test_tokenizer_pickles_by_path_and_reloads(tokenizer):
    blob = pickle.dumps(tokenizer)
    assert len(blob) < 1000  # the path, not the model
    clone = pickle.loads(blob)
    assert clone.model_path == tokenizer.model_path
    assert clone.encode("a zebra near a fence") == tokenizer.encode("a zebra near a fence")


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        SentencePieceBPETokenizer(tmp_path / "nothing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceBPETokenizer(bad)


def test_training_refuses_to_overwrite_unless_forced(tokenizer_path, tmp_path):
    prefix = tmp_path / "sub" / "vocab"
    model = train_vocabulary(vocabulary_corpus(), prefix, vocab_size=VOCAB_SIZE)
    assert model == tmp_path / "sub" / "vocab.model" and (tmp_path / "sub" / "vocab.vocab").is_file()
    before = model.read_bytes()
    with pytest.raises(FileExistsError, match="vocab.model"):
        train_vocabulary(["a dog"] * 10, prefix, vocab_size=30)
    assert model.read_bytes() == before
    train_vocabulary(vocabulary_corpus(), prefix, vocab_size=200, force=True)
    assert SentencePieceBPETokenizer(model).get_vocab_size() == 200
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["vocab.model", "vocab.vocab"]  # no temp files


def test_training_on_too_few_captions_names_the_output(tmp_path):
    with pytest.raises(ValueError, match="small.model.*Vocabulary size too high"):
        train_vocabulary(["a dog", "a cat"], tmp_path / "small", vocab_size=500)
    assert not (tmp_path / "small.model").exists()


def test_a_sentencepiece_complaint_about_its_arguments_is_not_blamed_on_the_captions(tmp_path, monkeypatch):
    """Only the corpus-size message is the input's fault; "unknown field name" (our call) stays a bug."""
    def refuse(**kwargs):
        raise RuntimeError('NOT_FOUND: unknown field name "character_coverge" in TrainerSpec.')
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", refuse)
    with pytest.raises(RuntimeError, match="unknown field name") as caught:
        train_vocabulary(["a dog", "a cat"], tmp_path / "v", vocab_size=10)
    assert not isinstance(caught.value, ValueError)


def test_command_line_tool(tmp_path, capsys):
    tool = load_tool()
    captions = tmp_path / "captions_train2017.json"
    entries = [(i, 10, 10, vocabulary_corpus()[5 * i: 5 * i + 5]) for i in range(len(vocabulary_corpus()) // 5)]
    write_captions_json(captions, entries)
    out = tmp_path / "vocab" / "coco"
    assert tool.main(["--captions", str(captions), "--output", str(out), "--vocab-size", "220"]) == 0
    tokenizer = SentencePieceBPETokenizer(str(out) + ".model")
    assert tokenizer.get_vocab_size() == 220 and tokenizer.token_to_id("[MASK]") == 3

    assert tool.main(["--captions", str(captions), "--output", str(out), "--vocab-size", "220"]) == 2
    assert "coco.model: already exists" in capsys.readouterr().err
    assert tool.main(["--captions", str(captions), "--output", str(out), "--vocab-size", "220", "--force"]) == 0

    assert tool.main(["--captions", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    assert tool.main(["--captions", str(broken), "--output", str(tmp_path / "x")]) == 2
    assert "broken.json: malformed JSON at line 1" in capsys.readouterr().err
    no_caption = tmp_path / "no_caption.json"
    no_caption.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    assert tool.main(["--captions", str(no_caption), "--output", str(tmp_path / "x")]) == 2
    assert "no_caption.json: annotations[0] needs an integer 'image_id' and a string 'caption'" in capsys.readouterr().err


def test_a_caption_longer_than_sentencepieces_limit_is_trained_on_not_left_out(tmp_path):
    # SentencePiece leaves out sentences above 4192 bytes unless told otherwise: the letters of
    # this one caption would be missing from the vocabulary (character_coverage 1.0 promises all).
    corpus = vocabulary_corpus() + [" ".join(["quixotic zebra jazz"] * 300)]
    assert len(corpus[-1]) > 4192
    tokenizer = SentencePieceBPETokenizer(train_vocabulary(corpus, tmp_path / "long", vocab_size=VOCAB_SIZE))
    pieces = {tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())}
    assert {"q", "x"} <= {ch for piece in pieces for ch in piece}  # in no other caption
    with pytest.raises(ValueError, match="blank.*none of the 2 captions has any text"):
        train_vocabulary(["  ", "\t"], tmp_path / "blank")


def test_keep_accents_keeps_accented_pieces(tmp_path):
    corpus = vocabulary_corpus() + ["un café crème à côté"] * 50
    stripped = SentencePieceBPETokenizer(train_vocabulary(corpus, tmp_path / "plain", vocab_size=VOCAB_SIZE))
    kept = SentencePieceBPETokenizer(train_vocabulary(corpus, tmp_path / "accents", vocab_size=VOCAB_SIZE,
                                                      keep_accents=True))
    pieces = lambda tok: {tok.id_to_token(i) for i in range(tok.get_vocab_size())}
    assert not any("é" in p for p in pieces(stripped))
    assert any("é" in p for p in pieces(kept))
