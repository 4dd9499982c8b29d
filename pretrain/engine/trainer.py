"""The pretraining loop: one process or one process per device under ``torchrun``.

Read top to bottom: :func:`run_pretraining` builds tokenizer, data and model from the config and
hands them to :func:`train`, which sets up optimisation, resumes, and runs the iterations. One
iteration is :func:`forward_backward`, an agreement across ranks on whether to stop (non-finite
loss or SIGTERM), then :func:`optimizer_step`. Checkpoints, logging and validation happen at the
periods of ``cfg.ENGINE``.
"""
from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pretrain.caption_metrics import load_references
from pretrain.checkpoint_io import list_checkpoints
from pretrain.config import config_differences
from pretrain.data import collate_fn
from pretrain.data.checks import check_pretraining_data
from pretrain.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    get_rng_state,
    init_distributed,
    make_batch_mover,
    seed_everything,
    set_rng_state,
    shutdown_distributed,
)
from pretrain.engine.checkpoint import CheckpointManager
from pretrain.engine.monitor import TrainingMonitor, setup_logging
from pretrain.engine.optim import build_optimizer, inner_optimizer
from pretrain.engine.sampling import IterationBatchSampler, SeededDataset
from pretrain.engine.streaming import (
    StreamLoader,
    saved_stream_state,
    val_stream_batches,
)
from pretrain.engine.validation import evaluate, val_batches
from pretrain.files import write_text_atomic
from pretrain.malloc import allocator_in_use
from pretrain.models.captioning import CaptioningModel
from pretrain.precision import autocast_dtype, make_autocast
from pretrain.schedule import build_lr_scheduler
from pretrain.tasks import build_dataset, build_model
from pretrain.tokenizer import SentencePieceBPETokenizer, first_word_index

logger = logging.getLogger("pretrain.engine")


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


class _StopSignal:
    """Remembers a SIGTERM (what schedulers send before preemption) until the loop acts on it."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _agree(ctx: DistContext, loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """Whether any rank saw a non-finite loss, and whether any rank received SIGTERM.

    All ranks take the same decision at the same iteration, so none is left waiting in a collective.
    """
    flags = torch.stack([(~torch.isfinite(loss)).float(), torch.tensor(float(stop_requested), device=loss.device)])
    flags = all_reduce_sum(flags).tolist()
    return flags[0] > 0, flags[1] > 0


def _restore(state: dict, ctx: DistContext, seed: int, model, optimizer, scheduler, scaler) -> int:
    """Load a checkpoint into the run's objects; returns its iteration."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 (e.g. on CPU); the scale then starts afresh
        scaler.load_state_dict(state["scaler"])
    iteration = int(state["iteration"])
    rng = state.get("rng", [])
    if len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank])
    else:
        logger.warning(
            "checkpoint holds RNG states of %d ranks, this run has %d: reseeding each rank from "
            "(RANDOM_SEED, rank, iteration); the data order is unaffected",
            len(rng),
            ctx.world_size,
        )
        seed_everything(seed + ctx.rank + 1_000_003 * iteration)
    return iteration


def train(
    cfg: CfgNode,
    output_dir: str | Path,
    ctx: DistContext,
    model: nn.Module,
    train_set: Dataset,
    collate_fn: Callable,
    resume: bool = False,
    val_set: Dataset | None = None,
    decode: Callable[[list[int]], str] | None = None,
    val_annotations: str | Path | None = None,
) -> Path:
    """Train ``model`` (built, on the CPU, seeded identically on every rank) for
    ``cfg.OPTIM.NUM_ITERATIONS`` iterations; returns the path of the final checkpoint.

    ``val_set``, ``decode`` (token ids → text) and ``val_annotations`` (COCO captions json of the
    val split) enable periodic validation; without ``decode``, or for a model that does not write
    captions, only the val loss is computed.
    """
    output_dir = Path(output_dir)
    world, rank = ctx.world_size, ctx.rank
    accum = cfg.ENGINE.GRAD_ACCUM_STEPS
    if cfg.OPTIM.BATCH_SIZE % (world * accum):
        raise ValueError(
            f"OPTIM.BATCH_SIZE {cfg.OPTIM.BATCH_SIZE} does not split evenly into {world} rank(s) × "
            f"ENGINE.GRAD_ACCUM_STEPS {accum}"
        )
    model.to(ctx.device)
    if cfg.ENGINE.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, inner_optimizer(optimizer))
    dtype = autocast_dtype(cfg.AMP, ctx.device, cfg.AMP_DTYPE)
    autocast = make_autocast(ctx.device, dtype)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
    manager = CheckpointManager(output_dir, cfg.ENGINE.KEEP_LAST_CHECKPOINTS, cfg.ENGINE.PINNED_CHECKPOINTS)

    seed_everything(cfg.RANDOM_SEED + rank)
    start = 0
    if resume:
        state = manager.load_latest()
        if state is None:
            logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
        else:
            start = _restore(state, ctx, cfg.RANDOM_SEED, model, optimizer, scheduler, scaler)
            logger.info("resumed from %s", output_dir / f"checkpoint_{start}.pth")
            changes = config_differences(state["config"], cfg) if "config" in state else []
            if changes:
                logger.warning(
                    "the config differs from the one checkpoint_%d.pth was trained with, so the run "
                    "continues with another recipe (config.yaml now holds the new one): %s",
                    start, "; ".join(changes),
                )
    elif list_checkpoints(output_dir):
        raise FileExistsError(
            f"{output_dir} already holds checkpoints; pass --resume to continue that run or choose "
            "another output directory"
        )
    if ctx.is_main:
        write_text_atomic(output_dir / "config.yaml", cfg.dump())

    train_model: nn.Module = model
    if ctx.is_distributed:
        device_ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.ENGINE.COMPILE:
        train_model = torch.compile(train_model)
    params = [p for p in model.parameters() if p.requires_grad]

    num_iterations = cfg.OPTIM.NUM_ITERATIONS
    if isinstance(train_set, IterableDataset):  # shards: the stream continues where the checkpoint left it
        loader = StreamLoader(train_set, cfg, ctx, collate_fn, saved_stream_state(output_dir, start))
    else:
        sampler = IterationBatchSampler(
            len(train_set), cfg.OPTIM.BATCH_SIZE, rank, world, cfg.RANDOM_SEED, num_iterations, start
        )
        loader = DataLoader(
            SeededDataset(train_set),
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=cfg.DATA.NUM_WORKERS,
            pin_memory=ctx.device.type != "cpu",
            generator=torch.Generator().manual_seed(cfg.RANDOM_SEED + rank),  # keeps the global RNG untouched
        )
    move = make_batch_mover(ctx.device, cfg.ENGINE.CHANNELS_LAST)

    def validate(iteration: int) -> None:
        """Val metrics, leaving the RNG states as they were so that validation does not change
        the training trajectory (a resumed run skips the validation an uninterrupted run did)."""
        rng_state = get_rng_state()
        if isinstance(val_set, IterableDataset):
            loader_val = val_stream_batches(val_set, cfg, ctx, collate_fn)
        else:
            loader_val = DataLoader(
                SeededDataset(val_set),
                batch_sampler=val_batches(len(val_set), cfg.OPTIM.BATCH_SIZE // world, rank, world),
                collate_fn=collate_fn,
                num_workers=cfg.DATA.NUM_WORKERS,
            )
        results = evaluate(
            model, loader_val, ctx, move, decode if caption_metrics else None,
            references, cfg.DATA.EOS_INDEX, first_word_index(cfg.DATA), autocast,
        )
        set_rng_state(rng_state)
        logger.info("iteration %d validation: %s", iteration, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        monitor.write_scalars(iteration, results)

    def save(iteration: int) -> Path:
        rng_states = all_gather_objects(get_rng_state())
        stream = {"data": loader.state_dict()} if isinstance(loader, StreamLoader) else {}  # every rank's position
        path = output_dir / f"checkpoint_{iteration}.pth"
        if ctx.is_main:
            path = manager.save(
                iteration,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_states,
                    "config": cfg.dump(),
                    "world_size": world,
                    **stream,
                },
            )
            logger.info("saved %s", path)
        barrier()
        return path

    last_saved = output_dir / f"checkpoint_{start}.pth" if start else None
    if start >= num_iterations:
        logger.info("nothing to do: the run already reached iteration %d", start)
        return last_saved
    # Only captioning models write captions; the classification and masked-LM baselines of the
    # paper are validated on their loss alone.
    caption_metrics = (cfg.ENGINE.VAL_CAPTION_METRICS and isinstance(model, CaptioningModel)
                       and val_annotations is not None)
    references = load_references(val_annotations) if val_set is not None and val_annotations else None
    monitor = TrainingMonitor(output_dir, ctx.is_main, start, num_iterations)
    stop = _StopSignal()
    logger.info(
        "training iterations %d..%d: %d rank(s) × %d images on %s, precision %s, allocator %s",
        start + 1, num_iterations, world, cfg.OPTIM.BATCH_SIZE // world, ctx.device, dtype or torch.float32,
        allocator_in_use(),
    )
    try:
        batches = iter(loader)
        tick = time.perf_counter()
        for iteration in range(start + 1, num_iterations + 1):
            batch = move(next(batches))
            data_time = time.perf_counter() - tick
            losses = forward_backward(train_model, batch, scaler, autocast, accum)
            nonfinite, stop_requested = _agree(ctx, losses["loss"], stop.received)
            if nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {iteration} "
                    f"({', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())}); stopping without "
                    f"saving. Last good checkpoint: {last_saved or 'none'}"
                )
            grad_norm = optimizer_step(params, optimizer, scheduler, scaler, cfg.OPTIM.CLIP_GRAD_NORM)
            step_time = time.perf_counter() - tick
            tick = time.perf_counter()

            monitor.update(**{k: float(v) for k, v in losses.items()})
            lr = {group["name"]: group["lr"] for group in optimizer.param_groups}
            images_per_s = cfg.OPTIM.BATCH_SIZE / step_time
            monitor.step(iteration, lr, images_per_s)
            if iteration % cfg.ENGINE.LOG_PERIOD == 0 or iteration == num_iterations:
                smoothed = monitor.smoothed()
                scalars = {f"loss/{k}": v for k, v in smoothed.items()}
                scalars.update({f"lr/{k}": v for k, v in lr.items()})
                scalars.update(
                    {
                        "throughput/images_per_s": images_per_s,
                        "time/step_s": step_time,
                        "time/data_s": data_time,
                        "grad_norm": float(grad_norm),
                    }
                )
                if scaler.is_enabled():
                    scalars["amp/loss_scale"] = scaler.get_scale()
                monitor.write_scalars(iteration, scalars)
                logger.info(
                    "iteration %d: %s, lr %s, %.2f images/s, data %.3f s",
                    iteration, ", ".join(f"{k} {v:.4f}" for k, v in smoothed.items()),
                    ", ".join(f"{k} {v:.3g}" for k, v in lr.items()), images_per_s, data_time,
                )
            finished = iteration == num_iterations
            if stop_requested or finished or iteration % cfg.ENGINE.CHECKPOINT_PERIOD == 0:
                last_saved = save(iteration)
            if stop_requested:
                logger.warning("SIGTERM received: saved %s and stopping; continue with --resume", last_saved)
                break
            if val_set is not None and cfg.ENGINE.VAL_PERIOD and (finished or iteration % cfg.ENGINE.VAL_PERIOD == 0):
                validate(iteration)
            tick = time.perf_counter()
        return last_saved
    finally:
        stop.restore()
        monitor.close()


def run_pretraining(cfg: CfgNode, output_dir: str | Path, resume: bool = False) -> Path:
    """Build tokenizer, datasets and model from ``cfg`` and :func:`train` them, in this process
    or as one rank of a ``torchrun`` job; returns the final checkpoint's path."""
    ctx = init_distributed()
    try:
        setup_logging(output_dir, ctx.rank)
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
        torch.backends.cudnn.deterministic = cfg.CUDNN_DETERMINISTIC
        check_pretraining_data(cfg, main=ctx.is_main)  # every data problem at once, before anything is built
        tokenizer = SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL)
        train_set = build_dataset(cfg, "train", tokenizer)
        val_set = build_dataset(cfg, "val", tokenizer) if cfg.ENGINE.VAL_PERIOD else None
        seed_everything(cfg.RANDOM_SEED)  # identical initial weights on every rank
        model = build_model(cfg)
        # From shards there is no COCO captions file to score against: val loss only.
        annotations = Path(cfg.DATA.ROOT) / "annotations" / "captions_val2017.json" if cfg.DATA.FORMAT == "coco" else None
        return train(cfg, output_dir, ctx, model, train_set, collate_fn, resume, val_set, tokenizer.decode, annotations)
    finally:
        shutdown_distributed()
