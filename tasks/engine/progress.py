"""Progress inside a chunk, at a sensible rate, never per batch.

- In a terminal: one live line (``rich``) under the log, by epoch and, in long epochs, by batch:
  done, total, loss, rate, time to the next checkpoint, ETA. It is drawn on the console of
  Prefect's own log handler, so log lines print above it, and it vanishes when the chunk ends
  (the chunk's log line stays).
- Not a terminal (a pipe, a file, a worker): no live line; the same figures as a log line every
  ``LOG_EVERY`` seconds, so a long chunk is never silent.
- Either way, ``report(percent, text)`` (the Prefect progress artifact) every ``REPORT_EVERY`` s.

The training loop calls :meth:`ChunkProgress.batch` after each step: one call and a clock read,
and nothing more until a tick is due (``benchmarks/progress_overhead.py`` measures it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tasks.storage.history import duration

#: Seconds between refreshes of the terminal line.
TICK = 0.5
#: Seconds between log lines when output is not a terminal.
LOG_EVERY = 10.0
#: Terminal columns from which the line also draws a bar (in 80, the figures need them all).
WIDE = 120
#: Seconds between updates of the progress artifact.
REPORT_EVERY = 5.0


def live_line(console: Any | None) -> Any | None:
    """A one-line rich ``Progress`` on ``console`` (None without one): where, a bar if the
    terminal is wide, the figures. Refreshed by hand: no thread competes with training."""
    if console is None:
        return None
    from rich.progress import BarColumn, Progress, TextColumn

    if console.width >= WIDE:
        bar = BarColumn(12, style="grey37", complete_style="cyan", finished_style="cyan", pulse_style="cyan")
        columns = [TextColumn("{task.description}"), bar, TextColumn("{task.fields[figures]}")]
    else:  # one column: a narrow terminal cuts the line's end, not each part
        columns = [TextColumn("{task.description}  {task.fields[figures]}")]
    return Progress(*columns, console=console, auto_refresh=False, transient=True)


@dataclass(frozen=True)
class Watchers:
    """Who watches a chunk train: the run's logger, the Prefect progress artifact
    (``report(percent, text)``), and a terminal's rich console for the live line (None: log
    lines instead)."""

    logger: Any
    report: Callable[[float, str], None] | None = None
    console: Any | None = None


class ChunkProgress:
    """Progress of one chunk: epochs ``start``..``end`` (exclusive) of ``epochs``, with
    ``steps`` batches of ``batch_size`` samples per epoch."""

    def __init__(self, start: int, end: int, epochs: int, steps: int, batch_size: int, watchers: Watchers,
                 skip: int = 0):
        self.start, self.end, self.epochs, self.skip = start, end, epochs, skip
        self.steps, self.batch_size, self.log, self.report = steps, batch_size, watchers.logger, watchers.report
        self.epoch, self.loss = start, float("nan")  # the epoch in progress (0-based), its last known loss
        self.t0 = time.monotonic()
        self.next_tick, self.next_log, self.next_report = self.t0 + TICK, self.t0 + LOG_EVERY, self.t0 + REPORT_EVERY
        self.live = live_line(watchers.console)
        if self.live is not None:
            self.bar = self.live.add_task(f"epoch {start + 1}/{epochs}", total=float(epochs) * steps, figures="")

    def __enter__(self) -> ChunkProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def batch(self, done: int, loss_sum: torch.Tensor) -> None:
        """After ``done`` batches of the current epoch, whose losses add up to ``loss_sum``."""
        now = time.monotonic()
        if now >= self.next_tick:
            self.tick(now, done, loss_sum)

    def epoch_done(self, epoch: int, train_loss: float) -> None:
        """Epoch ``epoch`` (0-based) is complete, with mean batch loss ``train_loss``."""
        self.epoch, self.loss = epoch + 1, train_loss
        now = time.monotonic()
        if now >= self.next_tick and self.epoch < self.end:
            self.tick(now, 0, None)

    def tick(self, now: float, done: int, loss_sum: torch.Tensor | None) -> None:
        self.next_tick = now + TICK
        if loss_sum is not None and done:
            self.loss = float(loss_sum) / done  # one device sync per tick, not per batch
        # batches/s trained by this chunk: after a resume inside an epoch, its first ``skip``
        # batches were done before and took no time here
        rate = max((self.epoch - self.start) * self.steps + done - self.skip, 0) / max(now - self.t0, 1e-9)
        where, figures = self.position(done, rate), self.figures(done, rate)
        if self.live is not None:
            self.draw(float(self.epoch) * self.steps + done, where, figures)
        elif now >= self.next_log:
            self.next_log = now + LOG_EVERY
            self.log.info("%s: %s", where, figures)
        if self.report is not None and now >= self.next_report:
            self.next_report = now + REPORT_EVERY
            self.report(100.0 * (self.epoch + done / self.steps) / self.epochs, f"{where}, {figures}")

    def draw(self, completed: float, where: str, figures: str) -> None:
        """Refresh the terminal line; a display that fails falls back to log lines, never stops training."""
        try:
            self.live.update(self.bar, completed=completed, description=where, figures=figures)
            self.live.refresh()
        except Exception as exc:  # noqa: BLE001
            self.live.stop()
            self.live = None
            self.log.warning("progress display failed (%s: %s); progress goes to the log", type(exc).__name__, exc)

    def position(self, done: int, rate: float) -> str:
        """``epoch 3/10 batch 212/468`` in a long epoch (under one a second), else ``epoch 1601/3000``."""
        if done and rate < self.steps:
            return f"epoch {self.epoch + 1}/{self.epochs} batch {done}/{self.steps}"
        return f"epoch {self.epoch + (1 if done else 0)}/{self.epochs}"

    def figures(self, done: int, rate: float) -> str:
        """``ETA 2m 13s, checkpoint in 41s, train loss 0.331, 2950 samples/s``, most wanted first:
        a narrow terminal cuts the end (the loss: this epoch's mean so far)."""
        to_checkpoint = (self.end - self.epoch) * self.steps - done  # batches
        to_end = (self.epochs - self.epoch) * self.steps - done
        return (f"ETA {duration(to_end / rate if rate else None)}, "
                f"checkpoint in {duration(to_checkpoint / rate if rate else None)}, "
                f"train loss {self.loss:.4g}, {rate * self.batch_size:.0f} samples/s")
