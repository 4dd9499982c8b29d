"""The pretraining loop: one process, or one process per device under ``torchrun``.

Read top to bottom: :func:`run_pretraining` builds tokenizer, data and model from the config
(the task table) and hands them to :func:`train`. It builds the rank's :class:`~pretrain.engine.
setup.Training` (model on the device, DDP, optimizer, schedule, precision), starts fresh or
resumes (:mod:`pretrain.engine.resume`), and :class:`PretrainingLoop` runs the iterations: one
step (:mod:`pretrain.engine.step`), an agreement across ranks on whether to stop (non-finite loss
or SIGTERM), then logging, checkpoints and validation at the periods of ``cfg.ENGINE``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pretrain.caption_metrics import load_references
from pretrain.checkpoint_io import checkpoint_path
from pretrain.config_checks import check_world_size
from pretrain.data import collate_fn
from pretrain.data.checks import check_pretraining_data
from pretrain.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    get_rng_state,
    init_distributed,
    seed_everything,
    set_rng_state,
    shutdown_distributed,
)
from pretrain.engine.checkpoint import CheckpointManager
from pretrain.engine.compile import CompileDecision, decide_compile
from pretrain.engine.monitor import TrainingMonitor, setup_logging
from pretrain.engine.resume import start_or_resume
from pretrain.engine.sampling import IterationBatchSampler, SeededDataset
from pretrain.engine.setup import Training, build_training
from pretrain.engine.step import NonFiniteLossError, agree_on_stopping
from pretrain.engine.streaming import (
    StreamLoader,
    saved_stream_state,
    val_stream_batches,
)
from pretrain.engine.validation import evaluate, val_batches
from pretrain.files import ensure_writable_directory, write_text_atomic
from pretrain.malloc import allocator_in_use
from pretrain.models.captioning import CaptioningModel
from pretrain.stop_signals import StopSignal, batches_of, ignore_stop_signals
from pretrain.tasks import build_dataset, build_model
from pretrain.tokenizer import SentencePieceBPETokenizer, first_word_index

logger = logging.getLogger("pretrain.engine")

__all__ = ["NonFiniteLossError", "PretrainingLoop", "Validation", "run_pretraining", "train"]


@dataclass
class Validation:
    """What periodic validation needs: the val split, and for caption metrics the decoder of
    token ids into text and the split's COCO captions file (without them: val loss only)."""

    dataset: Dataset
    decode: Callable[[list[int]], str] | None = None
    annotations: str | Path | None = None


def train(
    cfg: CfgNode,
    output_dir: str | Path,
    ctx: DistContext,
    model: nn.Module,
    train_set: Dataset,
    collate_fn: Callable,
    resume: bool = False,
    validation: Validation | None = None,
) -> Path | None:
    """Train ``model`` (built, on the CPU, seeded identically on every rank) for
    ``cfg.OPTIM.NUM_ITERATIONS`` iterations; returns the path of the final checkpoint."""
    output_dir = Path(output_dir)
    training = build_training(cfg, ctx, model)
    manager = CheckpointManager(output_dir, cfg.ENGINE.KEEP_LAST_CHECKPOINTS, cfg.ENGINE.PINNED_CHECKPOINTS)
    seed_everything(cfg.RANDOM_SEED + ctx.rank)
    start = start_or_resume(training, manager, output_dir, resume)
    if ctx.is_main:
        write_text_atomic(output_dir / "config.yaml", cfg.dump())
    if start >= cfg.OPTIM.NUM_ITERATIONS:
        logger.info("nothing to do: the run already reached iteration %d", start)
        return checkpoint_path(output_dir, start) if start else None
    compilation = decide_compile(cfg.ENGINE.COMPILE, ctx.device, cfg.OPTIM.NUM_ITERATIONS - start,
                                 cfg.ENGINE.COMPILE_MIN_ITERATIONS)
    if compilation.compile:
        training.compile()
    loop = PretrainingLoop(training, manager, output_dir, train_set, collate_fn, start, validation, compilation)
    return loop.run()


class PretrainingLoop:
    """The iterations of one run from ``start + 1`` to ``OPTIM.NUM_ITERATIONS``."""

    def __init__(
        self,
        training: Training,
        manager: CheckpointManager,
        output_dir: Path,
        train_set: Dataset,
        collate_fn: Callable,
        start: int,
        validation: Validation | None,
        compilation: CompileDecision,
    ):
        self.training, self.cfg, self.ctx = training, training.cfg, training.ctx
        self.manager, self.output_dir = manager, output_dir
        self.collate_fn, self.start, self.validation = collate_fn, start, validation
        self.compilation = compilation
        self.num_iterations = self.cfg.OPTIM.NUM_ITERATIONS
        self.loader = self._train_loader(train_set)
        self.last_saved = checkpoint_path(output_dir, start) if start else None
        # Only captioning models write captions; the classification and masked-LM baselines of
        # the paper are validated on their loss alone.
        self.caption_metrics = (
            validation is not None and validation.decode is not None and validation.annotations is not None
            and self.cfg.ENGINE.VAL_CAPTION_METRICS and isinstance(training.model, CaptioningModel)
        )
        self.references = load_references(validation.annotations) if self.caption_metrics else None
        self.monitor = TrainingMonitor(output_dir, self.ctx.is_main, start, self.num_iterations)

    def _train_loader(self, train_set: Dataset) -> DataLoader | StreamLoader:
        """Batches of iterations ``start + 1`` onwards: each depends only on (seed, iteration, rank);
        from shards (an iterable dataset), the stream continues where the checkpoint left it."""
        cfg, ctx = self.cfg, self.ctx
        if isinstance(train_set, IterableDataset):
            return StreamLoader(train_set, cfg, ctx, self.collate_fn, saved_stream_state(self.output_dir, self.start))
        sampler = IterationBatchSampler(
            len(train_set), cfg.OPTIM.BATCH_SIZE, ctx.rank, ctx.world_size, cfg.RANDOM_SEED, self.num_iterations,
            self.start,
        )
        return DataLoader(
            SeededDataset(train_set),
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=cfg.DATA.NUM_WORKERS,
            pin_memory=ctx.device.type != "cpu",
            generator=torch.Generator().manual_seed(cfg.RANDOM_SEED + ctx.rank),  # keeps the global RNG untouched
            worker_init_fn=ignore_stop_signals,
        )

    def run(self) -> Path | None:
        """Train to the last iteration (or to a SIGTERM); returns the newest checkpoint."""
        cfg, training = self.cfg, self.training
        stop = StopSignal()
        logger.info(
            "training iterations %d..%d: %d rank(s) × %d images on %s, precision %s, allocator %s, torch.compile %s "
            "(%s)",
            self.start + 1, self.num_iterations, self.ctx.world_size, cfg.OPTIM.BATCH_SIZE // self.ctx.world_size,
            self.ctx.device, training.dtype or torch.float32, allocator_in_use(),
            "on" if self.compilation.compile else "off", self.compilation.reason,
        )
        try:
            with batches_of(self.loader) as batches:
                return self._train(batches, stop)
        finally:
            stop.restore()
            self.monitor.close()

    def _train(self, batches: Iterator[dict], stop: StopSignal) -> Path | None:
        """The iterations after ``self.start``, until the last or until a stop signal."""
        cfg, training = self.cfg, self.training
        tick = time.perf_counter()
        for iteration in range(self.start + 1, self.num_iterations + 1):
            batch = training.move(next(batches))
            data_time = time.perf_counter() - tick
            losses, grad_norm, stop_agreed = self._step(iteration, batch, stop.received)
            step_time = time.perf_counter() - tick
            if iteration == self.start + 1 and training.compiled:
                logger.info("torch.compile: the first step took %.1f s, compilation included", step_time)
            self._log(iteration, losses, grad_norm, step_time, data_time)
            finished = iteration == self.num_iterations
            if stop_agreed or finished or iteration % cfg.ENGINE.CHECKPOINT_PERIOD == 0:
                self.last_saved = self.save(iteration)
            if stop_agreed:
                logger.warning("%s received: saved %s and stopping; continue with --resume", stop.name or "stop signal",
                               self.last_saved)
                break
            if self.validation is not None and cfg.ENGINE.VAL_PERIOD and (
                finished or iteration % cfg.ENGINE.VAL_PERIOD == 0
            ):
                self.validate(iteration)
            tick = time.perf_counter()
        return self.last_saved

    def _step(self, iteration: int, batch: dict, stop_requested: bool) -> tuple[dict, torch.Tensor, bool]:
        """Forward and backward, the ranks' agreement, then the optimizer step; returns losses,
        gradient norm and whether all ranks stop after this iteration (a SIGTERM on any of them).
        A non-finite loss on any rank raises on all of them, at the same iteration."""
        losses = self.training.forward_backward(batch)
        nonfinite, stop_agreed = agree_on_stopping(losses["loss"], stop_requested)
        if nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {iteration} "
                f"({', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())}); stopping without "
                f"saving. Last good checkpoint: {self.last_saved or 'none'}"
            )
        return losses, self.training.optimizer_step(), stop_agreed

    def _log(self, iteration: int, losses: dict, grad_norm: torch.Tensor, step_time: float, data_time: float) -> None:
        """Feed the monitor every iteration; write scalars and a log line every ``LOG_PERIOD``."""
        cfg, monitor = self.cfg, self.monitor
        monitor.update(**{k: float(v) for k, v in losses.items()})
        lr = {group["name"]: group["lr"] for group in self.training.optimizer.param_groups}
        images_per_s = cfg.OPTIM.BATCH_SIZE / step_time
        monitor.step(iteration, lr, images_per_s)
        if iteration % cfg.ENGINE.LOG_PERIOD and iteration != self.num_iterations:
            return
        smoothed = monitor.smoothed()
        scalars = {f"loss/{k}": v for k, v in smoothed.items()}
        scalars.update({f"lr/{k}": v for k, v in lr.items()})
        scalars.update({"throughput/images_per_s": images_per_s, "time/step_s": step_time,
                        "time/data_s": data_time, "grad_norm": float(grad_norm)})
        if self.training.scaler.is_enabled():
            scalars["amp/loss_scale"] = self.training.scaler.get_scale()
        monitor.write_scalars(iteration, scalars)
        logger.info(
            "iteration %d: %s, lr %s, %.2f images/s, data %.3f s",
            iteration, monitor.loss_summary(),
            ", ".join(f"{k} {v:.3g}" for k, v in lr.items()), images_per_s, data_time,
        )

    def save(self, iteration: int) -> Path:
        """A checkpoint of every rank's RNG state (and shard stream position) and rank 0's model
        and optimisation state."""
        rng_states = all_gather_objects(get_rng_state())
        stream = {"data": self.loader.state_dict()} if isinstance(self.loader, StreamLoader) else {}
        path = checkpoint_path(self.output_dir, iteration)
        if self.ctx.is_main:
            state = {**self.training.state_dict(), "rng": rng_states, "config": self.cfg.dump(),
                     "world_size": self.ctx.world_size, **stream}
            path = self.manager.save(iteration, state)
            logger.info("saved %s", path)
        barrier()
        return path

    def validate(self, iteration: int) -> None:
        """Val metrics, leaving the RNG states as they were so that validation does not change
        the training trajectory (a resumed run skips the validation an uninterrupted run did)."""
        cfg, ctx, val_set = self.cfg, self.ctx, self.validation.dataset
        rng_state = get_rng_state()
        if isinstance(val_set, IterableDataset):
            loader = val_stream_batches(val_set, cfg, ctx, self.collate_fn)
        else:
            loader = DataLoader(
                SeededDataset(val_set),
                batch_sampler=val_batches(len(val_set), cfg.OPTIM.BATCH_SIZE // ctx.world_size, ctx.rank, ctx.world_size),
                collate_fn=self.collate_fn,
                num_workers=cfg.DATA.NUM_WORKERS,
                worker_init_fn=ignore_stop_signals,
            )
        with batches_of(loader) as batches:
            results = evaluate(
                self.training.model, batches, ctx, self.training.move,
                self.validation.decode if self.caption_metrics else None, self.references,
                cfg.DATA.EOS_INDEX, first_word_index(cfg.DATA), self.training.autocast,
            )
        set_rng_state(rng_state)
        logger.info("iteration %d validation: %s", iteration, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        self.monitor.write_scalars(iteration, results)


def run_pretraining(cfg: CfgNode, output_dir: str | Path, resume: bool = False) -> Path:
    """Build tokenizer, datasets and model from ``cfg`` and :func:`train` them, in this process
    or as one rank of a ``torchrun`` job; returns the final checkpoint's path."""
    ensure_writable_directory(output_dir)  # before any process group, data or model is built
    ctx = init_distributed()
    try:
        check_world_size(cfg, ctx.world_size)  # a config value that only the world size can refuse
        setup_logging(output_dir, ctx.rank)
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
        torch.backends.cudnn.deterministic = cfg.CUDNN_DETERMINISTIC
        check_pretraining_data(cfg, main=ctx.is_main)  # every data problem at once, before anything is built
        tokenizer = SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL)
        train_set = build_dataset(cfg, "train", tokenizer)
        val_set = build_dataset(cfg, "val", tokenizer) if cfg.ENGINE.VAL_PERIOD else None
        seed_everything(cfg.RANDOM_SEED)  # identical initial weights on every rank
        model = build_model(cfg)
        validation = None
        if val_set is not None:
            # From shards there is no COCO captions file to score against: val loss only.
            annotations = Path(cfg.DATA.ROOT) / "annotations" / "captions_val2017.json" if cfg.DATA.FORMAT == "coco" else None
            validation = Validation(val_set, tokenizer.decode, annotations)
        return train(cfg, output_dir, ctx, model, train_set, collate_fn, resume, validation)
    finally:
        shutdown_distributed()
