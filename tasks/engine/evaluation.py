"""Final evaluation on validation and test rows; writes ``metrics.json``."""

from __future__ import annotations

import contextlib
from typing import Any

from tasks.engine.rows import rows_of
from tasks.engine.training import Trainer, evaluate_model
from tasks.kernel import UserError, atomic_write_json
from tasks.storage.data import load_job_data, read_split
from tasks.storage.run import METRICS_FILE, Run


def final_trainer(run: Run) -> Trainer:
    """The trained model from the last checkpoint; refuses if training is not finished."""
    trainer = Trainer(run)
    if not trainer.finished:
        raise UserError(f"{run.where}: training stopped at epoch {trainer.next_epoch} of {run.cfg.epochs}; "
                        "rerun to resume")
    return trainer


def evaluate_run(run: Run) -> dict[str, Any]:
    """Validation and test metrics of the final model plus the job's report; writes metrics.json."""
    cfg = run.cfg
    data = load_job_data(cfg)
    split = read_split(run.dir, data)
    with final_trainer(run) as trainer, contextlib.closing(
            rows_of(data, split, "test", cfg.seed, trainer.device, cfg.num_workers, trainer.spec.prepare)) as test:
        metrics: dict[str, Any] = {"job": cfg.job, "epochs": cfg.epochs, "checkpoint": trainer.resumed_from.name}
        # The last epoch validated this very model, the same way: its figures are the val metrics.
        metrics["val"] = {"rows": len(trainer.val),
                          **{k[4:]: v[-1] for k, v in trainer.history.items() if k.startswith("val_")}}
        metrics["test"] = {"rows": len(test), **evaluate_model(trainer.model, trainer.loss_fn, test, cfg.eval_batch_size,
                                                                trainer.spec, trainer.step.autocast)}
    metrics["final_train_loss"] = trainer.history["train_loss"][-1]
    metrics["epochs_trained"] = trainer.next_epoch
    metrics["stopped_early"] = trainer.stopped_early
    if trainer.best is not None:
        metrics["best"] = {"epoch": trainer.best["epoch"] + 1, "metric": trainer.best["metric"],
                           "value": trainer.best["value"]}
    if trainer.spec.report is not None:
        metrics.update(trainer.spec.report(run.dir, trainer.model, data, split, metrics))
    atomic_write_json(run.dir / METRICS_FILE, metrics)
    return metrics
