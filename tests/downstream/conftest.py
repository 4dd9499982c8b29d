"""Fixtures of the downstream tests: a tiny captioning model (ResNet-18, 32-wide decoder, 64 px),
its vocabulary and a checkpoint, all on the built-in dataset, and the tools as modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tool_main import Tool

REPO = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 100

TINY_CONFIG = """\
MODEL:
  NAME: "bicaptioning"
  VISUAL:
    NAME: "torchvision::resnet18"
    FEATURE_SIZE: 512
  TEXTUAL:
    NAME: "transdec_postnorm::L1_H32_A2_F64"
  DECODER:
    BEAM_SIZE: 2
    MAX_DECODING_STEPS: 8
DATA:
  ROOT: "{root}"
  TOKENIZER_MODEL: "{tokenizer}"
  VOCAB_SIZE: {vocab}
  IMAGE_CROP_SIZE: 64
  MAX_CAPTION_LENGTH: 16
  NUM_WORKERS: 0
AMP: False
"""


def load_tool(name: str) -> Tool:
    """``tools/<name>.py``, whose ``main(argv)`` returns the status its command line exits with."""
    return Tool(name)


@pytest.fixture(scope="session")
def tokenizer_model(synthetic_root, tmp_path_factory) -> Path:
    from pretrain.data.captions import read_caption_records
    from pretrain.tokenizer import train_vocabulary

    records = read_caption_records(synthetic_root / "coco" / "annotations" / "captions_train2017.json")
    captions = [caption for record in records for caption in record.captions]
    return train_vocabulary(captions, tmp_path_factory.mktemp("vocab") / "tiny", vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_config(synthetic_root, tokenizer_model, tmp_path_factory) -> Path:
    """A config file for the tiny model, reading the built-in COCO captions."""
    path = tmp_path_factory.mktemp("config") / "tiny_bicaptioning_R_18.yaml"
    path.write_text(TINY_CONFIG.format(root=synthetic_root / "coco", tokenizer=tokenizer_model, vocab=VOCAB_SIZE))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory) -> Path:
    """A checkpoint of the tiny model in our (and the official) format: ``{"model": ..., "iteration"}``."""
    from pretrain.config import load_config
    from pretrain.tasks import build_model

    torch.manual_seed(0)
    model = build_model(load_config(str(tiny_config)))
    path = tmp_path_factory.mktemp("run") / "checkpoint_7.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, path)
    return path


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """VOC2007 of a built-in dataset large enough for 3-fold SVM cross-validation of several
    classes (32 trainval and 24 test images; the shared fixture's 8 + 4 are too few)."""
    from pretrain.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("builtin_voc")
    make_synthetic_dataset(root, num_train=64, num_val=24, image_size=64, seed=0)
    return root / "VOC2007"
