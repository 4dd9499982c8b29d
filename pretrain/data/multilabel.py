"""Multi-label classification of COCO object categories (the official ablation baseline)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.data.captions import CocoCaptionsDataset, require
from pretrain.data.dataset_root import load_json


def read_instance_labels(instances_json: str | os.PathLike) -> tuple[list[int], dict[int, list[int]]]:
    """``(category_ids, labels)`` from a COCO instances file.

    ``category_ids`` is the sorted list of the file's category ids (80 for COCO, with gaps up
    to 90); class index ``k`` stands for ``category_ids[k]``. ``labels`` maps every image with
    at least one instance to the sorted class indices present in it. Raises ``ValueError``
    naming the file for malformed entries or unknown categories.
    """
    data = load_json(instances_json)
    require(instances_json, isinstance(data.get("categories"), list), "'categories'", "must be a list")
    category_ids = []
    for i, category in enumerate(data["categories"]):
        ok = isinstance(category, dict) and isinstance(category.get("id"), int)
        require(instances_json, ok, f"categories[{i}]", "needs an integer 'id'")
        category_ids.append(category["id"])
    category_ids.sort()
    index_of = {category_id: k for k, category_id in enumerate(category_ids)}
    labels: dict[int, set[int]] = {}
    for i, ann in enumerate(data["annotations"]):
        ok = isinstance(ann, dict) and isinstance(ann.get("image_id"), int) and ann.get("category_id") in index_of
        require(instances_json, ok, f"annotations[{i}]", "needs an integer 'image_id' and a listed 'category_id'")
        labels.setdefault(ann["image_id"], set()).add(index_of[ann["category_id"]])
    return category_ids, {image_id: sorted(indices) for image_id, indices in labels.items()}


class MultiLabelClassificationDataset(CocoCaptionsDataset):
    """COCO Captions samples plus ``labels``: a float32 multi-hot over the object categories.

    Labels come from ``annotations/instances_{split}2017.json``; class ``k`` is the ``k``-th
    category in sorted id order (:attr:`category_ids`). Images without any instance are left
    out, as in the official code (their number is logged). The caption keys of
    :class:`CocoCaptionsDataset` are kept.
    """

    def __init__(self, root: str | os.PathLike, split: str, *args: Any, **kwargs: Any):
        instances_json = Path(root) / "annotations" / f"instances_{split}2017.json"
        self.category_ids, labels = read_instance_labels(instances_json)
        super().__init__(root, split, *args, image_ids=labels.keys(), **kwargs)
        self._labels = np.zeros((len(self), self.num_classes), dtype=np.float32)
        for row, image_id in enumerate(self.image_ids):
            self._labels[row, labels[int(image_id)]] = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _finish(self, position: int, sample: dict[str, Any]) -> dict[str, Any]:
        sample["labels"] = torch.from_numpy(self._labels[position].copy())
        return sample
