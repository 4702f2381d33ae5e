"""The per-epoch history on disk (``history.csv`` and the checkpoints' own copy) and the time
it takes. Free of Prefect: training writes the CSV, reporting reads it."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from tasks.kernel import atomic_write_text
from tasks.storage.run import Run

log = logging.getLogger("trainflow.history")

HISTORY_FILE = "history.csv"


def write_history_csv(path: Path, history: dict[str, list[float]]) -> None:
    """One row per epoch: ``epoch`` as an integer, the other columns as ``repr`` floats, which
    read back bit-exact."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(history)
    for row in zip(*history.values()):
        writer.writerow(repr(v) if c != "epoch" else int(v) for c, v in zip(history, row))
    atomic_write_text(path, buf.getvalue())


def read_history_csv(path: Path) -> dict[str, list[float]]:
    """``history.csv`` as columns of floats ({} when absent)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except OSError:
        return {}
    return {c: [float(r[c]) for r in rows] for c in reader.fieldnames or []}


def read_history(run: Run) -> dict[str, list[float]]:
    """The per-epoch history of the newest checkpoint. ``history.csv`` is written right after
    each checkpoint; if the process died in between, the checkpoint's own history is used."""
    history = read_history_csv(run.dir / HISTORY_FILE)
    newest = run.store.checkpoints.manifests()[-1:]
    if newest and len(history.get("epoch", [])) < newest[0].epoch + 1:
        try:
            ckpt = run.store.checkpoints.load(newest[0].file)
            history = {k: [float(x) for x in v.tolist()] for k, v in ckpt["history"].items()}
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is training's business
            log.warning("history: %s", exc)
    return history


def duration(seconds: float | None) -> str:
    """``'42s'``, ``'3m 05s'``, ``'1h 02m'``; ``'?'`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def eta_seconds(epochs_done: int, seconds: float, epochs_left: int) -> float | None:
    """Time for ``epochs_left`` more epochs at the pace of the ``epochs_done`` this attempt
    trained in ``seconds`` (None before any: a resumed attempt's saved epochs took no time)."""
    if epochs_done <= 0 or not math.isfinite(seconds):
        return None
    return max(epochs_left, 0) * seconds / epochs_done
