"""Final evaluation on validation and test rows; writes ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.checkpoint import atomic_write_json
from tasks.data import load_job_data, read_split, split_tensors
from tasks.jobs.spec import TrainConfig, UserError
from tasks.training import Trainer, evaluate_model, to_device

METRICS_FILE = "metrics.json"


def final_trainer(cfg: TrainConfig, run_dir: Path, fingerprint: str) -> Trainer:
    """The trained model from the last checkpoint; refuses if training is not finished."""
    trainer = Trainer(cfg, run_dir, fingerprint)
    if not trainer.finished:
        raise UserError(f"{run_dir}: training stopped at epoch {trainer.next_epoch} of {cfg.epochs}; rerun to resume")
    return trainer


def evaluate_run(cfg: TrainConfig, run_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Validation and test metrics of the final model plus the job's report; writes metrics.json."""
    trainer = final_trainer(cfg, run_dir, fingerprint)
    data = load_job_data(cfg)
    split = read_split(run_dir, data)
    metrics: dict[str, Any] = {"job": cfg.job, "epochs": cfg.epochs, "checkpoint": trainer.resumed_from.name}
    for part in ("val", "test"):
        rows = to_device(split_tensors(data, split, part), trainer.device)
        metrics[part] = {"rows": len(rows), **evaluate_model(trainer.model, trainer.loss_fn, rows, cfg.eval_batch_size, trainer.spec)}
    metrics["final_train_loss"] = trainer.history["train_loss"][-1]
    metrics["epochs_trained"] = trainer.next_epoch
    metrics["stopped_early"] = trainer.stopped_early
    if trainer.best is not None:
        metrics["best"] = {"epoch": trainer.best["epoch"] + 1, "metric": trainer.best["metric"], "value": trainer.best["value"]}
    if trainer.spec.report is not None:
        metrics.update(trainer.spec.report(Path(run_dir), trainer.model, data, split, metrics))
    atomic_write_json(Path(run_dir) / METRICS_FILE, metrics)
    return metrics

