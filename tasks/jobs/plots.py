"""Generic plots (PNG, matplotlib, headless). No pyplot: each figure is a private ``Figure``
with an Agg canvas, so plotting never touches a global backend or a display, and is safe in
Prefect's worker threads. Jobs draw with these helpers; the pipeline draws its loss curve here too."""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.kernel import atomic_write_bytes

DPI = 100


def new_figure(width: float = 8, height: float = 4.5) -> Figure:
    """A figure with an Agg canvas (``width`` x ``height`` inches at :data:`DPI`)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_losses(history: dict[str, list[float]], path: Path, title: str) -> Path:
    """Train/validation loss per epoch (log scale when all positive); validation accuracy in
    a second panel when the job has it."""
    epochs = history.get("epoch", [])
    has_acc = bool(history.get("val_accuracy"))
    fig = new_figure(8, 7 if has_acc else 4.5)
    ax = fig.add_subplot(2 if has_acc else 1, 1, 1)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        values = history.get(key)
        if values:
            ax.plot(epochs[: len(values)], values, label=label, linewidth=1.2)
    losses = [v for k in ("train_loss", "val_loss") for v in history.get(k, []) if math.isfinite(v)]
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if losses:
        ax.legend()
    if has_acc:
        ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
        ax2.plot(epochs[: len(history["val_accuracy"])], history["val_accuracy"], color="tab:green",
                 label="validation accuracy")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("accuracy")
        ax2.grid(True, alpha=0.3)
        ax2.legend()
    return save_png(fig, path)
