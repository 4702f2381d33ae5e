"""The same job as ``python flows/train_flow.py --job JOB``, written as a competent PyTorch
Lightning user would: the baseline of benchmarks/compare_lightning.py.

    python benchmarks/lightning_job.py --job nonlinear --out DIR [--epochs N --chunk-epochs K]

Same data, split, model, loss, optimizer, LR schedule, epochs and checkpoint interval as our
job's config (read from the job registry, not copied). Rerunning the same command resumes from
DIR/checkpoints/last.ckpt (``trainer.fit(..., ckpt_path="last")``).

Choices, each what such a user would pick for a batch job on a CPU machine:
- torch.set_num_threads(1): Lightning leaves torch's default (all cores); ours (--threads auto)
  trains on one thread on a 2-core machine, where all threads was measured 3.4x slower.
- DataLoader over a TensorDataset of the prepared tensors (FashionMNIST normalised once, up
  front), num_workers=0, shuffle with a seeded generator, drop_last=True (as ours).
- Validation every epoch (ours validates every epoch too), batch size = the config's
  eval_batch_size; test set evaluated once at the end with ``trainer.test``.
- ModelCheckpoint every chunk_epochs epochs, all kept (ours keeps all by default), save_last.
- enable_progress_bar=False (a batch job's log is a file); model summary and the default logger
  (TensorBoard, which ours writes too) left as they are.
Prefect is not imported here: it is no part of this baseline and its import costs seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.plain_job import (
    command_line,
    dataset_loaders,
    optimizer_and_schedule,
    prepared_sets,
)
from tasks.jobs.registry import get_job
from tasks.kernel import TrainConfig

#: Printed (flushed) at the end of the first epoch this process trains: the benchmark's marker.
FIRST_EPOCH_MARK = "lightning: first epoch of this process done"


class JobModule(L.LightningModule):
    """Our job's model, loss and optimizer recipe as a LightningModule."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, dataset: bool = False):
        super().__init__()
        self.cfg, self.steps_per_epoch, self.dataset = cfg, steps_per_epoch, dataset
        self.spec = get_job(cfg.job)
        torch.manual_seed(cfg.seed)  # model init from the run's seed, as ours
        self.model = self.spec.build_model(cfg)
        self.loss_fn = self.spec.loss(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """A Dataset job's batches through the job's ``prepare`` (tensors were prepared up front)."""
        if not self.dataset:
            return batch
        x, y = batch
        return self.spec.prepare(x), y

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch, prefix: str) -> None:
        x, y = batch
        out = self(x)
        values = {"loss": self.loss_fn(out, y), **self.spec.metrics(out, y)}
        # Weighted by batch size: the sample mean over the whole set, as ours reports.
        self.log_dict({f"{prefix}_{k}": v for k, v in values.items()}, batch_size=len(y))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        opt, sched = optimizer_and_schedule(self.cfg, self.model.parameters(), self.steps_per_epoch)
        if sched is None:
            return {"optimizer": opt}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}  # per batch


class FirstEpochMark(Callback):
    """Prints one line when this process finishes its first epoch (after validation, like an
    epoch of ours): launch latency and resume latency are timed from it."""

    def __init__(self) -> None:
        self.done = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.done:
            self.done = True
            print(f"{FIRST_EPOCH_MARK}: epoch {trainer.current_epoch + 1}", flush=True)


def loaders(cfg: TrainConfig, split_file: Path) -> dict[str, DataLoader]:
    """Train/val/test loaders over the job's data with the split our run would make (a
    Dataset job: the plain loop's DataLoaders, the same objects)."""
    given = dataset_loaders(cfg, split_file)
    if given is not None:
        return given
    sets = {name: TensorDataset(*xy) for name, xy in prepared_sets(cfg, split_file).items()}
    shuffle = torch.Generator().manual_seed(cfg.seed)
    return {
        "train": DataLoader(sets["train"], batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            generator=shuffle, num_workers=0),
        "val": DataLoader(sets["val"], batch_size=cfg.eval_batch_size, num_workers=0),
        "test": DataLoader(sets["test"], batch_size=cfg.eval_batch_size, num_workers=0),
    }


def build_trainer(cfg: TrainConfig, out: Path) -> L.Trainer:
    """A Trainer that checkpoints every chunk_epochs epochs, keeps them all and a last.ckpt."""
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", every_n_epochs=cfg.chunk_epochs,
                           save_top_k=-1, save_last=True)
    return L.Trainer(max_epochs=cfg.epochs, accelerator="gpu" if torch.cuda.is_available() else "cpu",
                     devices=1, default_root_dir=out, callbacks=[ckpt, FirstEpochMark()],
                     enable_progress_bar=False)


def main() -> None:
    a, cfg = command_line(__doc__)
    L.seed_everything(cfg.seed)
    dl = loaders(cfg, a.split)
    module = JobModule(cfg, steps_per_epoch=len(dl["train"]), dataset=not isinstance(dl["train"].dataset, TensorDataset))
    trainer = build_trainer(cfg, a.out)
    trainer.fit(module, dl["train"], dl["val"], ckpt_path="last")
    (metrics,) = trainer.test(module, dl["test"], verbose=False)
    (a.out / "metrics.json").write_text(json.dumps({"test": metrics}, indent=1))
    print(f"lightning: done, test {metrics}", flush=True)


if __name__ == "__main__":
    main()
