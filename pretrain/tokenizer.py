"""SentencePiece BPE vocabulary for captions: building it, and the tokenizer that reads it.

The layout matches the official VirTex vocabulary, so official ``.model`` files work here and
ours work there: ``<unk>`` is id 0 and doubles as padding, the control symbols ``[SOS]``,
``[EOS]`` and ``[MASK]`` are ids 1, 2 and 3 (SentencePiece's own BOS/EOS are disabled), and the
ordinary pieces follow. Captions are normalised the way the official dataset does it: lower
case, Unicode NFKD, combining marks (accents) dropped; in scripts whose combining marks are part
of the letters (Devanagari's virama, Thai's vowels, Japanese voicing marks) they are kept.
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from pretrain.errors import BadValueError, MissingInputError, OutputExistsError
from pretrain.files import write_bytes_atomic

logger = logging.getLogger(__name__)

CONTROL_SYMBOLS = ["[SOS]", "[EOS]", "[MASK]"]
WORD_START = "\u2581"  # SentencePiece's marker of a piece that begins a word


# Scripts whose combining marks are accents on a complete letter ("é" is "e" + acute): these are
# dropped. Elsewhere a combining mark is part of the letter: Devanagari's virama joins consonants,
# Thai writes vowels as marks, the Japanese voicing mark turns "か" into "が".
_ACCENTED_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")


@functools.lru_cache(maxsize=4096)
def _marks_are_letters(base: str) -> bool:
    """Whether combining marks after ``base`` belong to the letter (kept) rather than being
    accents (dropped): ``base`` is a letter or mark of a script other than Latin, Greek, Cyrillic."""
    return unicodedata.category(base)[0] in "LM" and not unicodedata.name(base, "").startswith(_ACCENTED_SCRIPTS)


def normalize_caption(text: str, keep_accents: bool = False) -> str:
    """Lower-case ``text``; unless ``keep_accents``, NFKD-decompose it and drop accents.

    "Café" becomes "cafe". This is what the official dataset applies to every caption before
    tokenisation, and what the official vocabulary builder applies to its training text; the
    official rule drops every combining mark, which for English captions is the same thing.
    Marks that are part of a letter in other scripts are kept (:data:`_ACCENTED_SCRIPTS`), so
    "पार्क" stays a word instead of losing its virama.
    """
    text = text.lower()
    if keep_accents or text.isascii():
        return text
    kept, base = [], ""
    for ch in unicodedata.normalize("NFKD", text):
        if not unicodedata.combining(ch):
            base = ch
        elif not (base and _marks_are_letters(base)):
            continue
        kept.append(ch)
    return "".join(kept)


def train_vocabulary(
    captions: Sequence[str],
    output_prefix: str | os.PathLike,
    vocab_size: int = 10000,
    keep_accents: bool = False,
    force: bool = False,
) -> Path:
    """Train a SentencePiece BPE model on ``captions``; write ``PREFIX.model`` and ``PREFIX.vocab``.

    Settings follow the official vocabulary: BPE, ``character_coverage=1.0``, BOS/EOS disabled,
    control symbols ``[SOS] [EOS] [MASK]`` (so ids 0-3 are ``<unk> [SOS] [EOS] [MASK]``), and
    captions normalised by :func:`normalize_caption`. An existing model is never overwritten
    unless ``force``. Both files are written to a temporary prefix first and then moved into
    place, so an interrupted run leaves no half-written model. Returns the ``.model`` path.
    """
    if not captions:
        raise BadValueError(f"{output_prefix}: no captions to train the vocabulary on")
    prefix = Path(output_prefix)
    model_path = prefix.parent / (prefix.name + ".model")
    vocab_path = prefix.parent / (prefix.name + ".vocab")
    if not force:
        for path in (model_path, vocab_path):
            if path.exists():
                raise OutputExistsError(f"{path}: already exists (pass force=True / --force to overwrite)")
    prefix.parent.mkdir(parents=True, exist_ok=True)

    sentences = [normalize_caption(caption, keep_accents).replace("\n", " ")
                 for caption in tqdm(captions, desc="captions", unit="cap", mininterval=2.0)]
    if not any(sentence.strip() for sentence in sentences):
        raise BadValueError(f"{output_prefix}: none of the {len(captions)} captions has any text; give captions")
    # SentencePiece silently leaves out sentences longer than this (4192 bytes by default).
    longest = max(len(sentence.encode("utf-8")) for sentence in sentences)

    logger.info("training a %d-piece SentencePiece BPE model on %d captions", vocab_size, len(captions))
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=".spm-") as tmp:
        tmp_prefix = os.path.join(tmp, "vocab")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                max_sentence_length=max(4192, longest),
                model_prefix=tmp_prefix,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=1.0,
                bos_id=-1,
                eos_id=-1,
                control_symbols=CONTROL_SYMBOLS,
                minloglevel=2,  # SentencePiece logs every merge at INFO; keep errors only
            )
        except RuntimeError as err:
            if "Vocabulary size" not in str(err):  # another complaint is about how we call it: a bug
                raise
            # "Vocabulary size too high (N). Please set it to a value <= M.": a corpus too small for it
            raise BadValueError(f"{model_path}: SentencePiece training failed: {err}") from None
        # SentencePiece writes the files itself; they are published through the atomic writer.
        write_bytes_atomic(vocab_path, Path(tmp_prefix + ".vocab").read_bytes())
        write_bytes_atomic(model_path, Path(tmp_prefix + ".model").read_bytes())
    logger.info("wrote %s and %s", model_path, vocab_path)
    return model_path


class SentencePieceBPETokenizer:
    """Encodes captions to ids and back with a SentencePiece model file.

    ``encode`` applies :func:`normalize_caption` first, as the official dataset does, and does
    not add ``[SOS]``/``[EOS]`` (the datasets do). Pickling keeps only the file path and the
    model is loaded again on unpickling, so each DataLoader worker owns its processor.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = str(model_path)
        self._load()

    def _load(self) -> None:
        if not os.path.isfile(self.model_path):
            raise MissingInputError(f"{self.model_path}: tokenizer model not found")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(self.model_path)
        except (OSError, RuntimeError) as err:
            raise BadValueError(f"{self.model_path}: not a SentencePiece model ({err})") from None
        self._sp = processor
        self._special_ids = frozenset(
            i for i in range(processor.GetPieceSize()) if processor.IsControl(i) or processor.IsUnknown(i)
        )

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load()

    def get_vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def token_to_id(self, token: str) -> int:
        """The id of a piece; unknown pieces map to the ``<unk>`` id (0)."""
        return self._sp.PieceToId(token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.get_vocab_size():
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.model_path}")
        return self._sp.IdToPiece(token_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(normalize_caption(text))

    def decode(self, token_ids: Iterable[int]) -> str:
        """The text of ``token_ids``, leaving out ``<unk>``/padding and the control symbols: our
        reading, for which id 0 is padding (our decoders never generate ``<unk>``)."""
        return self._sp.DecodeIds([int(i) for i in token_ids if int(i) not in self._special_ids])

    def decode_official(self, token_ids: Iterable[int]) -> str:
        """The text of ``token_ids`` as the official VirTex tokenizer gives it: SentencePiece's
        ``DecodeIds`` of every id, which leaves out the control symbols and writes ``<unk>`` as
        " \u2047 " (U+2047 between spaces). The official captioning script reads its decoders'
        predictions this way, so a generated ``<unk>`` shows in the caption."""
        return self._sp.DecodeIds([int(i) for i in token_ids])

    def check_special_ids(self, expected: dict[str, int]) -> None:
        """Raise ``ValueError`` naming the model file if a special token's id is not ``expected``.

        Catches vocabularies built with other SentencePiece settings, whose ids would silently
        disagree with the config's ``UNK/SOS/EOS/MASK_INDEX``.
        """
        for token, token_id in expected.items():
            actual = self._sp.PieceToId(token)
            if actual != token_id or self._sp.IdToPiece(actual) != token:
                raise BadValueError(
                    f"{self.model_path}: '{token}' has id {actual}, expected {token_id}; "
                    "rebuild the vocabulary with tools/build_vocabulary.py"
                )

    def check_against_config(self, data_cfg, check_size: bool = True) -> None:
        """Raise ``ValueError`` naming the model file unless it fits a config's ``DATA`` node: the
        special ids must be ``DATA.{UNK,SOS,EOS,MASK}_INDEX`` and, with ``check_size`` (every
        model that predicts tokens), its size ``DATA.VOCAB_SIZE``."""
        self.check_special_ids(
            {"<unk>": data_cfg.UNK_INDEX, "[SOS]": data_cfg.SOS_INDEX, "[EOS]": data_cfg.EOS_INDEX,
             "[MASK]": data_cfg.MASK_INDEX}
        )
        if check_size and self.get_vocab_size() != data_cfg.VOCAB_SIZE:
            raise BadValueError(
                f"{self.model_path}: vocabulary has {self.get_vocab_size()} pieces but "
                f"DATA.VOCAB_SIZE is {data_cfg.VOCAB_SIZE}"
            )


def group_pieces(pieces: Sequence[str], punctuation_apart: bool = False) -> list[list[int]]:
    """Indices of the SentencePiece pieces that form each word ("▁dog", "s" -> one word).

    ``punctuation_apart``: a piece of punctuation only ("," or ".") is a word of its own, so
    that "dog," counts as the word "dog" and a comma; otherwise it stays with its word, as the
    caption shows it.
    """
    groups: list[list[int]] = []
    after_punctuation = False
    for index, piece in enumerate(pieces):
        text = piece.lstrip(WORD_START)
        punctuation = punctuation_apart and bool(text) and not any(ch.isalnum() for ch in text)
        if not groups or piece.startswith(WORD_START) or punctuation or after_punctuation:
            groups.append([index])
        else:
            groups[-1].append(index)
        after_punctuation = punctuation
    return groups


def first_word_index(data_cfg) -> int:
    """The smallest id of an ordinary piece for a config's ``DATA`` node: the ids below it are
    ``<unk>``/padding and the control symbols, of which ``[MASK]`` comes last."""
    return data_cfg.MASK_INDEX + 1


def strip_special(token_ids: list[int], eos_index: int, first_word_index: int) -> list[int]:
    """Token ids up to the first EOS, without padding and control symbols."""
    if eos_index in token_ids:
        token_ids = token_ids[: token_ids.index(eos_index)]
    return [t for t in token_ids if t >= first_word_index]
