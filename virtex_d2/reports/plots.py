"""Line plots for reports, written as PNG without a display (matplotlib's Agg backend)."""
from __future__ import annotations

from pathlib import Path


def save_line_plot(lines, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Plot ``lines`` (``(label, xs, ys, marker-or-None)``) on one axis and save it to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xs, ys, marker in lines:
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
