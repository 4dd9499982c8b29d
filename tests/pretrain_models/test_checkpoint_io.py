"""Checkpoint reading: official/our format, and clear errors for bad or unsafe files; what a failed write raises."""
import pytest
import torch
from torch import nn

from pretrain.checkpoint_io import (
    CheckpointError,
    load_model_state,
    load_model_weights,
    save_checkpoint,
)


class Opaque:
    """A class torch's weights-only unpickler does not allow."""


class Unsaveable:
    """An object whose pickling fails in torch.save with a RuntimeError that no write caused."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def small_model():
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_reads_the_model_entry_and_loads_strictly(tmp_path):
    source, target = small_model(), small_model()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "optimizer": {}, "iteration": 5}, path)
    assert set(load_model_state(path)) == set(source.state_dict())
    load_model_weights(target, path)
    assert torch.equal(target[0].weight, source[0].weight)


def test_mismatched_weights_name_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(CheckpointError, match="other.pth: does not fit the model"):
        load_model_weights(small_model(), path)


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "expected a dict with a 'model' entry, got list"),
        ({"state_dict": {}}, r"no 'model' entry \(found keys: \['state_dict'\]\)"),
        ({"model": {"w": 3}}, "'model' is not a state dict of named tensors"),
    ],
)
def test_wrong_structure(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="bad.pth: " + message):
        load_model_state(path)


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth: no such checkpoint file"):
        load_model_state(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth: not a PyTorch checkpoint"):
        load_model_state(garbage)
    whole = tmp_path / "whole.pth"
    torch.save({"model": small_model().state_dict()}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: corrupt or truncated checkpoint"):
        load_model_state(truncated)


def test_a_fault_that_is_not_the_files_is_not_blamed_on_it(tmp_path, monkeypatch):
    """A wrong call of torch.load (as a bug of ours would make) or a full memory says nothing
    about the file's bytes: it is raised as it is, not as a corrupt checkpoint (exit status 1)."""
    whole = tmp_path / "whole.pth"
    torch.save({"model": small_model().state_dict()}, whole)
    for fault in (TypeError("Unpickler.__init__() got an unexpected keyword argument"), MemoryError()):
        def failing_load(*args, fault=fault, **kwargs):
            raise fault
        monkeypatch.setattr(torch, "load", failing_load)
        with pytest.raises(type(fault)):
            load_model_state(whole)


def test_an_error_of_torch_save_that_no_failed_write_caused_is_raised_as_it_is(tmp_path):
    """Only the OSError of a failed write replaces torch.save's error (a full disk); any other
    error of torch.save, a RuntimeError too, is not told as a machine fault."""
    with pytest.raises(RuntimeError, match="cannot pickle this") as raised:
        save_checkpoint({"model": {}, "extra": Unsaveable()}, tmp_path / "checkpoint_2.pth")
    assert not isinstance(raised.value, OSError)
    assert list(tmp_path.iterdir()) == [], "no partial or temporary file left"


def test_files_needing_arbitrary_unpickling_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "extra": Opaque()}, path)
    with pytest.raises(CheckpointError, match="pickled.pth: refusing to load.*arbitrary unpickling"):
        load_model_state(path)
