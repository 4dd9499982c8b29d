"""Which numeric precision a run trains in, and the autocast context that applies it.

Shared by the training loop, the benchmark and the evaluation tools, so that all of them pick
the same precision for the same config and device.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, and a bf16 step is several times slower than fp32 (docs/benchmarks.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_dtype(amp: bool, device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """Mixed-precision type for ``cfg.AMP`` / ``cfg.AMP_DTYPE`` on ``device`` (None: fp32).

    ``auto`` picks fp16 (with loss scaling) on accelerators, bf16 (no scaling needed) on CPUs
    with native bf16, and fp32 on other CPUs; ``bf16`` and ``fp16`` are used as asked.
    """
    if not amp:
        return None
    if requested != "auto":
        if requested not in AMP_DTYPES:
            raise ValueError(f"AMP_DTYPE '{requested}' is not one of auto, {', '.join(AMP_DTYPES)}")
        return AMP_DTYPES[requested]
    if device.type != "cpu":
        return torch.float16
    if cpu_has_native_bf16():
        return torch.bfloat16
    logger.info("AMP: this CPU has no native bf16 (AVX512-BF16/AMX), training in fp32; AMP_DTYPE bf16 forces it")
    return None


def make_autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    """A factory of autocast contexts for ``device`` (a no-op context without ``dtype``)."""
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
