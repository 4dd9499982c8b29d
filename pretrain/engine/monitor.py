"""What a run shows and records: per-rank text logs, a progress bar, smoothed meters and
TensorBoard scalars.

Every rank writes ``OUTPUT_DIR/log_rank{r}.txt``; rank 0 also logs to the terminal (through the
progress bar, so lines do not tear it) and owns the TensorBoard writer (events in
``OUTPUT_DIR/tensorboard``).
"""
from __future__ import annotations

import logging
import sys
from collections import deque
from pathlib import Path
from statistics import median

from tqdm import tqdm

LOGGER_NAME = "pretrain"


class _TqdmHandler(logging.StreamHandler):
    """Terminal output that goes above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(output_dir: str | Path, rank: int) -> logging.Logger:
    """Send the ``pretrain`` loggers to ``log_rank{rank}.txt`` and, on rank 0, to the terminal."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(f"[%(asctime)s rank{rank} %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    file_handler = logging.FileHandler(output_dir / f"log_rank{rank}.txt")
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)
    if rank == 0:
        terminal = _TqdmHandler()
        terminal.setFormatter(formatter)
        logger.addHandler(terminal)
    return logger


class SmoothedValue:
    """The last ``window`` values of a series; their median is what the bar, log and TensorBoard
    show, so one slow or noisy iteration does not dominate."""

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return median(self.values)


class TrainingMonitor:
    """Meters, the progress bar and TensorBoard for one run; no-ops for output on ranks > 0."""

    def __init__(self, output_dir: str | Path, is_main: bool, start_iteration: int, num_iterations: int):
        self.is_main = is_main
        self.meters: dict[str, SmoothedValue] = {}
        self.writer = None
        self.bar = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=start_iteration + 1)
            self.bar = tqdm(
                total=num_iterations, initial=start_iteration, desc="pretrain", dynamic_ncols=True, mininterval=1.0
            )

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue()).update(value)

    def step(self, iteration: int, lr: dict[str, float], images_per_s: float) -> None:
        """Advance the bar by one iteration and show loss, learning rates and throughput."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                it=iteration,
                loss=f"{self.meters['loss'].median:.4f}",
                lr=" ".join(f"{v:.3g}" for v in lr.values()),
                img_s=f"{images_per_s:.1f}",
                refresh=False,
            )

    def write_scalars(self, iteration: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()

    def smoothed(self) -> dict[str, float]:
        return {name: meter.median for name, meter in self.meters.items()}

    def loss_summary(self) -> str:
        """The smoothed losses as the log line shows them, saying what they are: each the median
        of its own last iterations, so ``loss`` is not the sum of the per-head medians beside it."""
        window = max((len(meter.values) for meter in self.meters.values()), default=0)
        values = ", ".join(f"{name} {value:.4f}" for name, value in self.smoothed().items())
        return f"{values} (medians of the last {window} iteration{'s' if window != 1 else ''})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
