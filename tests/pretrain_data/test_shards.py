"""WebDataset shards: writing them (tools/make_shards.py), reading them as a seeded, resumable,
per-reader stream, every task's dataset from them, and bad samples."""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from build_vocabulary import main as build_vocabulary_main
from make_shards import main as make_shards_main
from PIL import Image

from pretrain.config import load_config
from pretrain.data import collate_fn
from pretrain.data.shard_writer import CorpusImage, read_coco_corpus, write_shards
from pretrain.data.shards import (
    BadSample,
    ShardDataset,
    ShardError,
    StreamMeta,
    StreamPosition,
    StreamProgress,
    TooManyBadSamplesError,
    expand_shards,
    sample_captions,
)
from pretrain.distributed import seeded_rng
from pretrain.engine.sampling import SeededDataset
from pretrain.errors import BadValueError
from pretrain.tasks import build_dataset, build_model, list_tasks
from pretrain.tokenizer import train_vocabulary
from tests.tool_main import Tool

from .conftest import CAPTIONS, VOCAB_SIZE, vocabulary_corpus

TRAIN_TRANSFORMS = "['random_resized_crop', 'horizontal_flip', 'color_jitter', 'normalize']"


def coco_shards(coco_root: Path, output: Path, shard_size: int = 3) -> Path:
    """The tiny COCO train split as shards; returns the shard list file."""
    write_shards(read_coco_corpus(coco_root / "annotations" / "captions_train2017.json"), coco_root / "train2017",
                 output, shard_size)
    return output / "shards.txt"


def config(coco_root, tokenizer_path, shards, *overrides):
    return load_config(overrides=[
        "DATA.ROOT", str(coco_root), "DATA.TOKENIZER_MODEL", str(tokenizer_path), "DATA.VOCAB_SIZE", str(VOCAB_SIZE),
        "DATA.IMAGE_CROP_SIZE", "32", "DATA.FORMAT", "webdataset", "DATA.SHARDS", str(shards),
        "DATA.VAL_SHARDS", str(shards), "DATA.IMAGE_TRANSFORM_TRAIN", TRAIN_TRANSFORMS, *overrides,
    ])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def ids(items) -> list[int]:
    return [int(sample["image_id"]) for sample, _ in items]


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A shard with exactly ``samples`` (webdataset's writer, raw bytes)."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def jpeg(seed: int = 0, size=(12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


# --- writing shards -------------------------------------------------------------------------------

def test_make_shards_from_coco_is_deterministic_and_keeps_every_caption(coco_root, tmp_path):
    first = coco_shards(coco_root, tmp_path / "a")
    second = coco_shards(coco_root, tmp_path / "b")
    names = first.read_text().split()
    assert names == ["00000.tar", "00001.tar"] and second.read_text().split() == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "00000.tar") as tar:
        members = tar.getnames()
        assert members[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"] and len(members) == 9
        txt = tar.extractfile("000000000.txt").read().decode()
        meta = json.loads(tar.extractfile("000000000.json").read())
        image = tar.extractfile("000000000.jpg").read()
    image_id, _, _, captions = CAPTIONS["train"][0]
    assert txt.splitlines() == captions and meta["captions"] == captions and meta["image_id"] == image_id
    assert image == (coco_root / "train2017" / f"{image_id:012d}.jpg").read_bytes()  # the file's own bytes


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_make_shards_tool_reads_tables_groups_captions_and_reports_what_it_left_out(tmp_path, capsys, suffix):
    images = tmp_path / "images"
    images.mkdir()
    for name, seed in (("a.jpg", 1), ("b.jpg", 2)):
        (images / name).write_bytes(jpeg(seed))
    Image.new("RGB", (9, 9), (10, 200, 30)).save(images / "c.bmp")  # re-encoded as PNG
    (images / "broken.jpg").write_bytes(jpeg(3)[:40])  # truncated
    rows = [("a.jpg", "A first caption."), ("a.jpg", "A second caption."), ("b.jpg", "Only one."),
            ("missing.jpg", "Gone."), ("broken.jpg", "Truncated."), ("b.jpg", ""), ("c.bmp", "A green square.")]
    table = tmp_path / f"captions{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}), table)
    else:
        # The CSV as Excel's "CSV UTF-8" writes it, with a byte-order mark before "image".
        with open(table, "w", newline="", encoding="utf-8-sig" if suffix == ".csv" else "utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
    output = tmp_path / "shards"
    assert make_shards_main(["--captions-csv", str(table), "--image-root", str(images), "--output", str(output),
                             "--shard-size", "2"]) == 0
    err = capsys.readouterr().err
    assert f"left out {images / 'missing.jpg'}: image file not found" in err
    assert f"left out {images / 'broken.jpg'}: cannot read image" in err
    assert "empty caption for b.jpg" in err
    assert "shards: 100%" in err and "5/5" in err  # a progress bar over the images (COCO's 118K take a while)
    samples = [raw for _, raw in ShardDataset(expand_shards(str(output / "shards.txt")), None, 0).raw_samples()]
    assert [raw["txt"].decode().splitlines() for raw in samples] == [
        ["A first caption.", "A second caption."], ["Only one."], ["A green square."]]
    assert "png" in samples[2] and Image.open(io.BytesIO(samples[2]["png"])).getpixel((4, 4)) == (10, 200, 30)
    report = json.loads((output / "make_shards.json").read_text())
    assert report["samples"] == 3 and report["shards"] == ["00000.tar", "00001.tar"] and len(report["left_out"]) == 3


def test_make_shards_tool_rejects_bad_input_in_one_line(tmp_path, capsys):
    table = tmp_path / "captions.csv"
    table.write_text("file,text\na.jpg,hello\n")
    code = Tool("make_shards").main(["--captions-csv", str(table), "--image-root", str(tmp_path), "--output",
                                     str(tmp_path / "o")])  # through run_tool, as on the command line
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"make_shards: error: {table}: needs columns image, caption; missing image, caption" in err
    table.write_bytes("image,caption\na.jpg,un caf\u00e9\n".encode("cp1252"))  # a Windows code page
    code = Tool("make_shards").main(["--captions-csv", str(table), "--image-root", str(tmp_path), "--output",
                                     str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"make_shards: error: {table}: not UTF-8 text (it has the byte 0xe9); save the table as UTF-8" in err


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_a_caption_opening_a_quote_it_does_not_close_is_refused_not_merged_with_the_rows_after_it(tmp_path, capsys, suffix):
    """Scraped captions often start with a quote (the csv module then read on across separators
    and lines to the next quote: rows merged into one caption, their images silently lost)."""
    sep = "\t" if suffix == ".tsv" else ","
    table = tmp_path / f"captions{suffix}"
    run = ["--captions-csv", str(table), "--image-root", str(tmp_path), "--output", str(tmp_path / "o")]
    table.write_text(f'image{sep}caption\na.jpg{sep}"Tiny" house by a lake\n')
    assert Tool("make_shards").main(run) == 2
    assert f"make_shards: error: {table}: line 2: malformed quoting" in capsys.readouterr().err
    table.write_text(f'image{sep}caption\na.jpg{sep}fine\nb.jpg{sep}"never closed\nc.jpg{sep}a cat\nd.jpg{sep}a 5"\n')
    assert Tool("make_shards").main(run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{table}: line 3: a quoted field runs over lines 3-5 and swallows their rows" in err
    # Quoting as pandas and Excel write it still reads, a quoted caption over two lines included.
    table.write_text(f'image{sep}caption\na.jpg{sep}"a ""tiny"" house"\nb.jpg{sep}"two\nlines"\n')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    assert Tool("make_shards").main(run) == 0
    samples = [raw for _, raw in ShardDataset(expand_shards(str(tmp_path / "o" / "shards.txt")), None, 0).raw_samples()]
    assert [raw["txt"].decode() for raw in samples] == ['a "tiny" house', "two lines"]


def test_a_parquet_table_holding_the_images_themselves_is_named_not_blamed_on_the_image_root(tmp_path, capsys):
    """Hugging Face ``datasets`` save an image column as ``{bytes, path}``: every row was "no
    image" and the one line said "none of the images could be read" of --image-root."""
    table = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"image": [{"bytes": jpeg(1), "path": "a.jpg"}], "caption": ["A cat."]}), table)
    code = Tool("make_shards").main(["--captions-csv", str(table), "--image-root", str(tmp_path), "--output",
                                     str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"make_shards: error: {table}: column image holds struct<bytes: binary, path: string>, not file paths" in err


def test_make_shards_refuses_to_overwrite_shards(coco_root, tmp_path):
    coco_shards(coco_root, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds shards .pass --force"):
        coco_shards(coco_root, tmp_path / "out")


def test_a_forced_run_that_stops_leaves_no_listing_of_the_shards_it_removed(coco_root, tmp_path):
    """--force removed the old shards but kept shards.txt and make_shards.json until the new run
    ended: a run that stopped left a listing of shards that were gone (or rewritten)."""
    coco_shards(coco_root, tmp_path / "out")
    with pytest.raises(BadValueError, match="none of the images could be read"):
        write_shards([CorpusImage("missing.jpg", ("A cat.",))], coco_root / "train2017", tmp_path / "out", 3, force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# --- the shard list --------------------------------------------------------------------------------

def test_shard_specs_expand_and_missing_shards_are_named(coco_root, tmp_path):
    listing = coco_shards(coco_root, tmp_path / "out")
    expected = [str(tmp_path / "out" / "00000.tar"), str(tmp_path / "out" / "00001.tar")]
    assert expand_shards(str(listing)) == expected
    assert expand_shards(str(tmp_path / "out" / "{00000..00001}.tar")) == expected
    with pytest.raises(ShardError, match=r"00002.tar: shard not found \(1 of the 3 shards of DATA.SHARDS"):
        expand_shards(str(tmp_path / "out" / "{00000..00002}.tar"))
    with pytest.raises(ShardError, match="DATA.VAL_SHARDS is empty"):
        expand_shards("", "DATA.VAL_SHARDS")
    assert expand_shards("pipe:cat a.tar::https://host/{0..1}.tar") == ["pipe:cat a.tar", "https://host/0.tar",
                                                                        "https://host/1.tar"]


# --- the same sample through both readers ----------------------------------------------------------

@pytest.mark.parametrize("name", ["bicaptioning", "masked_lm"])
def test_one_sample_gives_identical_tensors_through_the_coco_and_the_shard_path(
    coco_root, tokenizer_path, tokenizer, tmp_path, name
):
    """Same image bytes, same captions, same seed: equal tensors, key by key (exact equality).
    The seed matters (another one gives another crop), so the equality is not vacuous."""
    shards = coco_shards(coco_root, tmp_path / "shards", shard_size=4)
    cfg = config(coco_root, tokenizer_path, shards, "MODEL.NAME", name)
    from_shards = build_dataset(cfg, "train", tokenizer)
    coco = SeededDataset(build_dataset(config(coco_root, tokenizer_path, shards, "MODEL.NAME", name,
                                              "DATA.FORMAT", "coco"), "train", tokenizer))
    assert isinstance(from_shards, ShardDataset)
    raws = [raw for _, raw in from_shards.raw_samples()]
    for index, raw in enumerate(raws):
        for seed in (3, 12345):
            ours, theirs = from_shards.decode(raw, seed), coco[(seed, index)]
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert torch.equal(ours[key], theirs[key]), (index, seed, key)
    assert not torch.equal(from_shards.decode(raws[0], 3)["image"], from_shards.decode(raws[0], 4)["image"])


# --- every task --------------------------------------------------------------------------------------

LINEAR_HEAD_TASKS = {"token_classification", "multilabel_classification"}


def labelled_shard(path: Path) -> Path:
    """Two samples whose .json lists multi-label classes (as DATA.FORMAT webdataset expects)."""
    return write_tar(path, [
        {"__key__": "0", "jpg": jpeg(0), "json": json.dumps({"captions": ["a dog"], "labels": [0, 2]}).encode()},
        {"__key__": "1", "jpg": jpeg(1), "json": json.dumps({"captions": ["a cat"], "labels": [1]}).encode()},
    ])


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_trains_one_batch_from_shards(coco_root, tokenizer_path, tokenizer, tmp_path, name):
    overrides = ["MODEL.NAME", name, "MODEL.VISUAL.NAME", "torchvision::resnet18", "MODEL.VISUAL.FEATURE_SIZE", "512",
                 "MODEL.TEXTUAL.NAME", "none" if name in LINEAR_HEAD_TASKS else "transdec_postnorm::L1_H64_A2_F128"]
    shards = coco_shards(coco_root, tmp_path / "shards")
    if name == "multilabel_classification":
        shards = labelled_shard(tmp_path / "labelled.tar")
        overrides += ["DATA.VOCAB_SIZE", "4", "DATA.CAPTION_FIELD", "json:captions"]
    if name == "cappa_bicaptioning":
        overrides += ["MODEL.CAPPA.PARALLEL_FRACTION", "0.5"]
    cfg = config(coco_root, tokenizer_path, shards, *overrides)
    dataset = build_dataset(cfg, "train", tokenizer)
    assert isinstance(dataset, ShardDataset)
    batch = collate_fn([sample for sample, _ in take(iter(dataset), 2)])
    if name == "multilabel_classification":
        assert batch["labels"].tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]] or batch["labels"].tolist() == [[0, 1, 0, 0], [1, 0, 1, 0]]
    torch.manual_seed(0)
    loss = build_model(cfg)(batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_multilabel_samples_without_labels_are_bad_samples(coco_root, tokenizer_path, tokenizer, tmp_path):
    cfg = config(coco_root, tokenizer_path, coco_shards(coco_root, tmp_path / "shards"),
                 "MODEL.NAME", "multilabel_classification", "DATA.VOCAB_SIZE", "4")
    with pytest.raises(TooManyBadSamplesError, match="no usable sample in a whole epoch"):
        next(iter(build_dataset(cfg, "train", tokenizer)))


def test_captions_from_a_json_field_one_drawn_per_visit(coco_root, tokenizer_path, tokenizer, tmp_path):
    shard = write_tar(tmp_path / "0.tar", [
        {"__key__": "k", "jpg": jpeg(0), "json": json.dumps({"alt": ["on the left", "a bench"]}).encode()}])
    cfg = config(coco_root, tokenizer_path, shard, "DATA.CAPTION_FIELD", "json:alt")
    dataset = build_dataset(cfg, "train", tokenizer)
    tokens = {tuple(s["caption_tokens"].tolist()) for s, _ in take(iter(dataset), 40)}
    # Both captions, and the flip's mirror of the first: "on the right".
    expected = {(1, *tokenizer.encode(c), 2) for c in ("on the left", "on the right", "a bench")}
    assert tokens == expected


# --- order, seeds, positions ---------------------------------------------------------------------------

def test_each_epoch_is_a_seeded_shuffle_of_every_sample(coco_root, tokenizer_path, tokenizer, tmp_path):
    shards = coco_shards(coco_root, tmp_path / "shards", shard_size=1)
    cfg = config(coco_root, tokenizer_path, shards)
    items = take(iter(build_dataset(cfg, "train", tokenizer)), 40)
    epochs = [sorted(ids(items[i : i + 4])) for i in range(0, 40, 4)]
    assert all(epoch == [9, 25, 30, 42] for epoch in epochs)
    assert [meta.position.epoch for _, meta in items] == [e for e in range(10) for _ in range(4)]
    orders = {tuple(ids(items[i : i + 4])) for i in range(0, 40, 4)}
    assert len(orders) > 3  # the epochs are shuffled differently
    again = take(iter(build_dataset(cfg, "train", tokenizer)), 40)
    other = take(iter(build_dataset(config(coco_root, tokenizer_path, shards, "RANDOM_SEED", "1"), "train", tokenizer)), 40)
    assert ids(again) == ids(items) and ids(other) != ids(items)
    for (a, _), (b, _) in zip(again, items):
        assert torch.equal(a["image"], b["image"])


def test_a_reader_resumes_right_after_its_last_consumed_sample(coco_root, tokenizer_path, tokenizer, tmp_path):
    """Resuming from any position gives exactly the rest of the uninterrupted stream, tensors too."""
    shards = coco_shards(coco_root, tmp_path / "shards", shard_size=3)
    dataset = build_dataset(config(coco_root, tokenizer_path, shards, "DATA.SHUFFLE_BUFFER", "3"), "train", tokenizer)
    reference = take(dataset.read(0, 1), 14)
    for cut in (0, 2, 3, 6, 9):
        resumed = take(dataset.read(0, 1, reference[cut][1].position), 13 - cut)
        assert ids(resumed) == ids(reference[cut + 1 :])
        for (a, _), (b, _) in zip(resumed, reference[cut + 1 :]):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["caption_tokens"], b["caption_tokens"])


def test_readers_split_each_epoch_into_disjoint_shards(coco_root, tokenizer_path, tokenizer, tmp_path):
    shards = coco_shards(coco_root, tmp_path / "shards", shard_size=1)  # 4 shards
    dataset = build_dataset(config(coco_root, tokenizer_path, shards), "train", tokenizer)
    per_reader = [take(dataset.read(r, 3), 6) for r in range(3)]  # 4 shards over 3 readers: 2, 1, 1
    for epoch in range(2):
        seen = [i for items in per_reader for i in ids([x for x in items if x[1].position.epoch == epoch])]
        assert sorted(seen) == [9, 25, 30, 42]
    with pytest.raises(ShardError, match="4 shard.s. for 5 readers"):
        next(dataset.read(0, 5))


# --- bad samples -------------------------------------------------------------------------------------------

def test_bad_samples_are_skipped_logged_and_carried_with_the_next_sample(coco_root, tokenizer_path, tokenizer, tmp_path, caplog):
    shard = write_tar(tmp_path / "bad.tar", [
        {"__key__": "a", "jpg": jpeg(0), "txt": b"good one"},
        {"__key__": "b", "jpg": jpeg(1)[:50], "txt": b"truncated image"},
        {"__key__": "c", "jpg": jpeg(2), "txt": b"  \n "},
        {"__key__": "d", "txt": b"no image"},
        {"__key__": "e", "jpg": jpeg(3), "txt": b"good two"},
    ])
    dataset = build_dataset(config(coco_root, tokenizer_path, shard, "DATA.SHUFFLE_BUFFER", "1"), "train", tokenizer)
    with caplog.at_level(logging.WARNING, logger="pretrain.data.shards"):
        (_, first), (_, second) = take(iter(dataset), 2)
    assert first.bad == ()
    assert [(b.shard, b.key) for b in second.bad] == [(str(shard), "b"), (str(shard), "c"), (str(shard), "d")]
    reasons = [b.reason for b in second.bad]
    assert reasons[0].startswith("unreadable image") and reasons[1] == "empty caption" and reasons[2].startswith("no image")
    assert f"skipping bad sample {shard} b: unreadable image" in caplog.text
    progress = StreamProgress(0.75)
    progress.update([first, second])
    assert (progress.read, progress.num_bad) == (5, 3)
    with pytest.raises(TooManyBadSamplesError, match=rf"3 of the 5 samples read on this rank were bad, more than "
                                                      rf"DATA.MAX_BAD_FRACTION 0.5: {shard} b: unreadable image"):
        StreamProgress(0.5).update([first, second])


def test_the_bad_fraction_is_judged_only_after_enough_samples():
    def meta(bad=()):
        return StreamMeta(0, StreamPosition.start_of(0), bad)

    progress = StreamProgress(0.1)
    progress.update([meta((BadSample("s.tar", "k", "empty caption"),))])  # 1 of 2: judged from the 10th sample on
    progress.update([meta() for _ in range(7)])  # 1 of 9
    progress.update([meta()])  # 1 of 10: not more than 10 %
    with pytest.raises(TooManyBadSamplesError, match="2 of the 12 samples"):
        progress.update([meta((BadSample("s.tar", "k2", "empty caption"),))])  # 2 of 12
    strict = StreamProgress(0.0)
    with pytest.raises(TooManyBadSamplesError, match="1 of the 2 samples"):
        strict.update([meta((BadSample("s.tar", "k", "empty caption"),))])


def test_a_shard_that_is_no_tar_is_named_and_a_reader_with_nothing_else_stops(coco_root, tokenizer_path, tokenizer, tmp_path):
    shard = tmp_path / "0.tar"
    shard.write_bytes(b"this is not a tar file" * 100)
    dataset = build_dataset(config(coco_root, tokenizer_path, shard), "train", tokenizer)
    with pytest.raises(TooManyBadSamplesError, match=f"no usable sample in a whole epoch of reader 0's shards .{shard}.; "
                                                     f"unreadable: {shard}: unreadable from byte 0 .member 0. on"):
        next(iter(dataset))


def test_shards_made_by_other_tools_say_why_they_give_no_caption(coco_root, tokenizer_path, tokenizer, tmp_path):
    # Keys with a dot (webdataset ends a key at the first one: the shard is one sample whose
    # members are "000001.txt", ...), and captions in the .json with the default DATA.CAPTION_FIELD.
    dotted = write_tar(tmp_path / "dotted.tar", [{"__key__": f"00000.00000{i}", "jpg": jpeg(i), "txt": b"a dog"}
                                                 for i in range(3)])
    in_json = write_tar(tmp_path / "json.tar", [{"__key__": f"k{i}", "jpg": jpeg(i),
                                                 "json": json.dumps({"caption": "a dog"}).encode()} for i in range(3)])
    for shard, reason in ((dotted, "the member '00000.000000.txt' has the extension '000000.txt'"),
                          (in_json, "no .txt caption, but its .json has one: set DATA.CAPTION_FIELD json:caption")):
        with pytest.raises(TooManyBadSamplesError, match=re.escape(reason)):
            next(iter(build_dataset(config(coco_root, tokenizer_path, shard), "train", tokenizer)))
        with pytest.raises(ShardError, match=f"no caption in any of the .* samples of 1 shards .the first: {shard} "
                                             f".*{re.escape(reason)}"):
            sample_captions([str(shard)])  # what tools/build_vocabulary.py --shards reads


def test_a_shard_list_saved_with_a_byte_order_mark_is_read(tmp_path):
    write_tar(tmp_path / "0.tar", [{"__key__": "a", "jpg": jpeg(0), "txt": b"a dog"}])
    write_tar(tmp_path / "1.tar", [{"__key__": "b", "jpg": jpeg(1), "txt": b"a cat"}])
    listing = tmp_path / "shards.txt"
    listing.write_text("\ufeff0.tar\n1.tar\n", encoding="utf-8")  # Notepad's "UTF-8 with BOM"
    assert expand_shards(str(listing)) == [str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]


def test_seeded_rng_restores_the_callers_state():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with seeded_rng(7):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_rng(7):
        assert torch.equal(torch.rand(3), inside)


# --- a vocabulary from shards ------------------------------------------------------------------------------

def test_build_vocabulary_learns_from_captions_sampled_from_shards(tmp_path):
    """All captions of 60 images in 6 shards: the same vocabulary as from the captions in table
    order; with --max-captions a seeded sample that follows whole shards."""
    images = tmp_path / "images"
    images.mkdir()
    corpus = vocabulary_corpus()
    rows = [(f"{i % 60}.png", caption) for i, caption in enumerate(corpus)]
    for i in range(60):
        Image.new("RGB", (4, 4), (i, i, i)).save(images / f"{i}.png")
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "caption"), *sorted(rows)])
    assert make_shards_main(["--captions-csv", str(table), "--image-root", str(images), "--output",
                             str(tmp_path / "shards"), "--shard-size", "10"]) == 0
    shards = expand_shards(str(tmp_path / "shards" / "shards.txt"))
    captions, skipped = sample_captions(shards)
    assert Counter(captions) == Counter(corpus) and skipped == 0
    first, _ = sample_captions(shards, max_captions=100, seed=0)
    assert len(first) == 100 and first == sample_captions(shards, max_captions=100, seed=0)[0]
    assert first != sample_captions(shards, max_captions=100, seed=1)[0]
    assert build_vocabulary_main(["--shards", str(tmp_path / "shards" / "{00000..00005}.tar"), "--output",
                                  str(tmp_path / "from_shards"), "--vocab-size", str(VOCAB_SIZE)]) == 0
    reference = train_vocabulary(corpus, tmp_path / "from_table", vocab_size=VOCAB_SIZE)
    assert (tmp_path / "from_shards.vocab").read_text() == reference.with_suffix(".vocab").read_text()
    with pytest.raises(ValueError, match="must be 'txt' or 'json:FIELD', got 'caption'"):
        sample_captions(shards, caption_field="caption")
