"""Everything one rank trains with, built from the config: the set-up half of the training loop.

:func:`build_training` places the model on the device, wraps it for DDP, and builds optimizer,
schedule, precision and batch mover; :meth:`Training.compile` puts the step under
``torch.compile`` (when, is :mod:`pretrain.engine.compile`'s decision). ``tools/benchmark.py``
times steps of the very same objects.
"""
from __future__ import annotations

import logging
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

logger = logging.getLogger("pretrain.engine")


@dataclass
class Training:
    """One rank's model (unwrapped and as trained), optimisation state and precision."""

    cfg: CfgNode
    ctx: DistContext
    model: nn.Module  # the module itself, for state dicts and validation
    eager_model: nn.Module  # the module as trained without compilation: under DDP when distributed
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # mixed-precision type, None for fp32
    autocast: Callable[[], Any]
    move: Callable[[dict], dict]  # batch to the device
    train_model: nn.Module | None = None  # the module as trained: eager_model, or it under torch.compile

    def __post_init__(self):
        if self.train_model is None:
            self.train_model = self.eager_model

    @property
    def compiled(self) -> bool:
        return self.train_model is not self.eager_model

    def compile(self) -> None:
        """Train through ``torch.compile`` from the next step on (kernels are built at that step)."""
        self.train_model = torch.compile(self.eager_model)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses (detached) of a batch already on the device, after backpropagating them.

        A compiled step that fails (to trace, to compile, or in its kernels) is done again
        eagerly, and the run stays eager: one warning names the reason, and an error that the
        eager step raises too is the model's own.
        """
        try:
            return forward_backward(self.train_model, batch, self.scaler, self.autocast,
                                    self.cfg.ENGINE.GRAD_ACCUM_STEPS)
        except Exception as err:
            if not self.compiled:
                raise
            logger.warning("torch.compile: the compiled step failed (%s); training continues without compilation",
                           _root_cause(err))
            self.optimizer.zero_grad(set_to_none=True)  # whatever the failed step had accumulated
            self.train_model = self.eager_model
            return forward_backward(self.train_model, batch, self.scaler, self.autocast,
                                    self.cfg.ENGINE.GRAD_ACCUM_STEPS)

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


def _root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause (torch.compile wraps the error that stopped it)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def build_training(
    cfg: CfgNode,
    ctx: DistContext,
    model: nn.Module,
    dtype: torch.dtype | None | str = "config",
    channels_last: bool | None = None,
    compile_model: bool = False,
) -> Training:
    """The :class:`Training` of ``model`` (built, seeded identically on every rank) on ``ctx``.

    ``dtype`` and ``channels_last`` default to the config (``AMP``/``AMP_DTYPE``,
    ``ENGINE.CHANNELS_LAST``); the benchmark overrides them, and compiles with ``compile_model``
    (the training loop decides after resuming, :mod:`pretrain.engine.compile`).
    """
    check_world_size(cfg, ctx.world_size)
    channels_last = cfg.ENGINE.CHANNELS_LAST if channels_last is None else channels_last
    if dtype == "config":
        dtype = autocast_dtype(cfg.AMP, ctx.device, cfg.AMP_DTYPE)
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    eager_model: nn.Module = model
    if ctx.is_distributed:
        device_ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        eager_model = DistributedDataParallel(model, device_ids=device_ids)
    training = Training(
        cfg=cfg,
        ctx=ctx,
        model=model,
        eager_model=eager_model,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(cfg, inner_optimizer(optimizer)),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16),
        dtype=dtype,
        autocast=make_autocast(ctx.device, dtype),
        move=make_batch_mover(ctx.device, channels_last),
    )
    if compile_model:
        training.compile()
    return training
