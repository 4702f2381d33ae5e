"""Do loader workers hide the Dataset path's loading? The training step with random crop and
flip fetched from PNG files through trainflow's DataLoader (``--num-workers N``), against the same
step on tensors of the same items augmented beforehand. 1 training thread; interleaved rounds.

    python -m tasks.jobs.fashion_png export data/fashion_png         # once
    python benchmarks/compare_dataset.py [--data data/fashion_png] [--workers 1] [--steps 200] [--rounds 3]

The step is tasks/engine/training.py's ``train_epoch`` over ``DatasetRows`` (tasks/engine/rows.py:
the loader a run uses, per-item seeding included) and over ``TensorRows`` of the items those
batches hold, fetched once up front. Goal: the Dataset step within 10 % of the tensor step when
a core is spare for the worker. The whole run against a plain DataLoader loop and Lightning is
``benchmarks/compare_lightning.py fashion_png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.engine.rows import DatasetRows, TensorRows, epoch_order
from tasks.engine.training import (
    Step,
    build_optimizer,
    build_scheduler,
    textbook_loss,
    train_epoch,
)
from tasks.jobs.registry import get_job
from tasks.jobs.spec import Tensors
from tasks.storage.data import load_job_data, make_split

JOB = "tasks.jobs.fashion_png.JOB"
CPU = torch.device("cpu")


def timed(cfg, rows, order: torch.Tensor, steps: int) -> float:
    """Seconds per step of ``steps`` steps after 10 warm-up steps, a fresh model each time."""
    spec = get_job(cfg.job)
    torch.manual_seed(cfg.seed)
    model = spec.build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    step = Step(cfg, model, optimizer, build_scheduler(cfg, optimizer, steps + 10), textbook_loss(spec.loss(cfg)), CPU)
    b = cfg.batch_size
    train_epoch(step, rows.batches(0, order, b, 0, 10))
    t0 = time.perf_counter()
    train_epoch(step, rows.batches(0, order, b, 10, 10 + steps))
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="the exported images (default: the job's data/fashion_png)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = get_job(JOB).config(data=a.data, threads=1, num_workers=a.workers)
    spec, data = get_job(JOB), load_job_data(cfg)
    split = make_split(data, cfg)
    order = epoch_order(cfg.seed, 0, len(split["train"]))[: (a.steps + 10) * cfg.batch_size]
    loader = DatasetRows(data.pool, split["train"], cfg.seed, "train", CPU, a.workers, spec.prepare)
    # The same items with the same draws (epoch 0's), fetched once in this process, as tensors.
    fetched = DatasetRows(data.pool, split["train"], cfg.seed, "train", CPU, 0, lambda x: x)
    xs, ys = zip(*fetched.batches(0, order, cfg.batch_size, 0, a.steps + 10))
    tensors = TensorRows(Tensors(torch.cat(xs), torch.cat(ys)), CPU, spec.prepare)
    in_order = torch.arange(len(tensors))
    got: dict[str, list[float]] = {"dataset": [], "tensors": []}
    for r in range(a.rounds):
        sides = [("dataset", loader, order), ("tensors", tensors, in_order)]
        for name, rows, o in sides if r % 2 == 0 else sides[::-1]:
            got[name].append(timed(cfg, rows, o, a.steps))
        print(f"round {r + 1}: step with {a.workers} worker(s) {got['dataset'][-1] * 1e3:.1f} ms, on pre-augmented "
              f"tensors {got['tensors'][-1] * 1e3:.1f} ms, ratio {got['dataset'][-1] / got['tensors'][-1]:.3f}",
              flush=True)
    loader.close()
    ratios = [d / t for d, t in zip(got["dataset"], got["tensors"])]
    print(f"{cfg.model}, batch {cfg.batch_size}, {a.steps} steps, {a.rounds} rounds: Dataset step / tensor step "
          f"{statistics.median(ratios):.3f} (median; goal <= 1.10); medians {statistics.median(got['dataset']) * 1e3:.1f}"
          f" / {statistics.median(got['tensors']) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
