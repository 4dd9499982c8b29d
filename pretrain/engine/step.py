"""One training iteration: forward and backward over (chunks of) a batch, then the optimizer step,
and the agreement across ranks on whether to go on."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.distributed import all_reduce_sum


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops without saving."""


def split_batch(batch: dict, chunks: int) -> list[dict]:
    """``chunks`` equal slices of a batch along its first dimension."""
    if chunks == 1:
        return [batch]
    size = batch["image"].shape[0]
    if size % chunks:
        raise ValueError(f"per-rank batch of {size} images does not split into ENGINE.GRAD_ACCUM_STEPS={chunks}")
    step = size // chunks
    return [{k: v[i * step : (i + 1) * step] for k, v in batch.items()} for i in range(chunks)]


def forward_backward(
    model: nn.Module, batch: dict, scaler: torch.amp.GradScaler, autocast: Callable[[], Any], accum_steps: int = 1
) -> dict[str, torch.Tensor]:
    """Loss and its components (detached, averaged over the chunks) after backpropagating them.

    With ``accum_steps`` > 1 the batch is processed in chunks whose gradients add up (the loss of
    each chunk is divided by the number of chunks); under DDP only the last chunk synchronises.
    A single process with ``accum_steps = W`` thus computes the same update as ``W`` ranks.
    """
    losses: dict[str, torch.Tensor] = {}
    chunks = split_batch(batch, accum_steps)
    for i, chunk in enumerate(chunks):
        defer_sync = isinstance(model, DistributedDataParallel) and i < len(chunks) - 1
        with model.no_sync() if defer_sync else nullcontext():
            with autocast():
                output = model(chunk)
            scaler.scale(output["loss"] / len(chunks)).backward()
        parts = {"loss": output["loss"], **output.get("loss_components", {})}
        for name, value in parts.items():
            losses[name] = losses.get(name, 0.0) + value.detach().float() / len(chunks)
    return losses


def optimizer_step(
    params: list[torch.Tensor],
    optimizer: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    clip_grad_norm: float,
) -> torch.Tensor:
    """Unscale, clip the gradient norm, step the optimizer (skipped by the scaler on fp16
    overflow) and the schedule; returns the gradient norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def agree_on_stopping(loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """Whether any rank saw a non-finite loss, and whether any rank received a stop signal.

    All ranks take the same decision at the same iteration, so none is left waiting in a collective.
    """
    flags = torch.stack([(~torch.isfinite(loss)).float(), torch.tensor(float(stop_requested), device=loss.device)])
    flags = all_reduce_sum(flags).tolist()
    return flags[0] > 0, flags[1] > 0
