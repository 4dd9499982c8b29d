"""Whether a run trains with a ``torch.compile``-d step (``ENGINE.COMPILE``), and why.

Compiling costs time once, at the first steps (the forward and the backward graphs are traced and
their kernels built), and then saves a share of every step. ``auto`` (the default) compiles only
when the run has at least ``ENGINE.COMPILE_MIN_ITERATIONS`` iterations left, the number after
which the saving has repaid the compilation with room to spare on the CPUs we measured
(docs/benchmarks.md), and when the device has what ``torch.compile`` builds its kernels with (a
C++ compiler for CPU kernels, Triton for GPU ones). Short runs, tests and the demo stay eager.
``True`` compiles whatever the run's length; ``False`` never does. A step that fails to compile
falls back to the eager step (:meth:`pretrain.engine.setup.Training.forward_backward`).
"""
from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompileDecision:
    """Whether to compile, and the reason the first log line gives."""

    compile: bool
    reason: str


def compiler_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None when it can."""
    if device.type == "cpu":
        if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
            return "no C++ compiler (g++, c++ or clang++) on PATH for its CPU kernels"
        return None
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton, which builds its GPU kernels, is not installed"
    return None


def decide_compile(setting: str, device: torch.device, iterations_left: int, min_iterations: int) -> CompileDecision:
    """The decision for ``ENGINE.COMPILE`` = ``setting`` (``auto``, ``true`` or ``false``, as
    :func:`pretrain.config.load_config` leaves it) on a run with ``iterations_left`` to go."""
    if setting == "false":
        return CompileDecision(False, "ENGINE.COMPILE False")
    missing = compiler_missing(device)
    if missing is not None:
        return CompileDecision(False, f"ENGINE.COMPILE {setting}, but {missing}")
    if setting == "true":
        return CompileDecision(True, "ENGINE.COMPILE True")
    if iterations_left < min_iterations:
        return CompileDecision(
            False, f"ENGINE.COMPILE auto: {iterations_left} iterations left, fewer than the "
                   f"ENGINE.COMPILE_MIN_ITERATIONS {min_iterations} that repay the compilation",
        )
    return CompileDecision(
        True, f"ENGINE.COMPILE auto: {iterations_left} iterations left, at least ENGINE.COMPILE_MIN_ITERATIONS "
              f"{min_iterations}",
    )
