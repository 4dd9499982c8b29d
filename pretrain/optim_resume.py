"""An optimizer resumed under a config that changed its hyper-parameters takes the config's.

torch's ``Optimizer.load_state_dict`` restores every saved group value, learning rates and
weight decay included, and an LR scheduler's ``load_state_dict`` its saved base rates: a run
resumed with a new learning rate would go on with the old one while its config and log name the
new one. Pretraining's ``--resume`` and ``tools/train_net.py --resume`` both take the values
the config built, at the checkpoint's point in the schedule, and keep the checkpoint's
per-parameter state (momentum buffers, Adam moments).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch


def configured_values(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's values as the config built them (all but ``params`` and the
    current ``lr``); taken before a checkpoint is loaded into ``optimizer``."""
    return [{key: value for key, value in group.items() if key not in ("params", "lr")}
            for group in optimizer.param_groups]


def apply_configured_values(optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]],
                            scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """After loading a checkpoint: the ``configured`` values in each group, the scheduler's base
    rates from them, and each group's current rate what the schedule gives those at its loaded
    step. With the checkpoint's own config this repeats the saved values bit for bit."""
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: get_lr is meant to be called by step()
        rates = scheduler.get_lr()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
