"""Everything one rank trains with, built from the config: the set-up half of the training loop.

:func:`build_training` places the model on the device, wraps it for DDP and ``torch.compile``,
and builds optimizer, schedule, precision and batch mover; ``tools/benchmark.py`` times steps
of the very same objects.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.config_checks import check_world_size
from pretrain.distributed import DistContext, make_batch_mover
from pretrain.engine.optim import build_optimizer, inner_optimizer
from pretrain.engine.step import forward_backward, optimizer_step
from pretrain.precision import autocast_dtype, make_autocast
from pretrain.schedule import build_lr_scheduler


@dataclass
class Training:
    """One rank's model (unwrapped and as trained), optimisation state and precision."""

    cfg: CfgNode
    ctx: DistContext
    model: nn.Module  # the module itself, for state dicts and validation
    train_model: nn.Module  # the module as trained: under DDP and/or torch.compile when enabled
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # mixed-precision type, None for fp32
    autocast: Callable[[], Any]
    move: Callable[[dict], dict]  # batch to the device

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses (detached) of a batch already on the device, after backpropagating them."""
        return forward_backward(self.train_model, batch, self.scaler, self.autocast, self.cfg.ENGINE.GRAD_ACCUM_STEPS)

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step optimizer and schedule; returns the gradient norm before clipping."""
        return optimizer_step(self.params, self.optimizer, self.scheduler, self.scaler, self.cfg.OPTIM.CLIP_GRAD_NORM)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this training (the caller adds RNG and config)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }


def build_training(
    cfg: CfgNode,
    ctx: DistContext,
    model: nn.Module,
    dtype: torch.dtype | None | str = "config",
    channels_last: bool | None = None,
    compile_model: bool | None = None,
) -> Training:
    """The :class:`Training` of ``model`` (built, seeded identically on every rank) on ``ctx``.

    ``dtype``, ``channels_last`` and ``compile_model`` default to the config (``AMP``/``AMP_DTYPE``,
    ``ENGINE.CHANNELS_LAST``, ``ENGINE.COMPILE``); the benchmark overrides them.
    """
    check_world_size(cfg, ctx.world_size)
    channels_last = cfg.ENGINE.CHANNELS_LAST if channels_last is None else channels_last
    compile_model = cfg.ENGINE.COMPILE if compile_model is None else compile_model
    if dtype == "config":
        dtype = autocast_dtype(cfg.AMP, ctx.device, cfg.AMP_DTYPE)
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    train_model: nn.Module = model
    if ctx.is_distributed:
        device_ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if compile_model:
        train_model = torch.compile(train_model)
    return Training(
        cfg=cfg,
        ctx=ctx,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(cfg, inner_optimizer(optimizer)),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16),
        dtype=dtype,
        autocast=make_autocast(ctx.device, dtype),
        move=make_batch_mover(ctx.device, channels_last),
    )
