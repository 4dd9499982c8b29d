"""COCO Captions for pretraining: one sample per image, with a caption drawn at every visit.

Layout under ``DATA.ROOT`` (the official one): ``annotations/captions_{split}2017.json`` and
the images in ``{split}2017/``. An epoch is one pass over the images (~118K for train2017),
and each visit picks one of the image's ~5 captions uniformly at random, as the official
dataset does.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from pretrain.data.dataset_root import load_json
from pretrain.data.images import BadImageError, load_rgb_image
from pretrain.data.packed import PackedList
from pretrain.errors import BadValueError, MissingInputError
from pretrain.tokenizer import SentencePieceBPETokenizer

logger = logging.getLogger(__name__)

CaptionTransform = Callable[[Image.Image, str], tuple[torch.Tensor, str]]

_MAX_CONSECUTIVE_SKIPS = 16  # more bad images in a row than this means a broken dataset, not bad luck
_SKIP_COUNTER_SLOTS = 1024  # one per process (main + workers), so increments never race


def require(path: str | os.PathLike, condition: bool, where: str, problem: str) -> None:
    """Raise ``ValueError("{path}: {where} {problem}")`` unless ``condition`` holds."""
    if not condition:
        raise BadValueError(f"{path}: {where} {problem}")


@dataclass(frozen=True)
class ImageRecord:
    """One image: its COCO id, file name relative to the split's image folder, its captions."""

    image_id: int
    file_name: str
    captions: tuple[str, ...]


def read_caption_records(captions_json: str | os.PathLike) -> list[ImageRecord]:
    """The captioned images of a COCO captions file, sorted by image id.

    Raises :class:`~pretrain.data.dataset_root.DatasetLayoutError` for a missing or non-JSON
    file and :class:`~pretrain.errors.BadValueError` for a malformed entry, an image id listed twice (which of the two
    files its captions describe is unknown), an empty caption (it would train ``[SOS] [EOS]``) or
    a caption of an image the file does not list; both name the file. Images without any caption
    cannot be trained on or scored; they are left out with a warning counting them.
    """
    data = load_json(captions_json)
    lists = isinstance(data["images"], list) and isinstance(data["annotations"], list)
    require(captions_json, lists, "'images' and 'annotations'", "must be lists")
    file_names: dict[int, str] = {}
    listed_at: dict[int, int] = {}
    for i, image in enumerate(data["images"]):
        ok = isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str)
        require(captions_json, ok, f"images[{i}]", "needs an integer 'id' and a string 'file_name'")
        require(captions_json, image["id"] not in listed_at, f"images[{i}]",
                f"repeats the id {image['id']} of images[{listed_at.get(image['id'])}]; give each image its own id")
        file_names[image["id"]], listed_at[image["id"]] = image["file_name"], i
    captions: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        ok = isinstance(ann, dict) and isinstance(ann.get("image_id"), int) and isinstance(ann.get("caption"), str)
        require(captions_json, ok, f"annotations[{i}]", "needs an integer 'image_id' and a string 'caption'")
        require(captions_json, ann["image_id"] in file_names, f"annotations[{i}]", f"refers to unknown image id {ann['image_id']}")
        require(captions_json, bool(ann["caption"].strip()), f"annotations[{i}]",
                "has an empty caption; write the caption or remove the annotation")
        captions[ann["image_id"]].append(ann["caption"])
    if len(captions) < len(file_names):  # a warning: tools that log no INFO (eval_captioning) must still say it
        uncaptioned = [name for image_id, name in file_names.items() if image_id not in captions]
        logger.warning("%s: %d of %d images have no caption and are left out (e.g. %s)", captions_json,
                       len(uncaptioned), len(file_names), uncaptioned[0])
    return [ImageRecord(image_id, file_names[image_id], tuple(captions[image_id])) for image_id in sorted(captions)]


class CaptionSamples:
    """From an image record and its decoded RGB image to the sample dict of the caption tasks.

    Draws one of the record's captions with torch's global RNG, runs the caption-aware
    ``transform`` and tokenizes. The COCO folder reader (:class:`CocoCaptionsDataset`) and the
    shard reader (:mod:`pretrain.data.shards`) share one such object, so the same image, captions
    and RNG seed give identical tensors through both. Subclasses change :meth:`make_sample`.
    """

    def __init__(self, tokenizer: SentencePieceBPETokenizer, transform: CaptionTransform, max_caption_length: int = 30):
        self.tokenizer = tokenizer
        self.transform = transform
        self.max_caption_length = max_caption_length
        self.sos_id = tokenizer.token_to_id("[SOS]")
        self.eos_id = tokenizer.token_to_id("[EOS]")

    def __call__(self, record: ImageRecord, image: Image.Image) -> dict[str, Any]:
        caption = record.captions[int(torch.randint(len(record.captions), ()))]
        image, caption = self.transform(image, caption)
        return self.make_sample(record, image, self.tokenize(caption))

    def tokenize(self, caption: str) -> list[int]:
        """``[SOS] caption [EOS]`` cut to ``max_caption_length``."""
        tokens = [self.sos_id, *self.tokenizer.encode(caption), self.eos_id]
        return tokens[: self.max_caption_length]

    def make_sample(self, record: ImageRecord, image: torch.Tensor, tokens: list[int]) -> dict[str, Any]:
        """The keys listed in :class:`CocoCaptionsDataset`."""
        caption_tokens = torch.tensor(tokens, dtype=torch.long)
        return {
            "image_id": torch.tensor(record.image_id, dtype=torch.long),
            "image": image,
            "caption_tokens": caption_tokens,
            "noitpac_tokens": caption_tokens.flip(0),
            "caption_lengths": torch.tensor(len(tokens), dtype=torch.long),
        }


class CocoCaptionsDataset(Dataset):
    """Image-caption samples for (bi)captioning and token classification.

    A sample is a dict with exactly these keys:

    * ``image_id``: long scalar, the COCO image id;
    * ``image``: float32 (3, H, W) tensor from ``transform``;
    * ``caption_tokens``: long (T,), ``[SOS] caption [EOS]`` cut to ``max_caption_length``
      (cut after adding the boundary tokens, as in the official code, so a long caption loses
      its ``[EOS]``);
    * ``noitpac_tokens``: ``caption_tokens`` reversed (it is not padded yet, so the reversal
      is exact: ``[EOS] ... [SOS]``);
    * ``caption_lengths``: long scalar T.

    Randomness (caption choice, augmentation) uses torch's global RNG, which the DataLoader
    seeds per worker. Unreadable images raise :class:`BadImageError` naming the file; with
    ``skip_bad_images`` they are logged, counted in :attr:`num_skipped` and replaced by the
    next readable image, so batches keep their size. Images missing from the folder are found
    when the dataset is built and handled the same way. ``image_ids`` optionally restricts the
    dataset to those images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        tokenizer: SentencePieceBPETokenizer,
        transform: CaptionTransform,
        max_caption_length: int = 30,
        skip_bad_images: bool = False,
        image_ids: Collection[int] | None = None,
    ):
        self.image_dir = Path(root) / f"{split}2017"
        self.captions_json = Path(root) / "annotations" / f"captions_{split}2017.json"
        self.tokenizer = tokenizer
        self.samples = self.sample_maker(tokenizer, transform, max_caption_length)
        self.skip_bad_images = skip_bad_images
        # Shared memory, so the counts of DataLoader workers reach the main process.
        self._skip_counts = torch.zeros(_SKIP_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

        records = read_caption_records(self.captions_json)
        if image_ids is not None:
            keep = set(image_ids)
            selected = [record for record in records if record.image_id in keep]
            if len(selected) < len(records):
                logger.info("%s: %d of %d captioned images are not among the selected image ids and are left out",
                            self.captions_json, len(records) - len(selected), len(records))
            records = selected
        records = self._drop_missing_images(records)
        if not records:
            raise BadValueError(f"{self.captions_json}: no usable images in {self.image_dir}")
        self._records = PackedList(records)
        self.image_ids = np.array([record.image_id for record in records], dtype=np.int64)

    def _drop_missing_images(self, records: list[ImageRecord]) -> list[ImageRecord]:
        """Check every listed image exists (one directory listing); fail or skip the missing."""
        if not self.image_dir.is_dir():
            raise MissingInputError(f"{self.image_dir}: image folder not found")
        present = set(os.listdir(self.image_dir))
        missing = [
            record for record in records
            if record.file_name not in present and not (self.image_dir / record.file_name).is_file()
        ]
        if not missing:
            return records
        first = self.image_dir / missing[0].file_name
        summary = f"{len(missing)} of {len(records)} images listed in {self.captions_json} are missing"
        if not self.skip_bad_images:
            raise BadImageError(f"{first}: image file not found ({summary}; DATA.SKIP_BAD_IMAGES skips them)")
        logger.warning("skipping %s, e.g. %s", summary, first)
        self._count_skip(len(missing))
        missing_ids = {record.image_id for record in missing}
        return [record for record in records if record.image_id not in missing_ids]

    @property
    def num_skipped(self) -> int:
        """Images skipped so far by this dataset in every process: missing ones, then each
        skipped read (an unreadable image visited twice counts twice)."""
        return int(self._skip_counts.sum())

    def _count_skip(self, n: int = 1) -> None:
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (_SKIP_COUNTER_SLOTS - 1)
        self._skip_counts[slot] += n

    def __len__(self) -> int:
        return len(self._records)

    def _load(self, index: int) -> tuple[int, ImageRecord, Image.Image]:
        """The record and RGB image at ``index``, or, when skipping, at the next readable index."""
        for attempt in range(_MAX_CONSECUTIVE_SKIPS + 1):
            position = (index + attempt) % len(self)
            record = self._records[position]
            try:
                return position, record, load_rgb_image(self.image_dir / record.file_name)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise BadImageError(f"{err}; replace the file, or set DATA.SKIP_BAD_IMAGES True to train "
                                        "without it (tools/check_dataset.py --check-images all finds them all)") from None
                logger.warning("skipping unreadable image: %s", err)
                self._count_skip()
        raise BadImageError(
            f"{self.image_dir}: {_MAX_CONSECUTIVE_SKIPS + 1} unreadable images in a row from index {index}"
        )

    def sample_maker(
        self, tokenizer: SentencePieceBPETokenizer, transform: CaptionTransform, max_caption_length: int
    ) -> CaptionSamples:
        """What turns a record and its image into a sample; subclasses return their own kind."""
        return CaptionSamples(tokenizer, transform, max_caption_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position, record, image = self._load(index)
        return self._finish(position, self.samples(record, image))

    def _finish(self, position: int, sample: dict[str, Any]) -> dict[str, Any]:
        """Subclasses add keys that depend on the dataset ``position`` loaded; none here."""
        return sample
