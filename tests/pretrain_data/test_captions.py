"""COCO Captions dataset: samples, caption sampling, image modes, bad files, batching."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pretrain.data import (
    BadImageError,
    CocoCaptionsDataset,
    collate_fn,
    list_image_files,
    load_rgb_image,
    make_transform,
    read_caption_records,
)
from pretrain.data.dataset_root import DatasetLayoutError

from .conftest import CAPTIONS

VAL_NAMES = ["smallest_resize", "center_crop", "normalize"]
TRAIN_NAMES = ["random_resized_crop", "horizontal_flip", "color_jitter", "normalize"]


def make_dataset(root, tokenizer, split="train", names=VAL_NAMES, **kwargs) -> CocoCaptionsDataset:
    return CocoCaptionsDataset(root, split, tokenizer, make_transform(names, 16), **kwargs)


def test_one_record_per_image_sorted_by_id(coco_root):
    records = read_caption_records(coco_root / "annotations" / "captions_train2017.json")
    assert [r.image_id for r in records] == [9, 25, 30, 42]
    assert records[0].file_name == "000000000009.jpg"
    assert records[0].captions == tuple(CAPTIONS["train"][0][3])


def test_sample_keys_types_and_token_layout(coco_root, tokenizer):
    dataset = make_dataset(coco_root, tokenizer)
    assert len(dataset) == 4
    sample = dataset[2]  # image 30 has a single caption
    assert set(sample) == {"image_id", "image", "caption_tokens", "noitpac_tokens", "caption_lengths"}
    assert sample["image_id"].dtype == torch.long and sample["image_id"].item() == 30
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 16, 16)
    tokens = sample["caption_tokens"]
    assert tokens.dtype == torch.long and sample["caption_lengths"].dtype == torch.long
    assert tokens.tolist() == [1, *tokenizer.encode("A bright kitchen counter with a pizza."), 2]
    assert sample["caption_lengths"].item() == len(tokens)
    assert sample["noitpac_tokens"].tolist() == tokens.tolist()[::-1]
    assert tokenizer.decode(tokens.tolist()) == "a bright kitchen counter with a pizza."


def test_truncation_happens_after_adding_sos_and_eos(coco_root, tokenizer):
    dataset = make_dataset(coco_root, tokenizer, max_caption_length=5)
    sample = dataset[2]
    full = [1, *tokenizer.encode("A bright kitchen counter with a pizza."), 2]
    assert len(full) > 5
    assert sample["caption_tokens"].tolist() == full[:5]  # [SOS] + 4 pieces, no [EOS]
    assert sample["noitpac_tokens"].tolist() == full[:5][::-1]  # starts with a word, ends with [SOS]
    assert sample["caption_lengths"].item() == 5


def test_each_visit_draws_one_caption_uniformly(coco_root, tokenizer):
    dataset = make_dataset(coco_root, tokenizer)
    torch.manual_seed(0)
    counts = {}
    for _ in range(300):
        text = tokenizer.decode(dataset[0]["caption_tokens"].tolist())
        counts[text] = counts.get(text, 0) + 1
    expected = {c.lower() for c in CAPTIONS["train"][0][3]}
    assert set(counts) == expected
    assert all(70 < n < 130 for n in counts.values())  # 100 expected each; ~4 standard deviations


def test_train_samples_are_reproducible_from_the_seed(coco_root, tokenizer):
    dataset = make_dataset(coco_root, tokenizer, names=TRAIN_NAMES)
    torch.manual_seed(7)
    first = [dataset[i] for i in range(4)]
    torch.manual_seed(7)
    second = [dataset[i] for i in range(4)]
    for a, b in zip(first, second):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_collate_pads_to_the_longest_caption(coco_root, tokenizer):
    dataset = make_dataset(coco_root, tokenizer)
    samples = [dataset[i] for i in range(4)]
    batch = collate_fn(samples)
    lengths = [s["caption_lengths"].item() for s in samples]
    assert batch["caption_tokens"].shape == (4, max(lengths))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image_id"].tolist() == [9, 25, 30, 42]
    assert batch["caption_lengths"].tolist() == lengths
    for row, sample in enumerate(samples):
        n = lengths[row]
        assert batch["caption_tokens"][row, :n].tolist() == sample["caption_tokens"].tolist()
        assert batch["noitpac_tokens"][row, :n].tolist() == sample["noitpac_tokens"].tolist()
        assert batch["caption_tokens"][row, n:].eq(0).all() and batch["noitpac_tokens"][row, n:].eq(0).all()
        assert batch["noitpac_tokens"][row, n - 1].item() == 1  # reversed before padding: ends with [SOS]


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "P+transparency", "RGBA", "LA", "I;16"])
def test_image_modes_are_read_as_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("image.jpg" if mode in ("L", "CMYK") else "image.png")
    image.save(path)
    loaded = load_rgb_image(path)
    assert loaded.mode == "RGB" and loaded.size == (10, 12)
    if mode in ("RGBA", "P", "P+transparency"):  # colour modes: the colours survive (alpha dropped)
        expected = rgb if mode == "RGBA" else image.convert("RGBA").convert("RGB")
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))


def test_images_are_read_upright_and_16_bit_ones_scaled_as_opencv_reads_them(tmp_path):
    upright = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    # A phone photo: stored rotated, with EXIF orientation 6 ("rotate 90 degrees clockwise to view").
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    loaded = load_rgb_image(tmp_path / "phone.png")
    assert loaded.size == (10, 12)
    np.testing.assert_array_equal(np.asarray(loaded), upright)
    # 16-bit greyscale keeps its contrast: the high byte, not everything above 255 clipped to white.
    deep = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    loaded = np.asarray(load_rgb_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(loaded, np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_dataset_reads_greyscale_and_cmyk_jpegs(coco_root, tokenizer):
    folder = coco_root / "train2017"
    Image.open(folder / "000000000009.jpg").convert("L").save(folder / "000000000009.jpg")
    Image.open(folder / "000000000025.jpg").convert("CMYK").save(folder / "000000000025.jpg")
    dataset = make_dataset(coco_root, tokenizer)
    assert dataset[0]["image"].shape == dataset[1]["image"].shape == (3, 16, 16)


def damage(coco_root, image_id=25, how="truncate"):
    path = coco_root / "train2017" / f"{image_id:012d}.jpg"
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "garbage":
        path.write_bytes(b"this is not an image")
    else:
        path.unlink()
    return path


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_image_raises_naming_the_file(coco_root, tokenizer, how):
    path = damage(coco_root, how=how)
    dataset = make_dataset(coco_root, tokenizer)
    with pytest.raises(BadImageError, match=f"{path}: cannot read image"):
        dataset[1]
    with pytest.raises(BadImageError, match="image file not found"):
        load_rgb_image(coco_root / "nothing.jpg")


def test_corrupt_image_met_by_a_dataloader_worker_keeps_its_one_line(coco_root, tokenizer):
    path = damage(coco_root, how="truncate")
    loader = DataLoader(make_dataset(coco_root, tokenizer), batch_size=2, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(BadImageError) as caught:
        list(loader)
    assert "Original Traceback" in str(caught.value)  # torch's wrapping, which the tools must not print
    headline = caught.value.headline  # the line a tool prints
    assert "\n" not in headline and headline.startswith(f"{path}: cannot read image (")
    assert "set DATA.SKIP_BAD_IMAGES True" in headline


def test_missing_image_is_found_when_the_dataset_is_built(coco_root, tokenizer):
    path = damage(coco_root, how="delete")
    with pytest.raises(BadImageError, match=f"{path}: image file not found .*1 of 4 images"):
        make_dataset(coco_root, tokenizer)


def test_skip_bad_images_skips_counts_and_logs(coco_root, tokenizer, caplog):
    missing = damage(coco_root, image_id=9, how="delete")
    corrupt = damage(coco_root, image_id=30, how="garbage")
    with caplog.at_level(logging.WARNING, logger="pretrain.data.captions"):
        dataset = make_dataset(coco_root, tokenizer, skip_bad_images=True)
        assert len(dataset) == 3 and dataset.num_skipped == 1
        assert str(missing) in caplog.text
        assert [dataset[i]["image_id"].item() for i in range(3)] == [25, 42, 42]  # 30 is replaced by the next
        assert dataset.num_skipped == 2
        assert str(corrupt) in caplog.text


def test_skip_counter_sees_dataloader_workers(coco_root, tokenizer):
    damage(coco_root, image_id=30, how="garbage")
    dataset = make_dataset(coco_root, tokenizer, skip_bad_images=True)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_fn)
    for _ in range(2):
        ids = [i for batch in loader for i in batch["image_id"].tolist()]
        assert ids == [9, 25, 42, 42]
    assert dataset.num_skipped == 2


def test_dataloader_workers_are_seeded_reproducibly(coco_root, tokenizer):
    dataset = make_dataset(coco_root, tokenizer, names=TRAIN_NAMES)

    def run():
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_fn)
        return [batch["image"] for batch in loader]

    first, second = run(), run()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    "content, error, message",
    [
        ('{"images": [}', DatasetLayoutError, "malformed JSON at line 1, column 13"),
        ([1, 2], DatasetLayoutError, "expected a JSON object with keys"),
        ({"images": []}, DatasetLayoutError, "expected a JSON object with keys"),
        ({"images": {}, "annotations": []}, ValueError, "'images' and 'annotations' must be lists"),
        ({"images": [{"id": "9", "file_name": "a.jpg"}], "annotations": []}, ValueError,
         r"images\[0\] needs an integer 'id'"),
        ({"images": [{"id": 9, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "caption": 3}]}, ValueError,
         r"annotations\[0\] needs an integer 'image_id' and a string 'caption'"),
        ({"images": [{"id": 9, "file_name": "a.jpg"}], "annotations": [{"image_id": 8, "caption": "x"}]}, ValueError,
         r"annotations\[0\] refers to unknown image id 8"),
    ],
)
def test_malformed_captions_json_names_the_file(coco_root, tokenizer, content, error, message):
    path = write(coco_root / "annotations" / "captions_train2017.json", content)
    with pytest.raises(error, match=f"{re.escape(str(path))}: {message}"):
        make_dataset(coco_root, tokenizer)


def test_missing_files_and_folders_are_named(coco_root, tokenizer):
    with pytest.raises(DatasetLayoutError, match="captions_test2017.json: file not found"):
        make_dataset(coco_root, tokenizer, split="test")
    (coco_root / "val2017").rename(coco_root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="val2017: image folder not found"):
        make_dataset(coco_root, tokenizer, split="val")


def test_a_machine_fault_while_reading_an_image_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """A disk error (EIO) or too many open files says nothing about the image: raised as it is
    (a traceback, status 1), while a decoder's complaint about the bytes stays BadImageError."""
    import errno

    from pretrain.data import images

    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    for number in (errno.EIO, errno.EMFILE):
        def failing_open(*args, number=number, **kwargs):
            raise OSError(number, "the machine failed")
        monkeypatch.setattr(images.Image, "open", failing_open)
        with pytest.raises(OSError) as caught:
            images.load_rgb_image(path)
        assert not isinstance(caught.value, images.BadImageError) and caught.value.errno == number
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:20])  # truncated: the file's fault
    with pytest.raises(images.BadImageError, match="x.png: cannot read image"):
        images.load_rgb_image(path)


def test_an_image_folder_leaves_out_hidden_files_and_says_what_it_did_not_read(tmp_path, caplog):
    """A folder of photos copied from a Mac to a shared drive holds ``._IMG_0001.JPG`` beside
    each photo: named as a JPEG, but no image (it stopped tools/caption.py with "cannot read
    image"). Hidden files, other files, broken links and subfolders are left out, each kind counted
    and named."""
    Image.new("RGB", (8, 8)).save(tmp_path / "IMG_0001.JPG")
    (tmp_path / "._IMG_0001.JPG").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble header
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "2023").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "2023" / "nested.png")
    (tmp_path / "moved.jpg").symlink_to(tmp_path / "gone.jpg")  # a link whose photo was moved away
    assert list_image_files(tmp_path) == [tmp_path / "IMG_0001.JPG"]
    assert (f"{tmp_path}: left out 1 hidden file (._IMG_0001.JPG), 1 file not named as an image (notes.txt), "
            "1 not a regular file (moved.jpg), 1 subfolder (2023); the files read are those directly in it") in caplog.text
    with pytest.raises(FileNotFoundError, match="IMG_0001.JPG: is a file, not a folder; give the folder that holds it"):
        list_image_files(tmp_path / "IMG_0001.JPG")


def test_images_without_a_caption_are_left_out_with_a_warning(tmp_path, caplog):
    """A user's captions file with an image nobody captioned: tools/eval_captioning.py scored the
    others without a word (the count was logged at INFO, which that tool does not show)."""
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "Ein Hund läuft über die Straße"},
                        {"id": 2, "image_id": 1, "caption": "一只狗"}],
    }, ensure_ascii=False), encoding="utf-8")
    caplog.set_level(logging.WARNING)
    records = read_caption_records(captions)
    assert [(r.file_name, r.captions) for r in records] == [("a.jpg", ("Ein Hund läuft über die Straße", "一只狗"))]
    assert f"{captions}: 1 of 2 images have no caption and are left out (e.g. b.jpg)" in caplog.text
