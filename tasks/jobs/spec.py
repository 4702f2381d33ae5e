"""The job contract: what a job gives the pipeline (``JobSpec``) and what its loader returns
(``JobData``: a map-style ``Dataset``, or ``Tensors`` for data that fits in memory). A job module
imports this, the kernel and libraries only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from tasks.kernel import DATA_DIR, TrainConfig, UserError, usable_cores

__all__ = ["DATA_DIR", "JobData", "JobSpec", "Predictor", "Tensors", "TrainConfig", "UserError", "split_8_1_1"]


@dataclass(frozen=True)
class Tensors:
    """Inputs and targets of one set of rows. ``x`` may be stored compactly (uint8 images);
    the job's ``prepare`` turns a batch of it into model input."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class JobData:
    """What a job's loader returns: a pool to split, an optional fixed test set, and a
    fingerprint of the content (sha256) so a resume can tell the data changed."""

    #: Every row to split into train, validation and test: a map-style Dataset (items are
    #: ``(x, y)`` tuples or dicts), or Tensors, the fast path for data that fits in memory.
    pool: Tensors | Dataset
    fingerprint: str
    #: A fixed test set (the pool is then split into train and validation only).
    test: Tensors | Dataset | None = None
    #: A fixed validation set (the pool is then all training rows, in a seeded order).
    val: Tensors | Dataset | None = None
    #: Where the content was read from, for the record, when that is not simply ``--data``.
    source: str | None = None
    #: The pool's items as evaluation should see them (the same items in the same order, without
    #: random augmentation): validation reads these. None: validation reads the pool.
    eval_pool: Dataset | None = None

    def __post_init__(self) -> None:
        if self.eval_pool is not None and len(self.eval_pool) != len(self.pool):
            raise UserError(f"eval_pool has {len(self.eval_pool)} items and pool {len(self.pool)}; they must be the "
                            f"same items (eval_pool without the random augmentation)")


def split_8_1_1(n: int) -> tuple[int, int, int]:
    """The tutorial's split: int(0.8n) train, int(0.1n) validation, the rest test."""
    train, val = int(n * 0.8), int(n * 0.1)
    return train, val, n - train - val


@dataclass(frozen=True)
class Predictor:
    """How ``flows/predict_flow.py`` talks to a job: its input options, how they become model
    input, and how outputs are printed. The model, device and ``prepare`` are handled generically."""

    #: Add the job's input options to the CLI parser (e.g. ``--x 1 5 11``, ``--index 0 1 2``).
    add_arguments: Callable[[Any], None]
    #: ``(args, cfg) -> (x, labels)``: inputs in stored form [N, ...] (the job's ``prepare`` is
    #: applied afterwards) and one display label per row (e.g. ``"x=5"``, ``"test image 3 (true: Bag)"``).
    inputs: Callable[[Any, TrainConfig], tuple[torch.Tensor, list[str]]]
    #: ``(labels, outputs [N, ...]) -> one printable line per row``.
    format: Callable[[list[str], torch.Tensor], list[str]]
    #: ``outputs [N, ...] -> one dict per row`` of what the text says, for ``--json`` (e.g.
    #: ``{"label": "Bag", "probability": 0.97}``); None: the raw outputs only.
    fields: Callable[[torch.Tensor], list[dict[str, Any]]] | None = None


@dataclass(frozen=True)
class JobSpec:
    """One job: data, model, loss and metrics. The pipeline only talks to jobs through this."""

    name: str
    description: str
    #: TrainConfig values for this job (everything but ``job``); the CLI overrides them.
    defaults: dict[str, Any]
    load: Callable[[Path], JobData]
    #: ``config -> nn.Module`` (``config.model`` picks a variant listed in ``models``).
    build_model: Callable[[TrainConfig], nn.Module]
    loss: Callable[[TrainConfig], nn.Module]
    models: tuple[str, ...] = ("default",)
    #: Pool rows -> (train, val, test) sizes; jobs with a fixed test set return test=0.
    split_sizes: Callable[[int], tuple[int, int, int]] = split_8_1_1
    #: Batch of stored ``x`` -> model input, on ``device`` (e.g. uint8 images -> normalised float).
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    #: ``(outputs, targets) -> {name: float}`` extra metrics per evaluation (accuracy, ...).
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = lambda out, y: {}
    #: Metric whose best value selects the best checkpoint, and whether higher is better.
    monitor: tuple[str, bool] = ("loss", False)
    #: Extra outputs after evaluation: ``(run_dir, model, data, split, metrics) -> metrics``.
    report: Callable[..., dict[str, Any]] | None = None
    #: Short name written under the checkpoint's ``model`` key (the tutorial's class name).
    model_label: Callable[[TrainConfig], str] = lambda cfg: cfg.model
    in_default_set: bool = True
    #: Help text for ``--data``.
    data_help: str = field(default="input file")
    #: Command-line prediction from a finished run (``flows/predict_flow.py``); None: not offered.
    predict: Predictor | None = None
    #: ``(model, batch) -> loss``, the loss of one batch for models that are not
    #: ``loss(model(x), y)`` (several inputs, a dict batch). None: the textbook step. The batch is
    #: on the training device; the loop does zero_grad, backward, clipping and the step.
    step: Callable[[nn.Module, Any], torch.Tensor] | None = None
    #: ``(config, model, steps_per_epoch) -> (optimizer, scheduler or None)``, the job's own
    #: (as Lightning's ``configure_optimizers``); the scheduler is stepped after every optimizer
    #: step. None: ``--optimizer`` and ``--schedule`` choose.
    optimizers: Callable[[TrainConfig, nn.Module, int], tuple[torch.optim.Optimizer, Any]] | None = None
    #: Whether ``load`` reads ``--data`` where it lies: a store URL reaches it as text (``Shards``
    #: stream it, tasks/jobs/shards.py). False: ``load`` gets a local copy of what a URL names.
    streams: bool = False

    def config(self, **overrides: Any) -> TrainConfig:
        """Validated TrainConfig: this job's defaults with ``overrides`` (None means default)."""
        values = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}, "job": self.name}
        cfg = TrainConfig.model_validate(values)
        if cfg.model not in self.models:
            raise UserError(
                f"unknown model {cfg.model!r} for job {self.name!r}; choose one of: {', '.join(self.models)}"
            )
        if (cfg.momentum or cfg.nesterov) and cfg.optimizer != "sgd":
            raise UserError(f"--momentum and --nesterov apply to --optimizer sgd only (this run: {cfg.optimizer})")
        if cfg.nesterov and not cfg.momentum:
            raise UserError("--nesterov needs a momentum: add --momentum (e.g. 0.9)")
        check_processes(cfg)
        return cfg


def check_processes(cfg: TrainConfig) -> None:
    """--device cuda and --precision fp16 need CUDA; --nproc-per-node N: each rank takes an equal
    share of every batch, one GPU per rank."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no usable CUDA device; use --device cpu (or auto)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs CUDA (its GradScaler); on the CPU use --precision bf16 (or 32)")
    n = cfg.nproc_per_node
    if n > 1 and cfg.batch_size % n:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide by --nproc-per-node {n}; each process "
                        f"takes an equal share of every batch: use a multiple of {n}")
    if n > 1 and cfg.dist_backend == "nccl" and not cuda:
        raise UserError("--dist-backend nccl needs CUDA; on CPU use --dist-backend gloo (or auto)")
    if n > 1 and cuda and n > torch.cuda.device_count():
        raise UserError(f"--nproc-per-node {n} needs {n} GPUs, this machine has {torch.cuda.device_count()}; "
                        f"use at most that many (one GPU per process)")
    cores = usable_cores()
    if n > 1 and not cuda and n > cores and not cfg.oversubscribe:
        raise UserError(f"--nproc-per-node {n} is more CPU processes than this machine's {cores} cores; use at most "
                        f"{cores}, or add --oversubscribe to run them anyway")

