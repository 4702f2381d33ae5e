"""``run.json``: what a run folder is and how each attempt went (config, data fingerprint,
environment, resumes, one row per chunk, status), and once complete the sha256 of every file.
Plain dicts, free of Prefect; :class:`tasks.reporting.RunReport` decides when to write them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.checkpoint import sha256_file
from tasks.history import manifests
from tasks.jobs.spec import ROOT, TrainConfig
from tasks.run import LOCK_FILE, OWNER_FILE, RUN_FILE, read_json, utc_now, where
from tasks.store import remote_of

#: Not hashed into run.json: run.json itself and the lock files of whoever holds the folder.
UNHASHED = frozenset({RUN_FILE, LOCK_FILE, OWNER_FILE})
LIBRARIES = ("torch", "torchvision", "prefect", "numpy", "pandas", "pydantic", "matplotlib", "tensorboard")
#: Columns copied into a chunk's row (its last epoch's values).
LOSSES = ("train_loss", "val_loss", "val_accuracy")


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
    return {"root": str(root), "commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


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
    dev: dict[str, Any] = {"type": device.type, "threads": cfg.thread_count(), "cpu_count": os.cpu_count(),
                           "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        dev.update(name=torch.cuda.get_device_name(0), cuda=torch.version.cuda, count=torch.cuda.device_count())
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": platform.node(),
            "libraries": versions, "device": dev, "git": git_info()}


def begin_attempt(run_dir: Path, cfg: TrainConfig, data_fingerprint: str, fingerprint: str,
                  flow_run_id: str | None, data_source: str | None = None) -> dict[str, Any]:
    """run.json as it was, marked ``running`` for one more attempt."""
    record = read_json(run_dir / RUN_FILE) or {"started_at": utc_now(), "attempts": 0}
    attempt = int(record.get("attempts", 0)) + 1
    record.update(
        job=cfg.job, run_name=run_dir.name, run_dir=where(run_dir.resolve()), status="running", attempts=attempt,
        attempt_started_at=utc_now(), fingerprint=fingerprint, data_fingerprint=data_fingerprint, data=str(cfg.data),
        data_source=data_source or str(cfg.data),
        identity=cfg.identity(), config=cfg.model_dump(mode="json"), environment=environment(cfg),
    )
    record.pop("finished_at", None)
    record.pop("error", None)
    record.setdefault("resumes", [])
    record.setdefault("chunks", {})
    record.setdefault("flow_runs", []).append({"attempt": attempt, "flow_run_id": flow_run_id, "at": utc_now()})
    return record


def resume_event(record: dict[str, Any], result: dict[str, Any], flow_run_id: str | None) -> dict[str, Any]:
    """How the attempt began, from what training actually loaded (``result`` of the attempt's
    first chunk): the checkpoint (None: it started over), the epochs it kept, and the newer
    checkpoints it skipped as damaged or unfinished (no manifest could tell any of this)."""
    saved = int(result["epoch"] if result.get("skipped") else result["start_epoch"])
    return {"attempt": record["attempts"], "at": utc_now(), "flow_run_id": flow_run_id,
            "from_checkpoint": result.get("loaded"), "epochs_saved": saved, "epochs": record["config"]["epochs"],
            "skipped_checkpoints": result.get("skipped_checkpoints", [])}


def chunk_row(record: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A trained chunk's row in run.json."""
    row = {"epochs": f"{int(result['start_epoch']) + 1}-{int(result['end_epoch'])}",
           "epoch": int(result["end_epoch"]), "seconds": round(float(result["seconds"]), 3),
           "checkpoint": result.get("checkpoint"), "attempt": record["attempts"],
           "finished_at": utc_now()}
    if result.get("resumed_from"):  # only a chunk that resumed: an attempt's first, or a retry
        row["resumed_from"] = result["resumed_from"]
    return row | {k: result[k] for k in LOSSES if k in result}


def chunk_rows(record: dict[str, Any], run_dir: Path, history: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per-chunk rows: what run.json recorded, completed from the checkpoint manifests for
    chunks whose report was lost (killed right after the checkpoint), losses from the history."""
    rows = {int(k): dict(v) for k, v in record.get("chunks", {}).items()}
    for m in reversed(manifests(run_dir)):  # newest first: a chunk saved twice (SIGTERM) shows its end
        rows.setdefault(int(m["chunk"]), {"epoch": int(m["epoch"]) + 1, "checkpoint": m["file"], "seconds": None})
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


def mark_interrupted(record: dict[str, Any], exc: BaseException) -> None:
    """Mark the attempt ``stopped`` (SIGTERM/Ctrl-C arrive as BaseException) or ``failed``."""
    record.update(status="failed" if isinstance(exc, Exception) else "stopped", ended_at=utc_now(),
                  error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])


def hash_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the run folder (relative POSIX paths), except
    run.json, the lock files and hidden temp files; a run on a store lists its committed
    checkpoints from their manifests (they are not staged)."""
    out = {}
    if remote_of(run_dir) is not None:
        out = {f"checkpoints/{m['file']}": {"sha256": m["sha256"], "bytes": m["bytes"]} for m in manifests(run_dir)}
    for path in sorted(Path(run_dir).rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and rel.as_posix() not in UNHASHED and not any(p.startswith(".") for p in rel.parts):
            out[rel.as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def verify_hashes(run_dir: Path) -> list[str]:
    """Files whose sha256 differs from run.json's record (empty when all match)."""
    record = read_json(Path(run_dir) / RUN_FILE) or {}
    return [rel for rel, info in record.get("files", {}).items()
            if not (Path(run_dir) / rel).is_file() or sha256_file(Path(run_dir) / rel) != info["sha256"]]
