"""What a job is (``JobSpec``) and how a run is configured (``TrainConfig``)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "data"
ARTIFACTS_DIR = ROOT / "artifacts"


class UserError(Exception):
    """Bad input from the user: reported as one line, never retried."""


class TrainConfig(BaseModel):
    """Everything that defines a training run. Frozen; validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: str
    data: Path
    epochs: int = Field(gt=0)
    chunk_epochs: int = Field(gt=0, description="epochs per checkpointed chunk")
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)
    seed: int = 0
    model: str = "default"
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["constant", "onecycle", "cosine"] = "constant"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    early_stopping_patience: int | None = Field(
        default=None, gt=0, description="stop after this many epochs without a better validation metric"
    )
    shards: int | None = Field(
        default=None, gt=0, description="equal parts each training batch is computed in, gradients summed in "
        "part order (on CPU, on parallel threads); None: the job's choice for the model"
    )
    # Execution details. Those that do not change the trained numbers are left out of the run's
    # identity (IDENTITY_EXCLUDE); `threads` stays in: 1 and 2 CPU threads give different floats.
    run_name: str | None = None
    artifacts_dir: Path = ARTIFACTS_DIR
    fresh: bool = False
    threads: int = Field(default=1, gt=0, description="torch intra-op CPU threads")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keep_last: int | None = Field(default=None, gt=0, description="checkpoints kept besides the best (None: all)")
    save_best: bool = Field(default=False, description="also write model_best_state_dict.pt")
    wait_lock: float = Field(default=0, ge=0, description="seconds to wait for a run folder held by another process")

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (no slashes), 1-100 chars")
        if v == "latest":
            raise ValueError("'latest' is the pointer to a job's newest run; choose another name")
        return v

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained result (a resumed run must match them)."""
        identity = {k: v for k, v in self.model_dump(mode="json").items() if k not in IDENTITY_EXCLUDE}
        if identity["shards"] in (None, 1):
            # How every run trained before `shards` existed: leaving it out keeps those runs'
            # fingerprints, so they still resume.
            del identity["shards"]
        return identity

    def fingerprint(self, data_fingerprint: str) -> str:
        """sha256 of the identity fields plus the data's own fingerprint."""
        blob = json.dumps({"config": self.identity(), "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


# `data` is identified by content (data fingerprint), not by where the file lives.
IDENTITY_EXCLUDE = frozenset(
    {"run_name", "artifacts_dir", "fresh", "device", "data", "keep_last", "save_best", "wait_lock"}
)


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

    pool: Tensors
    fingerprint: str
    test: Tensors | None = None


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
    #: Tests only: ``folder -> --data path`` that writes tiny data for this job into ``folder``
    #: (for data not available offline, e.g. a downloaded dataset); None: tests use ``defaults["data"]``.
    make_test_data: Callable[[Path], Path] | None = None
    #: ``model name -> shards`` when the config leaves ``shards`` unset. Sharding suits models
    #: that treat every sample on its own and whose steps are long enough to share: see
    #: ``tasks.training.sharded_backward``.
    default_shards: Callable[[str], int] = lambda model: 1

    def config(self, **overrides: Any) -> TrainConfig:
        """Validated TrainConfig: this job's defaults with ``overrides`` (None means default)."""
        values = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}, "job": self.name}
        cfg = TrainConfig.model_validate(values)
        if cfg.model not in self.models:
            raise UserError(
                f"unknown model {cfg.model!r} for job {self.name!r}; choose one of: {', '.join(self.models)}"
            )
        if cfg.shards is None:
            cfg = cfg.model_copy(update={"shards": self.default_shards(cfg.model)})
        if cfg.shards > 1:
            if cfg.batch_size % cfg.shards:
                raise UserError(f"--batch-size {cfg.batch_size} does not split into {cfg.shards} equal shards; "
                                f"use a multiple of {cfg.shards} or another --shards")
            with torch.device("meta"):  # no memory, no draw from the global RNG
                mixing = batch_dependent_modules(self.build_model(cfg))
            if mixing:
                raise UserError(f"--shards {cfg.shards} needs a model that treats each sample on its own; "
                                f"{cfg.model} has {mixing[0]}, so use --shards 1")
        return cfg


def batch_dependent_modules(model: nn.Module) -> list[str]:
    """Layers whose training output is not a function of each sample alone (batch statistics
    and running averages, random masks), e.g. ``["bn1 (BatchNorm2d)"]``: such a model cannot be
    trained in shards. Random draws made in ``forward`` itself cannot be seen here."""
    def mixes(m: nn.Module) -> bool:
        return isinstance(m, nn.modules.batchnorm._NormBase) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)

    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if mixes(m)]
