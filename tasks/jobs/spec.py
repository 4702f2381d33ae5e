"""What a job is (``JobSpec``) and how a run is configured (``TrainConfig``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "data"
ARTIFACTS_DIR = ROOT / "artifacts"


#: The models train in float32: a larger lr or weight decay overflows in the optimizer's step.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Epoch numbers seed each epoch's shuffle (``seed * 1_000_003 + epoch`` must fit torch's 64-bit seed).
MAX_EPOCHS = 10**12


class UserError(Exception):
    """Bad input from the user: reported as one line, never retried."""


def location(value: Any) -> Any:
    """A local path (``Path``; ``file://`` URLs too) or a store URL (``s3://...``, kept as text:
    ``Path`` would fold its ``//``). tasks/store.py resolves URLs."""
    text = str(value)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return text if "://" in text else Path(value)


#: A local folder or file, or the URL of one on a store.
Location = Annotated[Path | str, BeforeValidator(location)]


class TrainConfig(BaseModel):
    """Everything that defines a training run. Frozen; validated on construction.

    Each field is also a command-line option (``--chunk-epochs``), a parameter of the ``train``
    and ``scheduled-train`` flows and of the deployments (``flows/options.py`` builds them all
    from this class): adding an option is one line here. Fields without a default take the
    job's (``JobSpec.defaults``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: str = Field(description="job to train: a built-in name, or your own JobSpec as module.path:NAME (docs/jobs.md)")
    data: Location = Field(description="the job's input: a CSV for the regression jobs, a folder for fashion_mnist; "
                           "a local path or a URL (s3://bucket/x.csv)")
    epochs: int = Field(gt=0, le=MAX_EPOCHS, description="total epochs")
    chunk_epochs: int = Field(gt=0, description="epochs per checkpointed chunk (a Prefect task each)")
    lr: float = Field(gt=0, allow_inf_nan=False, description="learning rate (the schedule's peak for onecycle)")
    batch_size: int = Field(gt=0, description="training batch size")
    eval_batch_size: int = Field(gt=0, description="validation/test batch size")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seed for the split, the initial weights and the shuffling")
    model: str = Field(default="default", description="model variant of the job (fashion_mnist: small_cnn, cnn, lenet)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(default="sgd", description="torch.optim optimizer")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(default=False, description="SGD with Nesterov momentum")
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="weight decay")
    schedule: Literal["constant", "onecycle", "cosine"] = Field(
        default="constant", description="learning-rate schedule, stepped every batch")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="label smoothing of a cross-entropy loss")
    early_stopping_patience: int | None = Field(
        default=None, gt=0, description="stop after this many epochs without a better validation metric (default off)")
    compile: bool = Field(default=False, description="train the model through torch.compile (see docs/performance.md)")
    threads: Annotated[int, Field(gt=0, le=1024)] | Literal["auto"] = Field(
        default="auto", description="torch intra-op CPU threads per process; auto: $OMP_NUM_THREADS if set, else the "
        "usable cores but one, shared by the processes; resolved when the run folder is created and kept with it")
    nproc_per_node: int = Field(default=1, ge=1, le=1024, description="processes that train each chunk together, "
                                "data-parallel (torch.distributed DDP, torchrun's name; docs/distributed.md)")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="torch.distributed backend with --nproc-per-node > 1 (auto: nccl on CUDA, gloo on CPU)")
    # Execution details. Those that do not change the trained numbers are left out of the run's
    # identity (IDENTITY_EXCLUDE); `threads` and `compile` stay in: they change the floats (an
    # "auto" run is identified as "auto" and trains with the count its config.json stored).
    run_name: str | None = Field(
        default=None, description="run folder name (default: derived from the config and data, so a rerun resumes)")
    artifacts_dir: Location = Field(default=ARTIFACTS_DIR, description="root of the run folders: a local folder, or "
                                    "a URL such as s3://bucket/prefix (gs://, az://; README: object storage)")
    fresh: bool = Field(default=False, description="start over; an existing run folder is moved aside, not deleted")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when available")
    keep_last: int | None = Field(
        default=None, gt=0, description="keep only the newest K checkpoints plus the best (default: all)")
    save_best: bool = Field(default=False, description="also write model_best_state_dict.pt (best validation epoch)")
    wait_lock: float = Field(default=0, ge=0, allow_inf_nan=False,
                             description="seconds to wait for a run folder another process holds (default: refuse at once)")

    @field_validator("lr", "weight_decay")
    @classmethod
    def _fits_float32(cls, v: float) -> float:
        if v > FLOAT32_MAX:  # the optimizer's step would overflow
            raise ValueError(f"must be at most {FLOAT32_MAX:.4g}, the largest float32 (the models train in float32)")
        return v

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (no slashes), 1-100 chars")
        if v == "latest":
            raise ValueError("'latest' is the pointer to a job's newest run; choose another name")
        return v

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained result (a resumed run must match them). One
        process leaves out the distributed fields, so runs made before they existed still match."""
        out = {k: v for k, v in self.model_dump(mode="json").items() if k not in IDENTITY_EXCLUDE}
        if self.nproc_per_node == 1:
            del out["nproc_per_node"], out["dist_backend"]
        return out

    def thread_count(self) -> int:
        """``threads`` as a number: ``auto`` resolved on this machine (``auto_threads``)."""
        return auto_threads(self.nproc_per_node) if self.threads == "auto" else self.threads

    def fingerprint(self, data_fingerprint: str) -> str:
        """sha256 of the identity fields, the data's own fingerprint and the training code's
        format (a run made by a version that trained with other floats gets another one)."""
        blob = json.dumps({"config": self.identity(), "data": data_fingerprint, "format": TRAINING_FORMAT},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def auto_threads(processes: int) -> int:
    """What ``--threads auto`` means here: $OMP_NUM_THREADS (per process, as OpenMP and torchrun
    read it) if set, else the cores this process may use but one, shared by the processes. One
    core stays free because a thread team stalls at every op while one of its threads waits for
    a core: on 2 shared cores, 2 threads trained small_cnn 1.75x faster than 1 on an idle
    machine, and 6-8x slower beside one busy process."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - 1) // processes)


#: Raised when training changes its floats for an existing config. 2: the textbook step (LeNet
#: trained in shards with a batch-major conv under format 1, so those runs cannot continue exactly).
TRAINING_FORMAT = 2

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
    #: Where the content was read from, for the record, when that is not simply ``--data``.
    source: str | None = None


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
    """--device cuda needs CUDA; --nproc-per-node N: each rank takes an equal share of every
    batch, one GPU per rank."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no usable CUDA device; use --device cpu (or auto)")
    n = cfg.nproc_per_node
    if n > 1 and cfg.batch_size % n:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide by --nproc-per-node {n}; each process "
                        f"takes an equal share of every batch: use a multiple of {n}")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if n > 1 and cfg.dist_backend == "nccl" and not cuda:
        raise UserError("--dist-backend nccl needs CUDA; on CPU use --dist-backend gloo (or auto)")
    if n > 1 and cuda and n > torch.cuda.device_count():
        raise UserError(f"--nproc-per-node {n} needs {n} GPUs, this machine has {torch.cuda.device_count()}; "
                        f"use at most that many (one GPU per process)")

