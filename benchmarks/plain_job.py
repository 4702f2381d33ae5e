"""The same job as ``python flows/train_flow.py --job JOB`` in a plain PyTorch loop, with nothing
around it: the floor of benchmarks/compare_lightning.py.

    python benchmarks/plain_job.py --job fashion_mnist --out DIR --split SPLIT [--epochs N]

Same data, split, model, loss, optimizer, LR schedule and epochs as our job's config (read from
the job registry), on 1 thread, like benchmarks/lightning_job.py, which takes its data and
optimizer recipe from here. The textbook step (pytorch/examples' mnist/main.py) over batches of
preloaded, prepared tensors (a Dataset job: over the textbook DataLoader, ``--num-workers``),
validation every epoch and the test set once at the end. No
checkpoints, logs, progress or framework: what any tool that runs this job's arithmetic cannot
go below. Writes DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader, Subset

from tasks.jobs.registry import get_job
from tasks.jobs.spec import Tensors
from tasks.kernel import TrainConfig


def dataset_loaders(cfg: TrainConfig, split_file: Path) -> dict[str, DataLoader] | None:
    """For a job whose data is a Dataset (tasks/jobs/fashion_png.py): the textbook DataLoaders
    over the split our run would make (shuffled with a seeded generator, full batches,
    ``--num-workers`` persistent workers each), validation on ``eval_pool``; None for tensors."""
    data = get_job(cfg.job).load(Path(cfg.data))
    if isinstance(data.pool, Tensors):
        return None
    split, plain = torch.load(split_file), data.pool if data.eval_pool is None else data.eval_pool
    sets = {"train": Subset(data.pool, split["train"].tolist()), "val": Subset(plain, split["val"].tolist()),
            "test": data.test if data.test is not None else Subset(plain, split["test"].tolist())}
    w = cfg.num_workers
    return {name: DataLoader(rows, batch_size=cfg.batch_size if name == "train" else cfg.eval_batch_size,
                             shuffle=name == "train", drop_last=name == "train", num_workers=w,
                             persistent_workers=w > 0, generator=torch.Generator().manual_seed(cfg.seed))
            for name, rows in sets.items()}


def prepared_sets(cfg: TrainConfig, split_file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of the train, val and test sets with the split our run would make, x prepared
    once, up front (FashionMNIST: normalised float images)."""
    spec = get_job(cfg.job)
    data = spec.load(Path(cfg.data))
    split = torch.load(split_file)  # {"train", "val", "test"}: row indices (see compare_lightning.py)
    out = {}
    for name in ("train", "val", "test"):
        rows = data.test if name == "test" and data.test is not None else data.pool
        idx = split[name]
        out[name] = (spec.prepare(rows.x[idx]), rows.y[idx])
    return out


def optimizer_and_schedule(cfg: TrainConfig, params, steps_per_epoch: int):
    """TrainConfig's optimizer and its per-batch LR schedule (None: constant)."""
    params = list(params)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch  # the schedule spans the whole run, stepped per batch
    if cfg.schedule == "onecycle":
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return opt, None


@torch.no_grad()
def evaluate(model, loss_fn, spec, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Sample-weighted loss and the job's metrics over (x, y)."""
    model.eval()
    outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    out = torch.cat(outs)
    return {"loss": float(loss_fn(out, y)), **spec.metrics(out, y)}


@torch.no_grad()
def evaluate_loader(model, loss_fn, spec, loader: DataLoader) -> dict[str, float]:
    """The same over a DataLoader's batches."""
    model.eval()
    outs, ys = zip(*[(model(spec.prepare(x)), y) for x, y in loader])
    out, y = torch.cat(outs), torch.cat(ys)
    return {"loss": float(loss_fn(out, y)), **spec.metrics(out, y)}


def train_loader(cfg: TrainConfig, loaders: dict[str, DataLoader]) -> dict[str, float]:
    """cfg.epochs epochs of the textbook step over the DataLoader (pytorch/examples' loop)."""
    spec = get_job(cfg.job)
    torch.manual_seed(cfg.seed)
    model, loss_fn = spec.build_model(cfg), spec.loss(cfg)
    opt, sched = optimizer_and_schedule(cfg, model.parameters(), len(loaders["train"]))
    for _ in range(cfg.epochs):
        model.train()
        for x, y in loaders["train"]:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(spec.prepare(x)), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        evaluate_loader(model, loss_fn, spec, loaders["val"])
    return evaluate_loader(model, loss_fn, spec, loaders["test"])


def train(cfg: TrainConfig, sets: dict) -> dict[str, float]:
    """cfg.epochs epochs of the textbook step, validating after each; the test metrics."""
    spec = get_job(cfg.job)
    torch.manual_seed(cfg.seed)
    model, loss_fn = spec.build_model(cfg), spec.loss(cfg)
    (x, y), b = sets["train"], cfg.batch_size
    steps = len(y) // b  # full batches only (drop_last), as ours and Lightning
    opt, sched = optimizer_and_schedule(cfg, model.parameters(), steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(y), generator=shuffle)
        for i in range(steps):
            rows = order[i * b : (i + 1) * b]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[rows]), y[rows])
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        evaluate(model, loss_fn, spec, *sets["val"], cfg.eval_batch_size)
    return evaluate(model, loss_fn, spec, *sets["test"], cfg.eval_batch_size)


def command_line(doc: str) -> tuple[argparse.Namespace, TrainConfig]:
    """The baselines' shared command line, as compare_lightning.py writes it: the arguments and
    the job's config. Sets torch to 1 thread."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (metrics.json; Lightning: checkpoints, logs)")
    p.add_argument("--split", type=Path, required=True, help="torch file of the split's row indices")
    p.add_argument("--epochs", type=int)
    p.add_argument("--chunk-epochs", type=int, help="epochs between checkpoints (the plain loop writes none)")
    p.add_argument("--data", help="the job's --data (default: the job's)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers of a Dataset job")
    a = p.parse_args()
    torch.set_num_threads(1)  # like with like: ours trains on 1 thread by default on 2 cores
    return a, get_job(a.job).config(epochs=a.epochs, chunk_epochs=a.chunk_epochs, data=a.data,
                                    num_workers=a.num_workers)


def main() -> None:
    a, cfg = command_line(__doc__)
    loaders = dataset_loaders(cfg, a.split)
    test = train(cfg, prepared_sets(cfg, a.split)) if loaders is None else train_loader(cfg, loaders)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "metrics.json").write_text(json.dumps({"test": test}, indent=1))
    print(f"plain: done, test {test}", flush=True)


if __name__ == "__main__":
    main()
