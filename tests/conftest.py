"""Shared fixtures.

detectron2 reads ``DETECTRON2_DATASETS`` once, when ``detectron2.data`` is first imported, so
the built-in dataset's root is chosen here, before any test module imports detectron2.
"""
import os
import tempfile
from pathlib import Path

import pytest

BUILTIN_ROOT = Path(tempfile.mkdtemp(prefix="virtex-d2-builtin-"))
os.environ["DETECTRON2_DATASETS"] = str(BUILTIN_ROOT)

# A tiny built-in dataset: enough images for every split file, small enough to build in a second.
TINY = {"num_train": 16, "num_val": 4, "image_size": 128, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_root() -> Path:
    """Root of a tiny built-in dataset (COCO, LVIS and VOC layouts); also DETECTRON2_DATASETS."""
    from pretrain.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(BUILTIN_ROOT, **TINY)
    return BUILTIN_ROOT
