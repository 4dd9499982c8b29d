"""Process-group setup from torchrun's environment, devices, rank helpers, seeding and RNG snapshots.

A run is one process (no ``torchrun``) or one process per device under ``torchrun``, which sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. The device is the machine's accelerator when it has
one (one per local rank) and the CPU otherwise; the collective backend is PyTorch's default for
that device (NCCL for CUDA, gloo for CPU), so nothing here names a particular vendor.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def select_device(local_rank: int, force_cpu: bool = False) -> torch.device:
    """The accelerator with index ``local_rank`` if the machine has one, else the CPU."""
    if force_cpu or not torch.accelerator.is_available():
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    torch.accelerator.set_device_index(local_rank)
    return torch.device(accelerator.type, local_rank)


def make_batch_mover(device: torch.device, channels_last: bool) -> Callable[[dict], dict]:
    """Moves every tensor of a batch to ``device``; images become channels-last if asked."""

    def move(batch: dict) -> dict:
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if channels_last:
            moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
        return moved

    return move


def init_distributed(force_cpu: bool = False, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a plain single process and no
    process group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(local_rank, force_cpu)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=dist.get_default_backend_for_device(device),
            init_method="env://",
            timeout=timedelta(minutes=timeout_minutes),
            device_id=device if device.type != "cpu" else None,
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    """Leave the process group (if one was joined) so the process can exit without warnings."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (in place; returned for chaining)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with python, numpy and torch (CPU) seeded by ``seed``, then restore the
    caller's states: how every pretraining sample is loaded, whichever reader loads it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def get_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states, as types ``torch.load`` accepts with
    ``weights_only=True`` (numpy's key array becomes a tensor)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.accelerator.is_available():
        # This rank's device only: a resume with fewer devices per node, or with this rank on
        # another device index, must neither fail nor seed one device from another's state.
        state["accelerator"] = torch.get_device_module().get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state captured by :func:`get_rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and torch.accelerator.is_available():
        device_state = state["accelerator"]
        if isinstance(device_state, (list, tuple)):  # written before 2026-12-06: every visible device's
            index = torch.accelerator.current_device_index()
            device_state = device_state[index] if index < len(device_state) else None
        if device_state is not None:
            torch.get_device_module().set_rng_state(device_state)


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples; a checkpoint round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
