"""The typed records that cross module boundaries: a job's data description, a checkpoint's
manifest, a chunk's result and the run's record (``run.json``). Free of Prefect and of storage:
each record knows its own JSON form; who writes it where is the caller's business.

The tutorial-format checkpoint dict exists only at the ``torch.save`` boundary
(:meth:`tasks.engine.training.Trainer.state_dict`); a :class:`Manifest` is what vouches for it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.kernel import ROOT, TrainConfig, utc_now

RUN_FILE = "run.json"
#: History columns copied into a chunk's row in run.json (its last epoch's values).
LOSSES = ("train_loss", "val_loss", "val_accuracy")
LIBRARIES = ("torch", "torchvision", "prefect", "numpy", "pandas", "pydantic", "matplotlib", "tensorboard")


class DataInfo(BaseModel):
    """What a job's data is: its content's fingerprint, where it was read from, its rows."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    source: str
    pool_rows: int
    test_rows: int | None = None


class Manifest(BaseModel):
    """The commit of one checkpoint: written after its bytes are in place, it vouches for them
    (size, sha256) and says what they hold (chunk, epoch, batch, the run's fingerprint). On a
    store, ``lease`` is the writer's lease token: readers know which holder committed it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    file: str
    sha256: str
    bytes: int
    chunk: int
    epoch: int
    batch: int = 0  # batches of the next epoch done (a stop inside it)
    fingerprint: str
    cost: float
    written_at: str = ""
    lease: str | None = None

    @classmethod
    def of(cls, name: str, data: bytes, payload: dict[str, Any], lease: str | None = None) -> Manifest:
        """The manifest that commits checkpoint ``name`` holding ``data`` (``payload`` serialised)."""
        return cls(file=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), chunk=int(payload["chunk"]),
                   epoch=int(payload["epoch"]), batch=int(payload.get("batch", 0)), fingerprint=payload["fingerprint"],
                   cost=float(payload["cost"]), written_at=utc_now(), lease=lease)

    def json_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2, exclude_none=True) + "\n").encode()

    @property
    def position(self) -> tuple[int, int, int]:
        """Where its state is: (epoch, batch, chunk); newer sorts later."""
        return self.epoch, self.batch, self.chunk

    def agrees_with(self, payload: dict[str, Any]) -> str | None:
        """Why the loaded ``payload`` is not what this manifest says it commits (None if it is)."""
        for key in ("chunk", "epoch", "fingerprint"):
            if payload.get(key) != getattr(self, key):
                return f"its payload's {key} is {payload.get(key)!r}, its manifest says {getattr(self, key)!r}"
        if int(payload.get("batch", 0)) != self.batch:
            return f"its payload's batch is {payload.get('batch', 0)!r}, its manifest says {self.batch!r}"
        return None


class ChunkResult(BaseModel):
    """What one chunk did, the same from every runner (in-process or torchrun's rank 0)."""

    chunk: int
    #: False: the checkpoints already covered this chunk (a rerun, a retry), nothing trained.
    trained: bool
    start_epoch: int
    end_epoch: int
    #: The checkpoint the chunk started from, and whether that counts as a resume (a new
    #: attempt's first chunk, or a retry of this one).
    loaded: str | None = None
    resumed: bool = False
    skipped_checkpoints: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    checkpoint: str | None = None
    samples: int = 0
    #: The last epoch's history row (train_loss, val_loss, lr, val metrics).
    last: dict[str, float] = Field(default_factory=dict)
    stopped_early: bool = False
    early_stop: str | None = None
    #: A stop on request (SIGTERM, Ctrl-C) ended the chunk at this checkpoint: the signal, and
    #: the line that says where and how to resume.
    stopped_by: int | None = None
    stop_message: str | None = None

    @property
    def resumed_from(self) -> str | None:
        return self.loaded if self.resumed else None


class RunRecord(BaseModel):
    """``run.json``: what a run folder is and how each attempt went, and once complete the
    sha256 of every file. Fields a newer version adds are kept (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow")

    job: str = ""
    run_name: str = ""
    run_dir: str = ""
    status: Literal["running", "failed", "stopped", "completed"] = "running"
    attempts: int = 0
    started_at: str = Field(default_factory=utc_now)
    attempt_started_at: str | None = None
    finished_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    fingerprint: str = ""
    data_fingerprint: str = ""
    data: str = ""
    data_source: str = ""
    identity: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    resumes: list[dict[str, Any]] = Field(default_factory=list)
    chunks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    flow_runs: list[dict[str, Any]] = Field(default_factory=list)
    tensorboard_epochs: int = 0
    mlflow_run_id: str | None = None
    files: dict[str, dict[str, Any]] | None = None
    error: str | None = None

    @classmethod
    def parse(cls, text: str | bytes | None) -> RunRecord | None:
        """A record from run.json's text (None when absent or unreadable)."""
        try:
            return cls.model_validate_json(text) if text else None
        except ValueError:
            return None

    def json_text(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    @property
    def complete(self) -> bool:
        return self.status == "completed"

    def begin_attempt(self, cfg: TrainConfig, data: DataInfo, fingerprint: str, run_name: str, where: str,
                      flow_run_id: str | None) -> None:
        """Mark the record ``running`` for one more attempt."""
        self.attempts += 1
        fields = dict(
            job=cfg.job, run_name=run_name, run_dir=where, status="running", attempt_started_at=utc_now(),
            fingerprint=fingerprint, data_fingerprint=data.fingerprint, data=str(cfg.data), data_source=data.source,
            identity=cfg.identity(), config=cfg.model_dump(mode="json"), environment=environment(cfg),
            finished_at=None, error=None)
        for name, value in fields.items():
            setattr(self, name, value)
        self.flow_runs.append({"attempt": self.attempts, "flow_run_id": flow_run_id, "at": utc_now()})

    def resume_event(self, result: ChunkResult, flow_run_id: str | None) -> dict[str, Any]:
        """How the attempt began, from what training actually loaded (the attempt's first chunk):
        the checkpoint (None: it started over), the epochs it kept, the checkpoints it skipped."""
        return {"attempt": self.attempts, "at": utc_now(), "flow_run_id": flow_run_id,
                "from_checkpoint": result.loaded, "epochs_saved": result.start_epoch,
                "epochs": self.config["epochs"], "skipped_checkpoints": result.skipped_checkpoints}

    def add_chunk(self, result: ChunkResult) -> None:
        """A trained chunk's row."""
        row = {"epochs": f"{result.start_epoch + 1}-{result.end_epoch}", "epoch": result.end_epoch,
               "seconds": round(result.seconds, 3), "checkpoint": result.checkpoint, "attempt": self.attempts,
               "finished_at": utc_now()}
        if result.resumed_from:  # only a chunk that resumed: an attempt's first, or a retry
            row["resumed_from"] = result.resumed_from
        self.chunks[str(result.chunk)] = row | {k: result.last[k] for k in LOSSES if k in result.last}

    def interrupted(self, exc: BaseException) -> None:
        """Mark the attempt ``stopped`` (SIGTERM/Ctrl-C arrive as BaseException) or ``failed``."""
        self.status = "failed" if isinstance(exc, Exception) else "stopped"
        self.ended_at = utc_now()
        self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]

    def chunk_rows(self, manifests: list[Manifest], history: dict[str, list[float]]) -> list[dict[str, Any]]:
        """Per-chunk rows: what the record holds, completed from the checkpoint manifests for
        chunks whose report was lost (killed right after the checkpoint), losses from the history."""
        rows = {int(k): dict(v) for k, v in self.chunks.items()}
        for m in reversed(manifests):  # newest first: a chunk saved twice (SIGTERM) shows its end
            rows.setdefault(m.chunk, {"epoch": m.epoch + 1, "checkpoint": m.file, "seconds": None})
        epochs = [int(e) for e in history.get("epoch", [])]
        previous = 0
        for k in sorted(rows):
            row = rows[k]
            row.setdefault("epochs", f"{previous + 1}-{row['epoch']}")
            if row["epoch"] in epochs:
                i = epochs.index(row["epoch"])
                row.update({c: history[c][i] for c in LOSSES if c in history and c not in row})
            previous = row["epoch"]
        return [{"chunk": k, **rows[k]} for k in sorted(rows)]


def git_info(root: Path = ROOT) -> dict[str, Any] | None:
    """Where the running code is (a deployment's clone, or a checkout), its commit and whether
    tracked files differ from it; None without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"root": str(root), "commit": commit.stdout.strip(),
            "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def environment(cfg: TrainConfig) -> dict[str, Any]:
    """Python, library versions, device and git commit of this attempt."""
    import torch

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev: dict[str, Any] = {"type": "cuda" if cuda else "cpu", "threads": cfg.thread_count(),
                           "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if cuda:
        dev.update(name=torch.cuda.get_device_name(0), cuda=torch.version.cuda, count=torch.cuda.device_count())
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": platform.node(),
            "libraries": versions, "device": dev, "git": git_info(), **job_code(cfg.job)}


def job_code(job: str) -> dict[str, Any]:
    """For a job of the user's own (``--job module:NAME``): where its module is, and its git
    commit when it is in a repository; trainflow's own commit is ``git``."""
    module = sys.modules.get(job.rpartition(".")[0]) if "." in job else None
    if module is None or not getattr(module, "__file__", None):
        return {}
    folder = Path(module.__file__).resolve().parent
    return {"job_code": {"module": module.__name__, "file": str(Path(module.__file__).resolve()),
                         "git": git_info(folder)}}
