"""What progress inside a chunk costs a training step: one epoch of ``train_epoch`` with no
``on_batch``, against the same epoch reporting to a live terminal line and to log lines.

    python benchmarks/progress_overhead.py [--rounds N]

The one benchmark here that imports ours' internals: the cost is per batch, so it is measured
where it is paid, on the two extremes of step size (the nonlinear job's 2-parameter model,
batch 16, and FashionMNIST's small_cnn, batch 128, on random images). The three sides run in
turn, the first rotating each round; prints each side's fastest and median epoch time / the plain one's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from rich.console import Console

from tasks.engine.progress import ChunkProgress, Watchers
from tasks.engine.rows import TensorRows, epoch_order
from tasks.engine.training import Step, build_optimizer, textbook_loss, train_epoch
from tasks.jobs.registry import get_job
from tasks.jobs.spec import Tensors

CASES = {  # job, rows, input shape and dtype, epochs per round
    "nonlinear": ("nonlinear", 20_000, (2,), torch.float32, 3),
    "small_cnn": ("fashion_mnist", 12_800, (28, 28), torch.uint8, 1),
}


def setup(case: str) -> tuple:
    job, rows, shape, dtype, epochs = CASES[case]
    spec = get_job(job)
    cfg = spec.config()
    torch.manual_seed(0)
    if dtype == torch.uint8:
        data = Tensors(torch.randint(0, 256, (rows, *shape), dtype=dtype), torch.randint(0, 10, (rows,)))
    else:
        data = Tensors(torch.randn(rows, *shape), torch.randn(rows, 1))
    model = spec.build_model(cfg)
    step = Step(cfg, model, build_optimizer(cfg, model), None, textbook_loss(spec.loss(cfg)), torch.device("cpu"))
    return cfg, TensorRows(data, torch.device("cpu"), spec.prepare), step, epochs


def progress(side: str, cfg, steps: int) -> ChunkProgress | None:
    """None (plain), or a ChunkProgress drawing into a terminal of its own, or logging."""
    if side == "plain":
        return None
    console = Console(file=io.StringIO(), force_terminal=True, width=160) if side == "terminal" else None
    return ChunkProgress(0, 10**6, 10**6, steps, cfg.batch_size, Watchers(logger=mock.Mock(), console=console))


def epoch_seconds(case: str, side: str, state: tuple) -> float:
    cfg, data, step, epochs = state
    steps = len(data) // cfg.batch_size
    p = progress(side, cfg, steps)
    t0 = time.perf_counter()
    with p or mock.MagicMock():
        for epoch in range(epochs):
            batches = data.batches(epoch, epoch_order(0, epoch, len(data)), cfg.batch_size, 0, steps)
            train_epoch(step, batches, 1, p.batch if p else None)
    return (time.perf_counter() - t0) / epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    sides = ["plain", "terminal", "log"]
    for case in CASES:
        state = setup(case)
        times: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(a.rounds):
            for side in sides[r % 3:] + sides[: r % 3]:
                times[side].append(epoch_seconds(case, side, state))
        for stat in (min, statistics.median):  # min: the least disturbed round of each (timeit's choice)
            plain = stat(times["plain"])
            ratios = ", ".join(f"{s} {stat(times[s]) / plain:.3f}" for s in sides[1:])
            print(f"{case}: {stat.__name__} plain epoch {plain:.3f} s of {a.rounds}; with progress / plain: {ratios}")

if __name__ == "__main__":
    main()
