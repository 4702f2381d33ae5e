"""The run folder: where it is, whether it may be resumed, who holds it."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks.checkpoint import atomic_write_json
from tasks.jobs.spec import TRAINING_FORMAT, TrainConfig, UserError

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


def utc_now() -> str:
    """ISO-8601 UTC timestamp, seconds resolution."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_name_for(cfg: TrainConfig, fingerprint: str) -> str:
    """``--run-name`` if given, else derived from the config and data, so rerunning the same
    command after a kill finds the same folder (never from the flow run id)."""
    return cfg.run_name or f"run-{fingerprint[:10]}"


def run_dir_for(cfg: TrainConfig, fingerprint: str) -> Path:
    """``<artifacts>/<job>/<run-name>``."""
    return Path(cfg.artifacts_dir) / cfg.job / run_name_for(cfg, fingerprint)


def check_writable(folder: Path, what: str = "artifacts dir",
                   fix: str = "pass --artifacts-dir to a writable folder") -> None:
    """Fail early, in one line, when ``folder`` cannot be written (before any training)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {folder} is not writable ({exc.strerror or exc}); {fix}") from None


def check_run_writable(run_dir: Path) -> None:
    """An existing run folder and its checkpoints folder take writes (a read-only one would only
    be found after a chunk has trained, three times over with the retries)."""
    if is_complete(run_dir):
        return  # only read: a finished run on a read-only share still reports its result
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            check_writable(folder, "run folder" if folder == run_dir else "checkpoints folder",
                           "make it writable, then rerun the same command to resume (nothing was trained)")


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``'lr 0.0001 -> 0.001, epochs 10000 -> 500'`` for the fields that differ."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def archive(run_dir: Path) -> Path:
    """Move an old run folder aside (``--fresh``): nothing is deleted."""
    target = run_dir.with_name(f"{run_dir.name}.archived-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('~')[0]}~{n}")
    run_dir.rename(target)
    return target


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def config_record(cfg: TrainConfig, data_fingerprint: str) -> dict[str, Any]:
    """What ``config.json`` holds."""
    return {
        "job": cfg.job,
        "format": TRAINING_FORMAT,
        "fingerprint": cfg.fingerprint(data_fingerprint),
        "data_fingerprint": data_fingerprint,
        "identity": cfg.identity(),
        "config": cfg.model_dump(mode="json"),
    }


def check_compatible(run_dir: Path, cfg: TrainConfig, data_fingerprint: str) -> None:
    """Refuse to resume into a folder made with another config or other data."""
    old = read_json(run_dir / CONFIG_FILE)
    if old is None:
        return
    if old.get("fingerprint") == cfg.fingerprint(data_fingerprint):
        return
    if old.get("format", 1) != TRAINING_FORMAT:
        raise UserError(
            f"run folder {run_dir} was made by an older trainflow that trained with other floats (format "
            f"{old.get('format', 1)}), so it cannot be resumed exactly; use --fresh to archive it and start over, "
            f"or another --run-name"
        )
    diff = describe_difference(old.get("identity", {}), cfg.identity())
    if old.get("data_fingerprint") != data_fingerprint:
        diff = ", ".join(filter(None, [diff, "data content differs"]))
    raise UserError(
        f"run folder {run_dir} was made with a different config ({diff}); "
        f"use another --run-name, or --fresh to archive the old run and start over"
    )


def prepare_run_dir(cfg: TrainConfig, data_fingerprint: str) -> tuple[Path, Path | None]:
    """Resolve, check and create the run folder; with ``--fresh`` archive an existing one.
    Returns ``(run_dir, archived_to)``."""
    check_writable(Path(cfg.artifacts_dir) / cfg.job)
    run_dir = run_dir_for(cfg, cfg.fingerprint(data_fingerprint))
    archived = None
    if run_dir.exists() and cfg.fresh:
        with hold(run_dir):  # never archive a folder another process is writing
            pass
        archived = archive(run_dir)
    else:
        check_compatible(run_dir, cfg, data_fingerprint)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    check_run_writable(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        atomic_write_json(run_dir / CONFIG_FILE, config_record(cfg, data_fingerprint))
    return run_dir, archived


def is_complete(run_dir: Path) -> bool:
    """A run is complete once ``run.json`` says so (written after every output is in place)."""
    record = read_json(Path(run_dir) / RUN_FILE) or {}
    return record.get("status") == "completed" and (Path(run_dir) / "metrics.json").exists()


class hold:  # noqa: N801 - used like a function: ``with hold(run_dir): ...``
    """Exclusive lock on a run folder for this process (an OS file lock, released by the
    kernel when the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, run_dir: Path, wait: float = 0):
        self.run_dir = Path(run_dir)
        self.wait = wait
        self.lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=wait)

    def __enter__(self) -> "hold":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            owner = read_json(self.run_dir / OWNER_FILE) or {}
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"
            raise UserError(
                f"run folder {self.run_dir} is in use by another process ({who}); wait for it to finish, "
                f"pass --wait-lock SECONDS, or use another --run-name"
            ) from None
        atomic_write_json(
            self.run_dir / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
