"""Learning-rate schedule: linear warm-up, then constant, linear, cosine or multi-step decay.

One multiplier of the base learning rates per iteration (a ``LambdaLR`` stepped after every
optimizer step), as in the official recipe: during the first ``OPTIM.WARMUP_STEPS`` iterations the
multiplier is ``step / WARMUP_STEPS`` (exactly 0 for the first iteration), then
``cosine``: cos²(π/2 · p) = ½(1 + cos πp), ``linear``: 1 − p, ``multistep``: γ^(number of
``OPTIM.LR_STEPS`` ≤ step), ``none``: 1; p = (step − warm-up) / (total − warm-up) ∈ [0, 1].
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from fvcore.common.config import CfgNode
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("none", "linear", "cosine", "multistep")


def lr_multiplier(
    name: str, total_steps: int, warmup_steps: int, milestones: list[int] = (), gamma: float = 0.1
) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the iteration (0-based)."""
    if name not in DECAYS:
        raise ValueError(f"OPTIM.LR_DECAY_NAME: unknown schedule '{name}' (expected one of {DECAYS})")
    if name == "multistep" and list(milestones) != sorted(milestones):
        raise ValueError(f"OPTIM.LR_STEPS must be increasing, got {list(milestones)}")
    milestones = list(milestones)
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        if name == "multistep":
            return gamma ** bisect.bisect_right(milestones, step)
        return 1.0

    return multiplier


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """The schedule of ``cfg.OPTIM`` on ``optimizer`` (the inner optimizer when Lookahead wraps it)."""
    return LambdaLR(
        optimizer,
        lr_multiplier(
            cfg.OPTIM.LR_DECAY_NAME,
            cfg.OPTIM.NUM_ITERATIONS,
            cfg.OPTIM.WARMUP_STEPS,
            cfg.OPTIM.LR_STEPS,
            cfg.OPTIM.LR_GAMMA,
        ),
    )
