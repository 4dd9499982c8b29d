"""Fixtures for the engine's integration tests: a vocabulary for the built-in dataset and a
helper that runs ``tools/pretrain.py`` on the tiny config as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = Path(__file__).with_name("tiny_bicaptioning_R_18.yaml")
PRETRAIN = REPO / "tools" / "pretrain.py"


@pytest.fixture(scope="session")
def tiny_overrides(synthetic_root, tmp_path_factory) -> list[str]:
    """``KEY VALUE`` overrides pointing the tiny config at the built-in dataset and a
    200-piece vocabulary trained on its captions."""
    from pretrain.data.captions import read_caption_records
    from pretrain.tokenizer import train_vocabulary

    coco = synthetic_root / "coco"
    captions = [c for r in read_caption_records(coco / "annotations" / "captions_train2017.json") for c in r.captions]
    model = train_vocabulary(captions, tmp_path_factory.mktemp("vocab") / "tiny", vocab_size=200)
    return ["DATA.ROOT", str(coco), "DATA.TOKENIZER_MODEL", str(model)]


def pretrain_command(output_dir: Path, overrides: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, str(PRETRAIN), "--config", str(TINY_CONFIG), "--output-dir", str(output_dir),
            *(["--resume"] if resume else []), *overrides]


def subprocess_env() -> dict[str, str]:
    """One thread per process: deterministic kernels and no oversubscription of shared cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_pretrain(output_dir: Path, overrides: list[str], resume: bool = False) -> subprocess.CompletedProcess:
    """Run ``tools/pretrain.py`` to completion; fail the test with its output if it fails."""
    result = subprocess.run(
        pretrain_command(output_dir, overrides, resume), env=subprocess_env(), check=False, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pretrain failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="session")
def reference_run(tiny_overrides, tmp_path_factory) -> Path:
    """An uninterrupted 8-iteration run of the tiny config; its output directory."""
    output_dir = tmp_path_factory.mktemp("reference")
    run_pretrain(output_dir, tiny_overrides)
    return output_dir
