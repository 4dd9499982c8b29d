"""Run-time adaptations that let the same configs run on GPU clusters and on CPU-only machines.

Each adaptation logs what it changed, so a run's log says exactly how it deviated from the
config file:

* ``patch_lvis_numpy``: lvis 0.5.3 (its last release) uses ``np.float``, removed in numpy 1.24;
  without the alias its evaluator fails in ``accumulate``.
* ``patch_cpu_ddp``: detectron2 wraps the model in DDP with ``device_ids=[local_rank]``, which
  torch rejects for CPU modules; without CUDA the wrapper is given ``device_ids=None``.
* ``adapt_config_to_devices``: without CUDA, ``MODEL.DEVICE`` becomes ``cpu`` and, with several
  processes, ``SyncBN`` becomes ``VIRTEX.CPU_SYNC_NORM`` (torch's SyncBatchNorm is GPU-only).
* ``limit_cpu_threads``: processes sharing one CPU split its cores instead of oversubscribing.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from detectron2.utils import comm

from .config import config_value

logger = logging.getLogger(__name__)

# Config keys that hold a norm type and may say "SyncBN".
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")


def patch_lvis_numpy() -> None:
    """Give numpy back the ``np.float`` alias (= ``float``) that lvis's evaluator uses."""
    if not hasattr(np, "float"):
        np.float = float
        logger.info("compat: set np.float = float for lvis %s's evaluator (removed in numpy 1.24)",
                    _version("lvis"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def patch_cpu_ddp() -> None:
    """Without CUDA, make detectron2's trainer build its DDP wrapper with ``device_ids=None``."""
    if torch.cuda.is_available():
        return
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_virtex_cpu_patch", False):
        return

    def create_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    create_ddp_model._virtex_cpu_patch = True
    defaults.create_ddp_model = create_ddp_model
    logger.info("compat: no CUDA, detectron2's DDP wrapper gets device_ids=None")


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def adapt_config_to_devices(cfg, world_size: int) -> None:
    """Adapt a mutable config to the machine: CPU device and a SyncBN that runs there."""
    if torch.cuda.is_available():
        return
    if cfg.MODEL.DEVICE != "cpu":
        logger.info("compat: no CUDA, MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if world_size > 1:
        for key in NORM_KEYS:
            if config_value(cfg, key) == "SyncBN":
                _set(cfg, key, cfg.VIRTEX.CPU_SYNC_NORM)
                logger.info("compat: %d processes without CUDA, %s SyncBN -> %s",
                            world_size, key, cfg.VIRTEX.CPU_SYNC_NORM)


def limit_cpu_threads() -> None:
    """Without CUDA, give each local process an equal share of the CPU cores."""
    local_size = comm.get_local_size()
    if torch.cuda.is_available() or local_size <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // local_size)
    torch.set_num_threads(threads)
    logger.info("compat: %d local processes without CUDA, %d torch threads each", local_size, threads)
