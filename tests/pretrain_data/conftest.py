"""Fixtures: a tiny COCO-layout dataset on disk and a small vocabulary trained on its captions."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.tokenizer import SentencePieceBPETokenizer, train_vocabulary

SUBJECTS = ["man", "woman", "dog", "cat", "girl", "boy", "child", "horse", "zebra", "giraffe", "elephant", "bird"]
VERBS = ["sitting on", "standing near", "riding", "holding", "walking past", "looking at", "eating from", "jumping over"]
OBJECTS = ["table", "bench", "skateboard", "umbrella", "pizza", "plate", "surfboard", "frisbee", "kitchen counter",
           "fence", "bicycle", "motorcycle", "truck", "train", "bowl", "sandwich"]
PLACES = ["on the left", "on the right", "in a bright room", "under the sky", "at night", "on the street",
          "in the grass", "near the water", "upright against a wall", "inside a cafe"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "pink"]

VOCAB_SIZE = 250
# Per split: (image id, width, height, captions). Ids have gaps, like COCO's.
CAPTIONS = {
    "train": [
        (9, 40, 30, ["A man riding a red skateboard on the left.", "A man on a skateboard.", "Skateboarder at night."]),
        (25, 30, 40, ["Two dogs eating from a bowl.", "Dogs near the water."]),
        (30, 36, 36, ["A bright kitchen counter with a pizza."]),
        (42, 50, 30, ["A zebra standing near a fence under the sky.", "A zebra and a fence."]),
    ],
    "val": [
        (101, 40, 30, ["A girl holding an umbrella on the right."]),
        (205, 30, 40, ["A bird on a bench.", "A small bird."]),
    ],
}
# (category id, name): three categories with gapped ids, deliberately listed out of id order.
CATEGORIES = [(18, "dog"), (1, "person"), (24, "zebra")]
# image id -> category ids of its instances (image 30 has none).
INSTANCES = {"train": {9: [1, 1], 25: [18, 18, 18], 42: [24, 1]}, "val": {101: [1], 205: [18]}}


def vocabulary_corpus() -> list[str]:
    """Varied captions (~1900) with enough distinct words for a 250-piece BPE vocabulary."""
    out = []
    for i, (s, v, o, p) in enumerate(itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES)):
        if i % 7 == 0:
            out.append(f"A {COLOURS[i % len(COLOURS)]} {s} {v} a {o} {p}.")
    return out


def write_captions_json(path: Path, entries) -> None:
    images = [{"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h}
              for image_id, w, h, _ in entries]
    annotations = [{"id": 1000 * image_id + k, "image_id": image_id, "caption": caption}
                   for image_id, _, _, captions in entries for k, caption in enumerate(captions)]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))


def write_coco_root(root: Path) -> Path:
    """Write the tiny dataset under ``root`` (COCO 2017 layout) and return ``root``."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    for split, entries in CAPTIONS.items():
        (root / f"{split}2017").mkdir()
        for image_id, w, h, _ in entries:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{split}2017" / f"{image_id:012d}.jpg", quality=90)
        write_captions_json(root / "annotations" / f"captions_{split}2017.json", entries)
        instances = {
            "images": [{"id": image_id, "file_name": f"{image_id:012d}.jpg"} for image_id, *_ in entries],
            "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES],
            "annotations": [{"id": 100 * image_id + k, "image_id": image_id, "category_id": cid}
                            for image_id, cids in INSTANCES[split].items() for k, cid in enumerate(cids)],
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))
    return root


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 250-piece vocabulary trained once per session on :func:`vocabulary_corpus`."""
    return train_vocabulary(vocabulary_corpus(), tmp_path_factory.mktemp("vocab") / "tiny", vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> SentencePieceBPETokenizer:
    return SentencePieceBPETokenizer(tokenizer_path)


@pytest.fixture
def coco_root(tmp_path) -> Path:
    """A fresh tiny dataset per test, so tests may damage their copy."""
    return write_coco_root(tmp_path / "coco")
