"""Files the project writes get the permissions a plain ``open()`` gives them (0666 less the
umask), so that teammates or a group account sharing an output folder can read them. The atomic
writer's temporary file was made by ``tempfile.mkstemp`` (always 0600), and the rename kept that
mode for every checkpoint, config, report and shard."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine.checkpoint import CheckpointManager
from pretrain.files import write_text_atomic

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "_base_bicaptioning_R_50_L1_H1024.yaml"


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_checkpoint_and_a_config_get_the_mode_the_umask_gives(tmp_path, mask, mode):
    with umask(mask):
        CheckpointManager(tmp_path, keep_last=1).save(2, {"model": {"w": torch.zeros(2)}})
        write_text_atomic(tmp_path / "config.yaml", load_config(str(CONFIG)).dump())  # as the trainer writes it
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in tmp_path.iterdir()}
    assert modes == {"checkpoint_2.pth": oct(mode), "config.yaml": oct(mode)}
