"""The kernel: what every layer shares and nothing else. It imports no other project module
(and not torch), so jobs, storage and the command import it cheaply.

- ``UserError``: bad input, reported in one line, never retried.
- ``TrainConfig``: everything that defines a run (frozen pydantic; the CLI, the flows and the
  deployments derive their options from it).
- Paths of the repository and of the local cache (``cache_root``), and atomic file I/O (``atomic_write_*``: the old file or the whole
  new one, never a torn one), ``read_json``, ``sha256_file``, ``utc_now``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"
ARTIFACTS_DIR = ROOT / "artifacts"
#: Where run folders go on a worker when a deployment run names none (shared storage on a cluster).
ARTIFACTS_ENV = "TRAINFLOW_ARTIFACTS_DIR"


#: The models train in float32: a larger lr or weight decay overflows in the optimizer's step.
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch
#: Epoch numbers seed each epoch's shuffle (``seed * 1_000_003 + epoch`` must fit torch's 64-bit seed).
MAX_EPOCHS = 10**12


class UserError(Exception):
    """Bad input from the user: reported as one line, never retried."""


def location(value: Any) -> Any:
    """A local path (``Path``; ``file://`` URLs too) or a store URL (``s3://...``, kept as text:
    ``Path`` would fold its ``//``). tasks/storage/store.py resolves URLs."""
    text = str(value)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" not in text:
        return Path(value)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/]+(/.*)?", text):
        scheme = text.split("://", 1)[0]
        raise ValueError(f"the URL names no bucket: use {scheme}://BUCKET or {scheme}://BUCKET/PREFIX")
    return text


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
    precision: Literal["32", "bf16", "fp16"] = Field(
        default="32", description="32: float32; bf16: torch.autocast to bfloat16 (CPU and CUDA); fp16: autocast to "
        "float16 with a GradScaler (CUDA only)")
    grad_accum: int = Field(default=1, ge=1, le=4096, description="batches whose gradients add up to one optimizer "
                            "step: the result of a batch this many times larger, in the memory of one")
    clip_grad_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                         description="clip the gradients' total norm to this before each step (default off)")
    num_workers: int = Field(default=0, ge=0, le=256, description="DataLoader worker processes of a Dataset job "
                             "(0: load in the training process); the trained numbers do not depend on it")
    compile: bool = Field(default=False, description="train the model through torch.compile (see docs/performance.md)")
    threads: Annotated[int, Field(gt=0, le=1024)] | Literal["auto"] = Field(
        default="auto", description="torch intra-op CPU threads per process; auto: $OMP_NUM_THREADS if set, else the "
        "usable cores but one, shared by the processes; resolved when the run folder is created and kept with it")
    nproc_per_node: int = Field(default=1, ge=1, le=1024, description="processes that train each chunk together, "
                                "data-parallel (torch.distributed DDP, torchrun's name; docs/distributed.md)")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="torch.distributed backend with --nproc-per-node > 1 (auto: nccl on CUDA, gloo on CPU)")
    oversubscribe: bool = Field(default=False, description="allow more CPU processes (--nproc-per-node) than this "
                                "machine has cores (default: refused; they would only wait for each other)")
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
    mlflow: str | None = Field(default=None, description="MLflow tracking URI to log the run to (default: "
                               "$MLFLOW_TRACKING_URI if set; needs pip install -e '.[mlflow]'; docs/mlflow.md)")

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
        for k, default in LATER_OPTIONS.items():  # runs made before these options existed still match
            if out[k] == default:
                del out[k]
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
    a core: on shared cores, a team that takes them all is many times slower beside one busy
    process (docs/performance.md)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (usable_cores() - 1) // processes)


def cache_root() -> Path:
    """Staging folders, downloaded data and shards: ``$TRAINFLOW_CACHE``, else ~/.cache/trainflow."""
    if os.environ.get("TRAINFLOW_CACHE"):
        return Path(os.environ["TRAINFLOW_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainflow"


def usable_cores() -> int:
    """The cores this process may use (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: Raised when training changes its floats for an existing config. 2: the textbook step (LeNet
#: trained in shards with a batch-major conv under format 1, so those runs cannot continue exactly).
TRAINING_FORMAT = 2

# `data` is identified by content (data fingerprint), not by where the file lives.
IDENTITY_EXCLUDE = frozenset(
    {"run_name", "artifacts_dir", "fresh", "device", "data", "keep_last", "save_best", "wait_lock", "oversubscribe",
     "num_workers", "mlflow"}
)
#: Options added after TRAINING_FORMAT 2, part of the identity only when not at their default.
LATER_OPTIONS = {"precision": "32", "grad_accum": 1, "clip_grad_norm": None}


# --- files ---------------------------------------------------------------------------------


def utc_now() -> str:
    """ISO-8601 UTC timestamp, seconds resolution."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fsync_dir(folder: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The temp files of :func:`atomic_write_bytes`: debris once the writer was killed mid-write.
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The temp file is in the same folder (a rename is atomic only within one file system) and is
    created by a plain open(), so it gets the usual mode (mkstemp's 0600 would hide files from the
    other users of shared storage); its random name keeps concurrent writers apart."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")  # TEMP_NAME
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write a UTF-8 text file (JSON, CSV, markdown)."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def remove_debris(folders: list[Path]) -> list[Path]:
    """Delete the temp files that killed writers left in ``folders``. Call it only while holding
    the folder's lock: then no live writer owns one of them."""
    removed = []
    for folder in folders:
        for path in Path(folder).glob(".*.tmp"):
            if TEMP_NAME.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def saved_traceback(exc: BaseException) -> str:
    """Write ``exc``'s traceback to a file of its own; its path. Bad input is one line; the
    line names this file, where the detail is kept for whoever needs it."""
    fd, name = tempfile.mkstemp(prefix="trainflow-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(exc)))
    return name


def own_line(message: str, name: str) -> str:
    """The text after ``name: `` in ``message``'s last line that has it, else ``message``: an
    exception raised in a DataLoader worker is raised again in the training process with the
    worker's whole traceback as its message; its own one line is in there."""
    lines = [line for line in message.splitlines() if f"{name}: " in line]
    return lines[-1].split(f"{name}: ", 1)[1] if lines else message


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
