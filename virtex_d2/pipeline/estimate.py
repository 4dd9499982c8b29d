"""How long the demo will take on this machine, said before its first stage starts.

The demo's stages were timed once on a reference CPU (:data:`REFERENCE`); how fast this machine
is against it comes from a probe of about two seconds: training steps of a ResNet-18 at the
demo's image size on every core, the kind of work that dominates the demo. Pretraining and
fine-tuning scale with their iterations, fine-tuning also with the number of initialisations
(two run side by side on two cores); only the stages still to run count. A rough figure, within
about a third either way; the report states what each stage really took.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet18


@dataclass(frozen=True)
class StageCosts:
    """Seconds of each part of the demo on one machine, as ``make demo`` runs them."""

    machine: str
    probe_s: float  # :func:`probe_seconds` there
    # The stages that take about the same time whatever the iterations, by name; the rest are
    # priced per iteration below.
    fixed_s: dict
    pretrain_s_per_iter: float  # the captioning pretraining, on every core
    labels_s_per_iter: float  # the labels control's pretraining, on every core
    finetune_pair_s_per_iter: float  # two fine-tunings side by side, one core each, evaluation included


#: Measured with `time make demo` from a fresh clone (tools/demo.py's stage timings: 897 s of
#: stages at commit fc6e0c1, docs/demo.md) and the probe it printed (0.18 s); the labels
#: pretraining from its supervised-check run (about 0.35 s per iteration on two threads).
REFERENCE = StageCosts(
    machine="2-core AMD EPYC Zen 4 VM (AVX-512), 2026-12-05",
    probe_s=0.18,
    fixed_s={"dataset": 17.4, "vocabulary": 4.0, "captions": 14.7, "caption_eval": 29.3, "attention": 7.0,
             "convert_virtex": 4.5, "convert_random": 4.5, "convert_labels": 4.5, "report": 4.7},
    pretrain_s_per_iter=0.446,
    labels_s_per_iter=0.35,
    finetune_pair_s_per_iter=0.905,
)


def probe_seconds(image_size: int = 128, batch_size: int = 8, steps: int = 3) -> float:
    """Median seconds of a ResNet-18 training step (forward, backward) on this machine's CPU."""
    torch.set_num_threads(os.cpu_count() or 1)
    model, loss_fn = resnet18(num_classes=20), nn.CrossEntropyLoss()
    images, targets = torch.randn(batch_size, 3, image_size, image_size), torch.zeros(batch_size, dtype=torch.long)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss_fn(model(images), targets).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def estimate_seconds(to_run: set, pretrain_iters: int, finetune_iters: int, probe_s: float,
                     reference: StageCosts = REFERENCE) -> float:
    """Seconds the demo's stages named in ``to_run`` take on a machine whose probe took ``probe_s``."""
    r = reference
    finetunings = sum(name.startswith("finetune_") for name in to_run)
    seconds = (sum(r.fixed_s.get(name, 0.0) for name in to_run)
               + ("pretrain" in to_run) * r.pretrain_s_per_iter * pretrain_iters
               + ("pretrain_labels" in to_run) * r.labels_s_per_iter * pretrain_iters
               + r.finetune_pair_s_per_iter * finetune_iters * math.ceil(finetunings / 2))
    return seconds * probe_s / r.probe_s
