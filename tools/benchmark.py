#!/usr/bin/env python
"""Speed and memory of pretraining and fine-tuning, on the machine at hand.

    python tools/benchmark.py pretrain --config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml \\
        --batch-size 8 --image-size 224 --iters 6 --warmup 2 --json OUT.json
    python tools/benchmark.py decoder --config configs/width_ablations/bicaptioning_R_50_L1_H2048.yaml
    python tools/benchmark.py data --config CFG DATA.ROOT datasets/coco --batch-size 32 --workers 4
    python tools/benchmark.py data --format webdataset --config CFG DATA.SHARDS datasets/coco_shards/train/shards.txt \\
        --batch-size 32 --workers 4
    DETECTRON2_DATASETS=datasets/builtin python tools/benchmark.py finetune \\
        --config configs/detectron2/builtin/lvis_segm_R_18_FPN_builtin.yaml --threads 1 --iters 10 --warmup 5
    python tools/benchmark.py pretrain --config configs/vit/bicaptioning_ViT_B_16_L1_H768.yaml --batch-size 8
    DETECTRON2_DATASETS=datasets/builtin python tools/benchmark.py finetune \\
        --config configs/detectron2/builtin/lvis_segm_ViTDet_T_builtin.yaml --threads 1 --iters 10 --warmup 5

``pretrain`` times full training steps (forward, backward, clipping, optimizer, schedule: the
functions of the training loop) on a synthetic batch like the official baseline's (N(0,1) images,
caption lengths 20..30 padded to the longest, token ids in [4, vocab)). Defaults are the settings
recommended for training: the precision that training with the config uses (``AMP`` and
``AMP_DTYPE``; with AMP on, fp16 on accelerators, bf16 on CPUs with native bf16, fp32 on other
CPUs), channels-last, fused optimizer, tcmalloc or else tuned glibc
malloc (the script re-executes itself with it unless ``MALLOC_MMAP_MAX_`` is set).
``--official-baseline`` measures the official-equivalent step instead (as timed in the official
notes): contiguous layout, ``torch.optim.SGD`` over one group with its default implementation,
no Lookahead, clipping or schedule, fp32 unless ``--precision`` says otherwise. ``decoder`` times
forward + backward of one textual head on those captions, the padded decoder against the packed
one that training uses. ``data`` measures DataLoader throughput on the configured dataset
through the training loop's sampler, or with ``--format webdataset`` through its shard stream
(peak memory: the main process and, separately, the largest worker). ``finetune`` times
detectron2 training steps of a transfer config as ``tools/train_net.py`` runs them (its data loader, model and optimizer, data loading
included; random init, since the weights do not change the cost) on the dataset the config
trains on, with the config's recipe (ViTDet's AdamW and large-scale jitter for the ViTDet configs;
AMP only with CUDA; the result's ``recipe`` lists the loader and optimizer it built). A ViT pretraining config (``MODEL.VISUAL.NAME timm::...``) is timed like any
other, at ``--image-size``. Results go to the terminal and, with ``--json``, to a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from logging.handlers import BufferingHandler

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.malloc import (  # standard library only: runs before torch loads
    allocator_in_use,
    reexec_with_tuned_malloc,
)
from virtex_d2.cli import run_tool  # standard library only

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("pretrain", "decoder", "data", "finetune"):
        mode = modes.add_parser(name)
        detectron2 = name == "finetune"
        mode.add_argument("--config", required=True, help="detectron2 config YAML" if detectron2 else "pretraining config YAML")
        batch_size = 2 if detectron2 else 8  # the CPU transfer configs' SOLVER.IMS_PER_BATCH
        mode.add_argument("--batch-size", type=int, default=batch_size, help=f"images per step (default {batch_size})")
        mode.add_argument("--iters", type=int, default=6, help="timed iterations (default 6)")
        mode.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
        mode.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
        mode.add_argument("--json", help="write the results to this file")
        mode.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="config overrides")
    train = modes.choices["pretrain"]
    train.add_argument("--image-size", type=int, default=224, help="square image side (default 224)")
    train.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto = what training with the config uses (AMP, AMP_DTYPE): with AMP on, fp16 + GradScaler "
                            "on accelerators, bf16 on CPUs with native bf16, else fp32")
    train.add_argument("--no-channels-last", action="store_true", help="keep the CNN in contiguous layout")
    train.add_argument("--compile", nargs="?", const="true", default=None, choices=("auto", "true", "false"),
                       help="torch.compile the step (default: the config's ENGINE.COMPILE, auto unless set); auto "
                            "decides as for a run of the config's OPTIM.NUM_ITERATIONS; --compile alone = true")
    train.add_argument("--no-official", action="store_true",
                       help="skip the official step at its best that is otherwise timed after ours in the same run")
    train.add_argument("--official-baseline", action="store_true",
                       help="official-equivalent step: contiguous, plain SGD, fp32 unless --precision is given")
    train.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is present")
    modes.choices["decoder"].add_argument("--visual-tokens", type=int, default=49,
                                          help="decoder memory length (default 49: 7x7 features of 224 px)")
    modes.choices["finetune"].add_argument("--compile", action="store_true",
                                           help="torch.compile the detectron2 model (to see whether it pays)")
    modes.choices["data"].add_argument("--workers", type=int, default=None, help="DataLoader workers (default: config)")
    modes.choices["data"].add_argument("--format", choices=("coco", "webdataset"), default=None,
                                       help="DATA.FORMAT: the COCO folder or the shards of DATA.SHARDS (default: config)")
    return parser.parse_args(argv)


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process, or with ``RUSAGE_CHILDREN`` of its largest ended
    child (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale / 2**30


def synthetic_batch(batch_size: int, image_size: int, vocab_size: int, max_length: int, generator) -> dict:
    """N(0,1) images and random captions of 20..30 tokens (capped at ``max_length``), padded."""
    import torch

    lengths = torch.randint(min(20, max_length), min(30, max_length) + 1, (batch_size,), generator=generator)
    tokens = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)
    reversed_tokens = torch.zeros_like(tokens)
    for i, length in enumerate(lengths.tolist()):
        words = torch.randint(4, vocab_size, (length,), generator=generator)
        tokens[i, :length] = words
        reversed_tokens[i, :length] = words.flip(0)
    return {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "caption_tokens": tokens,
        "noitpac_tokens": reversed_tokens,
        "caption_lengths": lengths,
        "image_id": torch.arange(batch_size),
    }


def timed(fn, iters: int, warmup: int, sync) -> list[float]:
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def matmul_peak_tflops(device, dtype, size: int = 2048, iters: int = 6) -> float:
    """What this machine's matmul reaches in ``dtype`` with the threads given: the limit a
    training step's share is measured against (a square ``size`` matmul, best of ``iters``)."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.accelerator.synchronize if device.type != "cpu" else (lambda: None)
    best = min(timed(lambda: torch.mm(a, b), iters, 2, sync))
    return 2 * size**3 / best / 1e12


def step_flops(step) -> float:
    """Matmul and convolution FLOPs of one call of ``step`` (forward and backward), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def official_step(cfg, device, dtype, batch):
    """The official loop's step on a fresh model: plain SGD over one group, no schedule,
    clipping or Lookahead, contiguous layout; fp32, or autocast to ``dtype``."""
    import torch

    from pretrain.distributed import seed_everything
    from pretrain.engine.step import forward_backward
    from pretrain.precision import make_autocast
    from pretrain.tasks import build_model

    seed_everything(cfg.RANDOM_SEED)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.OPTIM.LR, momentum=cfg.OPTIM.SGD_MOMENTUM,
                                weight_decay=cfg.OPTIM.WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = make_autocast(device, dtype)
    losses = []

    def step():
        losses.append(float(forward_backward(model, batch, scaler, autocast)["loss"]))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step, losses


def our_step(cfg, device, dtype, channels_last, compile_model, batch, batch_size):
    """The training loop's own step (its set-up, precision and layout) on a fresh model, and
    the FLOPs of one eager step of it."""
    from pretrain.distributed import DistContext, seed_everything
    from pretrain.engine.setup import build_training
    from pretrain.engine.step import forward_backward
    from pretrain.tasks import build_model

    seed_everything(cfg.RANDOM_SEED)
    cfg.defrost()
    cfg.ENGINE.GRAD_ACCUM_STEPS = 1
    cfg.OPTIM.BATCH_SIZE = batch_size
    training = build_training(cfg, DistContext(rank=0, local_rank=0, world_size=1, device=device), build_model(cfg),
                              dtype=dtype, channels_last=channels_last)
    flops = step_flops(lambda: forward_backward(training.eager_model, batch, training.scaler, training.autocast))
    training.optimizer.zero_grad(set_to_none=True)
    if compile_model:
        training.compile()
    losses = []

    def step():
        losses.append(float(training.forward_backward(batch)["loss"]))
        training.optimizer_step()

    return step, losses, flops, training


def bench_pretrain(args, cfg) -> dict:
    """Our step (or, with ``--official-baseline``, only the official one) and, in the same run,
    the official step at its best: bf16 autocast where the CPU computes bf16 natively (else
    fp32), with this process's allocator; ``speedup_vs_official_best`` compares the two."""
    import torch

    from pretrain.distributed import make_batch_mover, select_device
    from pretrain.engine.compile import decide_compile
    from pretrain.precision import autocast_dtype, cpu_has_native_bf16

    device = select_device(0, force_cpu=args.cpu)
    baseline = args.official_baseline
    if args.precision == "auto":
        dtype = None if baseline else autocast_dtype(cfg.AMP, device, cfg.AMP_DTYPE)
    else:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    channels_last = not (baseline or args.no_channels_last)
    batch = make_batch_mover(device, channels_last)(
        synthetic_batch(args.batch_size, args.image_size, cfg.DATA.VOCAB_SIZE, cfg.DATA.MAX_CAPTION_LENGTH,
                        torch.Generator().manual_seed(cfg.RANDOM_SEED))
    )
    sync = torch.accelerator.synchronize if device.type != "cpu" else (lambda: None)
    # A benchmark stands for a long training run: "auto" decides as for the config's full length.
    setting = "false" if baseline else args.compile or cfg.ENGINE.COMPILE
    compilation = decide_compile(setting, device, cfg.OPTIM.NUM_ITERATIONS,
                                 cfg.ENGINE.COMPILE_MIN_ITERATIONS)
    if baseline:
        step, losses = official_step(cfg, device, dtype, batch)
        flops = step_flops(step)
    else:
        step, losses, flops, training = our_step(cfg, device, dtype, channels_last, compilation.compile, batch,
                                                 args.batch_size)
    start = time.perf_counter()
    step()  # the first warm-up step, which holds the compilation when compiled
    sync()
    first_step_s = time.perf_counter() - start
    times = timed(step, args.iters, max(args.warmup - 1, 0), sync)
    median = statistics.median(times)
    peak = matmul_peak_tflops(device, dtype or torch.float32)
    result = {
        "mode": "pretrain",
        "official_baseline": baseline,
        "precision": str(dtype or torch.float32).replace("torch.", ""),
        "channels_last": channels_last,
        "compile": compilation.compile,
        "compile_reason": compilation.reason,
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_all": times,
        "images_per_s": args.batch_size / median,
        "peak_rss_gib": peak_rss_gib(),
        "first_loss": losses[0],
        "tflop_per_step": flops / 1e12,
        "matmul_peak_tflops": peak,
        "matmul_share": flops / median / 1e12 / peak,
    }
    if compilation.compile:
        result["compile_s"] = first_step_s - median
        result["compiled_at_the_end"] = training.compiled
    if device.type != "cpu":
        result["peak_device_memory_gib"] = torch.accelerator.max_memory_allocated() / 2**30
    if not (baseline or args.no_official):
        del step, training
        best = (torch.bfloat16 if cpu_has_native_bf16() else None) if device.type == "cpu" else torch.float16
        official, _ = official_step(cfg, device, best, make_batch_mover(device, False)(batch))
        official_times = timed(official, args.iters, args.warmup, sync)
        result["official_best"] = {
            "precision": str(best or torch.float32).replace("torch.", ""),
            "step_s_median": statistics.median(official_times),
            "step_s_all": official_times,
        }
        result["speedup_vs_official_best"] = statistics.median(official_times) / median
    return result


def bench_decoder(args, cfg) -> dict:
    """Forward + backward of one textual head on the synthetic captions, padded decoder
    (``hidden_states``) against packed (``teacher_forced_hidden_states``), alternating steps in
    one process so that both see the same machine state; fp32 on the CPU."""
    import torch

    from pretrain.models.captioning import gathered_cross_entropy
    from pretrain.models.factory import build_transformer_head

    torch.manual_seed(cfg.RANDOM_SEED)
    head = build_transformer_head(cfg)
    batch = synthetic_batch(args.batch_size, 32, cfg.DATA.VOCAB_SIZE, cfg.DATA.MAX_CAPTION_LENGTH,
                            torch.Generator().manual_seed(cfg.RANDOM_SEED))
    tokens = batch["caption_tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    memory = torch.randn(args.batch_size, args.visual_tokens, head.hidden_size, requires_grad=True)

    paths = {
        "padded": lambda: gathered_cross_entropy(head, head.hidden_states(memory, inputs), targets),
        "packed": lambda: gathered_cross_entropy(head, *head.teacher_forced_hidden_states(memory, inputs, targets)),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.warmup + args.iters):
        for name, loss in paths.items():
            start = time.perf_counter()
            loss().backward()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
            head.zero_grad(set_to_none=True)
            memory.grad = None
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "mode": "decoder",
        "padded_s_median": medians["padded"],
        "packed_s_median": medians["packed"],
        "padded_s_all": times["padded"],
        "packed_s_all": times["packed"],
        "speedup": medians["padded"] / medians["packed"],
        "real_token_fraction": float((targets != 0).sum() / targets.numel()),
    }


def bench_data(args, cfg) -> dict:
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from pretrain.data import collate_fn
    from pretrain.distributed import DistContext
    from pretrain.engine.sampling import IterationBatchSampler, SeededDataset
    from pretrain.engine.streaming import StreamLoader
    from pretrain.tasks import build_dataset
    from pretrain.tokenizer import SentencePieceBPETokenizer

    dataset = build_dataset(cfg, "train", SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL))
    workers = cfg.DATA.NUM_WORKERS if args.workers is None else args.workers
    if isinstance(dataset, IterableDataset):  # the training loop's shard stream, as one rank
        cfg.defrost()
        cfg.OPTIM.BATCH_SIZE, cfg.DATA.NUM_WORKERS = args.batch_size, workers
        loader = StreamLoader(dataset, cfg, DistContext(0, 0, 1, torch.device("cpu")), collate_fn, None)
    else:
        sampler = IterationBatchSampler(len(dataset), args.batch_size, 0, 1, cfg.RANDOM_SEED, args.warmup + args.iters)
        loader = DataLoader(SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers)
    batches = iter(loader)
    times = timed(batches.__next__, args.iters, args.warmup, lambda: None)
    main_rss = peak_rss_gib()
    del batches  # joins the workers, so that their peak memory is known
    return {
        "mode": "data",
        "format": cfg.DATA.FORMAT,
        "workers": workers,
        "batch_s_median": statistics.median(times),
        "images_per_s": args.batch_size * len(times) / sum(times),
        "peak_rss_gib": main_rss,
        "peak_worker_rss_gib": peak_rss_gib(resource.RUSAGE_CHILDREN) if workers else None,
    }


def bench_finetune(args) -> dict:
    import torch
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from detectron2_ext import load_config
    from detectron2_ext.compat import adapt_config_to_devices
    from detectron2_ext.datasets import check_dataset_files, check_datasets_root
    from detectron2_ext.vit_training import (
        build_recipe_optimizer,
        build_recipe_train_loader,
        disable_amp_without_cuda,
    )

    cfg = load_config(args.config, [*args.overrides, "MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", str(args.batch_size)])
    adapt_config_to_devices(cfg, world_size=1)
    disable_amp_without_cuda(cfg)
    check_datasets_root()
    check_dataset_files(cfg.DATASETS.TRAIN)
    seed_all_rng(max(cfg.SEED, 0))  # the same images in the same order on every run
    model = build_model(cfg)
    trained = torch.compile(model) if args.compile else model
    recipe = BufferingHandler(capacity=100)  # what the recipe's builders say they built, for the result
    recipe_logger = logging.getLogger("detectron2_ext.vit_training")
    recipe_logger.addHandler(recipe)
    recipe_logger.setLevel(logging.INFO)
    try:
        trainer = SimpleTrainer(trained, build_recipe_train_loader(cfg), build_recipe_optimizer(cfg, model))
    finally:
        recipe_logger.removeHandler(recipe)

    def step():
        trainer.run_step()
        trainer.iter += 1

    with EventStorage() as trainer.storage:
        times = timed(step, args.iters, args.warmup, lambda: None)
        first_loss = trainer.storage.history("total_loss").values()[0][0]
    median = statistics.median(times)
    return {
        "mode": "finetune",
        "device": cfg.MODEL.DEVICE,
        "compile": args.compile,
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_all": times,
        "images_per_s": args.batch_size / median,
        "peak_rss_gib": peak_rss_gib(),
        "first_loss": first_loss,
        "recipe": [record.getMessage() for record in recipe.buffer],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pretrain.config import load_config
    from pretrain.files import write_json_atomic
    from pretrain.precision import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    if args.mode == "finetune":
        result = bench_finetune(args)
    else:
        overrides = list(args.overrides)
        if args.mode == "pretrain":
            overrides += ["DATA.IMAGE_CROP_SIZE", str(args.image_size)]
        if args.mode == "data" and args.format:
            overrides += ["DATA.FORMAT", args.format]
        cfg = load_config(args.config, overrides)
        result = {"pretrain": bench_pretrain, "decoder": bench_decoder, "data": bench_data}[args.mode](args, cfg)
    result.update({
        "config": args.config,
        "overrides": args.overrides,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "allocator": allocator_in_use(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
        **({"image_size": args.image_size} if args.mode == "pretrain" else {}),
    })
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    reexec_with_tuned_malloc()
    sys.exit(run_tool("benchmark", main))
