"""What a run is doing and what it produced, in the Prefect UI and in the run folder.

Called from the flow body (``flows/train_flow.py`` ``run_job``), never with tensors:

- :meth:`RunReport.start` once per attempt: ``run.json`` (config, data fingerprint, library
  versions, device, git commit, resume events), the job's ``latest`` pointer, a Prefect
  progress artifact, and a log line when the attempt resumes from a checkpoint.
- :meth:`RunReport.chunk_done` after every chunk: TensorBoard events for the new epochs,
  the progress artifact, the chunk's row in ``run.json``.
- :meth:`RunReport.finish` at the end: ``loss.png``, ``summary.md``, Prefect markdown and
  table artifacts, and ``run.json`` with status ``completed`` and the sha256 of every file.

Everything is derived from what is on disk (``history.csv``, checkpoint manifests,
``run.json``), so a resumed or retried run reports exactly as an uninterrupted one would.
Observability never breaks training: a failing Prefect API call or plot is logged as a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    load_checkpoint,
    sha256_file,
)
from tasks.jobs.spec import ROOT, TrainConfig
from tasks.run import LOCK_FILE, OWNER_FILE, RUN_FILE, read_json, utc_now

log = logging.getLogger("trainflow.reporting")

HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.md"
LOSS_PNG = "loss.png"
TB_DIR = "tensorboard"
LATEST = "latest"
#: Not hashed into run.json: run.json itself and the lock files of whoever holds the folder.
UNHASHED = frozenset({RUN_FILE, LOCK_FILE, OWNER_FILE})
LIBRARIES = ("torch", "torchvision", "prefect", "numpy", "pandas", "pydantic", "matplotlib", "tensorboard")
#: history column -> TensorBoard tag (other ``val_<m>`` columns become ``<M>/val``).
TB_TAGS = {"train_loss": "Loss/train", "val_loss": "Loss/val", "val_accuracy": "Accuracy/val", "lr": "LearningRate"}
# One events file per write, named by the epochs it holds: the names are the record of what is
# written, so a crash at any point can neither lose nor duplicate a step.
_TB_NAME = re.compile(r"^events\.out\.tfevents\.(\d{9})-(\d{9})\.trainflow$")
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what a plain open() gives (mkstemp's 0600 would hide files from other users)


# --- names -----------------------------------------------------------------------------------


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes only (Prefect's rule for artifact keys)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def artifact_key(job: str, run_name: str, kind: str) -> str:
    """``<job>-<run>-<kind>``, e.g. ``nonlinear-run-8f957a76e2-progress``, ``fashion-mnist-r-summary``."""
    return slug(f"{job}-{run_name}-{kind}")


def duration(seconds: float | None) -> str:
    """``'42s'``, ``'3m 05s'``, ``'1h 02m'``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


# --- environment -----------------------------------------------------------------------------


def git_info(root: Path = ROOT) -> dict[str, Any] | None:
    """Commit of the project's checkout and whether tracked files differ from it; None without git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cfg: TrainConfig) -> dict[str, Any]:
    """Python, library versions, device and git commit of this attempt."""
    import torch

    from tasks.training import resolve_device

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    device = resolve_device(cfg)
    dev: dict[str, Any] = {"type": device.type, "threads": cfg.threads, "shards": cfg.shards, "cpu_count": os.cpu_count(),
                           "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        dev.update(name=torch.cuda.get_device_name(0), cuda=torch.version.cuda, count=torch.cuda.device_count())
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "libraries": versions,
        "device": dev,
        "git": git_info(),
    }


# --- what is on disk -------------------------------------------------------------------------


def manifests(run_dir: Path) -> list[dict[str, Any]]:
    """Manifests of the checkpoints present (``.pt`` and ``.json``), oldest chunk first."""
    found = []
    for m in Path(run_dir, "checkpoints").glob("checkpoint-*.json"):
        data = read_json(m)
        if data and "chunk" in data and m.with_suffix(".pt").exists():
            found.append(data)
    return sorted(found, key=lambda d: int(d["chunk"]))


def read_history_csv(path: Path) -> dict[str, list[float]]:
    """``history.csv`` as columns of floats ({} when absent)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    if not lines:
        return {}
    cols = lines[0].split(",")
    out: dict[str, list[float]] = {c: [] for c in cols}
    for line in lines[1:]:
        for c, v in zip(cols, line.split(",")):
            out[c].append(float(v))
    return out


def read_history(run_dir: Path) -> dict[str, list[float]]:
    """The per-epoch history of the newest checkpoint. ``history.csv`` is written right after
    each checkpoint; if the process died in between, the checkpoint's own history is used."""
    history = read_history_csv(Path(run_dir) / HISTORY_FILE)
    newest = manifests(run_dir)[-1:]
    if newest and len(history.get("epoch", [])) < int(newest[0]["epoch"]) + 1:
        try:
            ckpt = load_checkpoint(Path(run_dir) / "checkpoints" / newest[0]["file"])
            history = {k: [float(x) for x in v.tolist()] for k, v in ckpt["history"].items()}
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is training's business
            log.warning("history: %s", exc)
    return history


def hash_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the run folder (relative POSIX paths), except
    run.json, the lock files and hidden temp files."""
    run_dir = Path(run_dir)
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or rel.as_posix() in UNHASHED or any(p.startswith(".") for p in rel.parts):
            continue
        out[rel.as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


# --- TensorBoard -----------------------------------------------------------------------------


def tb_tag(column: str) -> str | None:
    """TensorBoard tag for a history column (None for ``epoch``)."""
    if column in TB_TAGS:
        return TB_TAGS[column]
    if column.startswith("val_"):
        return f"{column[4:].capitalize()}/val"
    return None


def tensorboard_written(tb_dir: Path) -> int:
    """Last epoch (step) already in ``tb_dir``'s events files (0 when none)."""
    last = 0
    if Path(tb_dir).is_dir():
        for p in Path(tb_dir).iterdir():
            m = _TB_NAME.match(p.name)
            if m:
                last = max(last, int(m.group(2)))
    return last


def write_tensorboard(run_dir: Path, history: dict[str, list[float]]) -> Path | None:
    """Append the epochs after the last step already written as one new events file in
    ``<run>/tensorboard/`` (step = 1-based epoch). The file appears atomically under a name
    holding its epoch range, so rewriting after any crash adds no duplicate steps."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    tb_dir = Path(run_dir) / TB_DIR
    tb_dir.mkdir(exist_ok=True)
    for stale in tb_dir.glob(".tb-*.tmp"):  # a writer killed mid-write (we hold the run folder)
        stale.unlink(missing_ok=True)
    epochs = history.get("epoch", [])
    last = tensorboard_written(tb_dir)
    rows = [i for i, e in enumerate(epochs) if int(e) > last]
    if not rows:
        return None
    now = time.time()
    buf = io.BytesIO()
    writer = RecordWriter(buf)
    writer.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    tags = {c: tb_tag(c) for c in history if tb_tag(c)}
    for i in rows:
        values = [Summary.Value(tag=tag, simple_value=history[c][i]) for c, tag in tags.items() if i < len(history[c])]
        writer.write(Event(wall_time=now, step=int(epochs[i]), summary=Summary(value=values)).SerializeToString())
    name = f"events.out.tfevents.{int(epochs[rows[0]]):09d}-{int(epochs[rows[-1]]):09d}.trainflow"
    # The temp name must not contain "tfevents": TensorBoard would read a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".tb-", suffix=".tmp", dir=tb_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tb_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(tb_dir)
    return tb_dir / name


# --- latest pointer --------------------------------------------------------------------------


def update_latest(run_dir: Path) -> Path | None:
    """Point ``<artifacts>/<job>/latest`` at ``run_dir``: a relative symlink, replaced
    atomically (a one-line text file holding the run name where symlinks are unavailable)."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    if link.is_dir() and not link.is_symlink():
        log.warning("%s is a run folder, not a pointer; not updating it", link)
        return None
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_text(link, run_dir.name + "\n")
    return link


def resolve_run(path: Path) -> Path:
    """A run folder from a path that may be a ``latest`` pointer (symlink or text file)."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return path.parent / path.read_text().strip()
    return path.resolve() if path.is_symlink() else path


# --- markdown --------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, default=str)
        return text if len(text) <= 300 else text[:297] + "..."
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def resume_text(resumes: list[dict[str, Any]]) -> str:
    """One line on whether and from where the run resumed."""
    if not resumes:
        return "no (one uninterrupted attempt)"
    parts = [f"attempt {r['attempt']} from `{r['from_checkpoint']}` ({r['epochs_saved']} of {r['epochs']} epochs kept)"
             for r in resumes]
    return "yes: " + "; ".join(parts)


def summary_markdown(record: dict[str, Any], metrics: dict[str, Any], chunks: list[dict[str, Any]],
                     plots: list[str], images: bool) -> str:
    """The run summary (``summary.md`` and the Prefect markdown artifact). ``images`` embeds
    the PNGs by relative path (works in an editor or on a git host, not in the Prefect UI)."""
    cfg = record.get("config", {})
    timed = [c["seconds"] for c in chunks if c.get("seconds") is not None]
    per_chunk = (f"{duration(sum(timed))} for {len(timed)} timed chunks, {duration(sum(timed) / len(timed))} per chunk"
                 if timed else "?")
    lines = [f"# {record['job']} · {record['run_name']}", ""]
    lines += _table(["", ""], [
        ["job", record["job"]],
        ["run folder", f"`{record['run_dir']}`"],
        ["status", record.get("status")],
        ["started / finished", f"{record.get('started_at')} / {record.get('finished_at', '-')}"],
        ["attempts", record.get("attempts")],
        ["resumed", resume_text(record.get("resumes", []))],
        ["epochs", f"{metrics.get('epochs_trained', cfg.get('epochs'))} of {cfg.get('epochs')}"
                   + (" (stopped early)" if metrics.get("stopped_early") else "")],
        ["training time", per_chunk],
        ["device", (record.get("environment") or {}).get("device", {}).get("type")],
        ["git commit", ((record.get("environment") or {}).get("git") or {}).get("commit", "-")],
    ])
    parts = [p for p in ("val", "test") if isinstance(metrics.get(p), dict)]
    if parts:
        keys = sorted({k for p in parts for k in metrics[p]} - {"rows"})
        lines += ["", "## Final metrics", ""]
        lines += _table(["split", "rows", *keys], [[p, metrics[p].get("rows"), *(metrics[p].get(k, "") for k in keys)]
                                                    for p in parts])
    other = {k: v for k, v in metrics.items() if k not in ("val", "test", "job")}
    if other:
        lines += [""] + [f"- **{k}**: {_fmt(v)}" for k, v in other.items()]
    lines += ["", "## Chunks", ""]
    lines += _table(*chunk_table(chunks))
    lines += ["", "## Config", ""]
    lines += _table(["option", "value"], [[k, v] for k, v in cfg.items()])
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" if images else f"- `{p}`" for p in plots]
    lines += ["", f"TensorBoard: `tensorboard --logdir {record['run_dir']}/{TB_DIR}`", ""]
    return "\n".join(lines)


def chunk_table(chunks: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-chunk history."""
    acc = any("val_accuracy" in c for c in chunks)
    header = ["chunk", "epochs", "epoch", "train_loss", "val_loss", *(["val_accuracy"] if acc else []), "seconds",
              "checkpoint"]
    rows = [[c.get(h, "") if c.get(h) is not None else "" for h in header] for c in chunks]
    return header, rows


# --- Prefect ---------------------------------------------------------------------------------


def _prefect(what: str, fn, *args: Any, **kwargs: Any) -> Any:
    """Call a Prefect artifact function; failures are warnings, never a failed training run."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - observability must not stop training
        log.warning("could not %s: %s: %s", what, type(exc).__name__, exc)
        return None


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:  # noqa: BLE001
        return None


# --- the report of one attempt ---------------------------------------------------------------


class RunReport:
    """Reporting state of one attempt at one run folder (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, data_fingerprint: str, fingerprint: str, logger: Any = log):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), logger
        self.data_fingerprint, self.fingerprint = data_fingerprint, fingerprint
        self.record: dict[str, Any] = {}
        self.progress_id = None
        self.t0 = time.monotonic()
        self.trained_epochs = 0  # epochs trained by this attempt, for the ETA
        self.trained_seconds = 0.0

    def key(self, kind: str) -> str:
        return artifact_key(self.cfg.job, self.run_dir.name, kind)

    def write_record(self) -> None:
        atomic_write_json(self.run_dir / RUN_FILE, self.record)

    @classmethod
    def start(cls, cfg: TrainConfig, run_dir: Path, data_fingerprint: str, fingerprint: str,
              logger: Any = log) -> RunReport:
        """Begin an attempt: run.json, latest pointer, resume log line, progress artifact."""
        self = cls(cfg, run_dir, data_fingerprint, fingerprint, logger)
        record = read_json(self.run_dir / RUN_FILE) or {"started_at": utc_now(), "attempts": 0}
        attempt = int(record.get("attempts", 0)) + 1
        newest = manifests(self.run_dir)[-1:]
        record.update(
            job=cfg.job, run_name=self.run_dir.name, run_dir=str(self.run_dir.resolve()), status="running",
            attempts=attempt, attempt_started_at=utc_now(), fingerprint=fingerprint,
            data_fingerprint=data_fingerprint, data=str(cfg.data), identity=cfg.identity(),
            config=cfg.model_dump(mode="json"), environment=environment(cfg),
        )
        record.pop("finished_at", None)
        record.pop("error", None)
        record.setdefault("resumes", [])
        record.setdefault("chunks", {})
        flow_run_id = _flow_run_id()
        record.setdefault("flow_runs", []).append({"attempt": attempt, "flow_run_id": flow_run_id, "at": utc_now()})
        if newest:
            m = newest[0]
            saved = int(m["epoch"]) + 1
            event = {"attempt": attempt, "at": utc_now(), "flow_run_id": flow_run_id, "from_checkpoint": m["file"],
                     "epochs_saved": saved, "epochs": cfg.epochs}
            record["resumes"].append(event)
            logger.info("%s: resuming %s from %s: %d of %d epochs already done and not redone",
                        cfg.job, self.run_dir.name, m["file"], saved, cfg.epochs)
        self.record = record
        self.write_record()
        update_latest(self.run_dir)
        from prefect.artifacts import create_progress_artifact

        history = read_history(self.run_dir) if newest else {}
        self.progress_id = _prefect("create the progress artifact", create_progress_artifact,
                                    progress=self._percent(history), key=self.key("progress"),
                                    description=self._progress_text(history))
        return self

    def _percent(self, history: dict[str, list[float]]) -> float:
        done = int(history["epoch"][-1]) if history.get("epoch") else 0
        return round(100.0 * done / self.cfg.epochs, 2)

    def _progress_text(self, history: dict[str, list[float]], finished: bool = False) -> str:
        if not history.get("epoch"):
            return f"epoch 0/{self.cfg.epochs}, starting"
        i = -1
        done = int(history["epoch"][i])
        parts = [f"epoch {done}/{self.cfg.epochs}", f"train loss {history['train_loss'][i]:.4g}"]
        if history.get("val_loss"):
            parts.append(f"val loss {history['val_loss'][i]:.4g}")
        if history.get("val_accuracy"):
            parts.append(f"val accuracy {history['val_accuracy'][i]:.4f}")
        if finished:
            parts.append("done")
        elif self.trained_epochs:
            parts.append(f"ETA {duration((self.cfg.epochs - done) * self.trained_seconds / self.trained_epochs)}")
        return ", ".join(parts)

    def chunk_done(self, result: dict[str, Any]) -> None:
        """After each chunk: TensorBoard events for the new epochs, the chunk's row in run.json,
        the progress artifact."""
        history = read_history(self.run_dir)
        try:
            write_tensorboard(self.run_dir, history)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not write TensorBoard events: %s: %s", type(exc).__name__, exc)
        if not result.get("skipped"):
            self.trained_epochs += int(result["end_epoch"]) - int(result["start_epoch"])
            self.trained_seconds += float(result["seconds"])
            row = {"epochs": f"{int(result['start_epoch']) + 1}-{int(result['end_epoch'])}",
                   "epoch": int(result["end_epoch"]), "seconds": round(float(result["seconds"]), 3),
                   "checkpoint": result.get("checkpoint"), "attempt": self.record["attempts"],
                   "resumed_from": result.get("resumed_from"), "finished_at": utc_now()}
            for k in ("train_loss", "val_loss", "val_accuracy"):
                if k in result:
                    row[k] = result[k]
            self.record["chunks"][str(result["chunk"])] = row
            self.write_record()
        if self.progress_id is not None:
            from prefect.artifacts import update_progress_artifact

            _prefect("update the progress artifact", update_progress_artifact, artifact_id=self.progress_id,
                     progress=self._percent(history), description=self._progress_text(history))

    def chunks(self, history: dict[str, list[float]]) -> list[dict[str, Any]]:
        """Per-chunk rows: what run.json recorded, completed from the checkpoint manifests for
        chunks whose report was lost (killed right after the checkpoint)."""
        rows = {int(k): dict(v) for k, v in self.record.get("chunks", {}).items()}
        epochs = [int(e) for e in history.get("epoch", [])]
        for m in manifests(self.run_dir):
            k = int(m["chunk"])
            if k not in rows:
                rows[k] = {"epoch": int(m["epoch"]) + 1, "checkpoint": m["file"], "seconds": None}
        previous = 0
        for k in sorted(rows):
            row = rows[k]
            row.setdefault("epochs", f"{previous + 1}-{row['epoch']}")
            if row["epoch"] in epochs:  # losses at the chunk's last epoch, from the history
                i = epochs.index(row["epoch"])
                for c in ("train_loss", "val_loss", "val_accuracy"):
                    if c in history and c not in row:
                        row[c] = history[c][i]
            previous = row["epoch"]
        return [{"chunk": k, **rows[k]} for k in sorted(rows)]

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """End of a completed run: loss.png, summary.md, Prefect summary + table artifacts,
        and run.json (status completed, sha256 of every file) written last."""
        from prefect.artifacts import (
            create_markdown_artifact,
            create_table_artifact,
            update_progress_artifact,
        )

        from tasks.plots import plot_losses

        history = read_history(self.run_dir)
        try:
            write_tensorboard(self.run_dir, history)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not write TensorBoard events: %s: %s", type(exc).__name__, exc)
        try:
            plot_losses(history, self.run_dir / LOSS_PNG, f"{self.cfg.job} · {self.run_dir.name}: loss per epoch")
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not plot %s: %s: %s", LOSS_PNG, type(exc).__name__, exc)
        plots = sorted(p.name for p in self.run_dir.glob("*.png"))
        chunks = self.chunks(history)
        self.record.update(status="completed", finished_at=utc_now(), duration_s=round(time.monotonic() - self.t0, 3))
        atomic_write_text(self.run_dir / SUMMARY_FILE, summary_markdown(self.record, metrics, chunks, plots, images=True))
        markdown = summary_markdown(self.record, metrics, chunks, plots, images=False)
        _prefect("create the summary artifact", create_markdown_artifact, markdown=markdown, key=self.key("summary"),
                 description=f"{self.cfg.job} run {self.run_dir.name}: summary")
        header, rows = chunk_table(chunks)
        _prefect("create the history table artifact", create_table_artifact,
                 table=[dict(zip(header, row)) for row in rows], key=self.key("history"),
                 description=f"{self.cfg.job} run {self.run_dir.name}: per-chunk history")
        if self.progress_id is not None:
            _prefect("update the progress artifact", update_progress_artifact, artifact_id=self.progress_id,
                     progress=100.0, description=self._progress_text(history, finished=True))
        self.record["files"] = hash_files(self.run_dir)
        self.write_record()  # last: "completed" means every output is in place
        self.log.info("%s: summary in %s; TensorBoard: tensorboard --logdir %s", self.cfg.job,
                      self.run_dir / SUMMARY_FILE, self.run_dir / TB_DIR)
        return self.record

    def interrupted(self, exc: BaseException) -> None:
        """The attempt ended without finishing: record why (a rerun resumes)."""
        stopped = not isinstance(exc, Exception)  # SIGTERM/Ctrl-C arrive as BaseException
        self.record.update(status="stopped" if stopped else "failed", ended_at=utc_now(),
                           error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        try:
            self.write_record()
        except OSError as err:
            self.log.warning("could not update %s: %s", RUN_FILE, err)


def verify_hashes(run_dir: Path) -> list[str]:
    """Files whose sha256 differs from run.json's record (empty when all match)."""
    record = read_json(Path(run_dir) / RUN_FILE) or {}
    bad = []
    for rel, info in record.get("files", {}).items():
        path = Path(run_dir) / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
            bad.append(rel)
    return bad
