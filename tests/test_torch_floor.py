"""Checkpoints are read with torch.load(weights_only=True) only on a torch whose unpickler has no
published bypass: setup.py's floor and the reader's refusal agree, and the refusal is one line
naming the installed torch and the upgrade."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint_io import (
    SAFE_TORCH,
    SAFE_TORCH_PINS,
    CheckpointError,
    UnsafeTorchError,
    check_torch_is_safe,
    read_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["2.4.1", "2.5.1+cu124", "2.6.0", "2.9.1", "1.13.1", "garbage"])
def test_torch_with_a_known_bypass_is_refused(version):
    with pytest.raises(UnsafeTorchError, match=re.escape(f"torch {version} is installed")):
        check_torch_is_safe(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.11.0+cpu", "2.14.1+cu130", "3.0.0"])
def test_torch_without_a_known_bypass_is_accepted(version):
    check_torch_is_safe(version)


def test_the_reader_refuses_before_reading_on_an_old_torch(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_1.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 1}, path)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(UnsafeTorchError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "torch 2.5.1" in message and "pip install 'torch>=2.10' 'torchvision>=0.25'" in message
    assert "\n" not in message
    assert not isinstance(caught.value, CheckpointError), "a resume would set good files aside as damaged"
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert read_checkpoint(path)["iteration"] == 1


def test_setup_py_asks_for_the_same_floor():
    text = (REPO / "setup.py").read_text()
    torch_floor = re.search(r'"torch>=(\d+)\.(\d+),', text)
    vision_floor = re.search(r'"torchvision>=([\d.]+),', text)
    assert torch_floor and tuple(map(int, torch_floor.groups())) == SAFE_TORCH
    assert vision_floor and f"torchvision>={vision_floor.group(1)}" in SAFE_TORCH_PINS.split()


def test_a_tool_on_an_old_torch_ends_with_one_line_and_status_2(tmp_path):
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": {}}, checkpoint)
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, "tools")
        import torch
        torch.__version__ = "2.5.1"
        sys.argv = ["tools/convert_backbone.py", "--input", {str(checkpoint)!r}, "--output", {str(tmp_path / "out.pth")!r}]
        runpy.run_path("tools/convert_backbone.py", run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("convert_backbone: error: torch 2.5.1 is installed") and "torch>=2.10" in last, last
    assert not (tmp_path / "out.pth").exists()
