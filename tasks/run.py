"""The run folder: where it is, whether it may be resumed, who holds it."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks.checkpoint import atomic_write_json, atomic_write_text
from tasks.jobs.spec import TRAINING_FORMAT, TrainConfig, UserError
from tasks.store import REMOTE_FILE, Lease, Remote, is_url, pull, remote_of, staging_dir

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


def run_url(cfg: TrainConfig, fingerprint: str) -> str | None:
    """``<artifacts-url>/<job>/<run-name>`` for a run on a store; None for a local one."""
    if not is_url(cfg.artifacts_dir):
        return None
    return f"{str(cfg.artifacts_dir).rstrip('/')}/{cfg.job}/{run_name_for(cfg, fingerprint)}"


def run_dir_for(cfg: TrainConfig, fingerprint: str) -> Path:
    """``<artifacts>/<job>/<run-name>``, or the local staging folder of a run on a store."""
    url = run_url(cfg, fingerprint)
    return staging_dir(url) if url else Path(cfg.artifacts_dir) / cfg.job / run_name_for(cfg, fingerprint)


def where(run_dir: Path) -> str:
    """What to show a user for a run folder: its URL on a store, else its path."""
    remote = remote_of(run_dir)
    return remote.url if remote else str(run_dir)


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
        "threads": cfg.thread_count(),  # --threads auto, resolved once: a resume elsewhere trains the same
    }


def with_run_threads(cfg: TrainConfig, fingerprint: str) -> TrainConfig:
    """``cfg`` with ``--threads auto`` replaced by the count its run folder stored when it was
    created, so that the same command gives the same floats on a machine with other cores."""
    if cfg.threads != "auto":
        return cfg
    stored = (read_config(cfg, fingerprint) or {}).get("threads")
    return cfg.model_copy(update={"threads": int(stored) if stored else cfg.thread_count()})


def read_config(cfg: TrainConfig, fingerprint: str) -> dict[str, Any] | None:
    """The run's ``config.json`` (from its store for a run on one), or None."""
    url = run_url(cfg, fingerprint)
    if url is None:
        return read_json(run_dir_for(cfg, fingerprint) / CONFIG_FILE)
    try:
        return json.loads(Remote(url).get(CONFIG_FILE))
    except FileNotFoundError:
        return None


def check_compatible(cfg: TrainConfig, data_fingerprint: str) -> None:
    """Refuse to resume into a folder made with another config or other data."""
    fingerprint = cfg.fingerprint(data_fingerprint)
    old = read_config(cfg, fingerprint)
    if old is None or old.get("fingerprint") == fingerprint:
        return
    shown = run_url(cfg, fingerprint) or run_dir_for(cfg, fingerprint)
    if old.get("format", 1) != TRAINING_FORMAT:
        raise UserError(
            f"run folder {shown} was made by an older trainflow that trained with other floats (format "
            f"{old.get('format', 1)}), so it cannot be resumed exactly; use --fresh to archive it and start over, "
            f"or another --run-name"
        )
    diff = describe_difference(old.get("identity", {}), cfg.identity())
    if old.get("data_fingerprint") != data_fingerprint:
        diff = ", ".join(filter(None, [diff, "data content differs"]))
    raise UserError(
        f"run folder {shown} was made with a different config ({diff}); "
        f"use another --run-name, or --fresh to archive the old run and start over"
    )


def check_run(cfg: TrainConfig, data_fingerprint: str) -> None:
    """Before anything runs: the artifacts root takes writes, the run folder was made by this
    config (unless --fresh), and no other process holds it."""
    fingerprint = cfg.fingerprint(data_fingerprint)
    run_dir = run_dir_for(cfg, fingerprint)
    if is_url(cfg.artifacts_dir):
        Remote(f"{str(cfg.artifacts_dir).rstrip('/')}/{cfg.job}").check()
        stage(run_dir, run_url(cfg, fingerprint))
    else:
        check_writable(Path(cfg.artifacts_dir) / cfg.job)
    if not cfg.fresh:
        check_compatible(cfg, data_fingerprint)
        check_run_writable(run_dir)
    if run_dir.exists():
        with hold(run_dir, wait=cfg.wait_lock, pull=False):
            pass


def stage(run_dir: Path, url: str) -> None:
    """Create the staging folder of the run at ``url``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / REMOTE_FILE).exists():
        atomic_write_text(run_dir / REMOTE_FILE, url + "\n")


def prepare_run_dir(cfg: TrainConfig, data_fingerprint: str) -> tuple[Path, str | None]:
    """Resolve, check and create the run folder (on a store: its staging folder, and its
    ``config.json`` there, create-only); with ``--fresh`` archive an existing one. Returns
    ``(run_dir, where it was archived to)``."""
    fingerprint = cfg.fingerprint(data_fingerprint)
    run_dir, url = run_dir_for(cfg, fingerprint), run_url(cfg, fingerprint)
    record = config_record(cfg, data_fingerprint)
    if url is not None:
        stage(run_dir, url)
        archived = archive_remote(run_dir, Remote(url)) if cfg.fresh else None
        check_compatible(cfg, data_fingerprint)
        Remote(url).put_new(CONFIG_FILE, json.dumps(record, indent=2).encode())
        return run_dir, archived
    check_writable(Path(cfg.artifacts_dir) / cfg.job)
    archived = None
    if run_dir.exists() and cfg.fresh:
        with hold(run_dir):  # never archive a folder another process is writing
            pass
        archived = str(archive(run_dir))
    else:
        check_compatible(cfg, data_fingerprint)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    check_run_writable(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        atomic_write_json(run_dir / CONFIG_FILE, record)
    return run_dir, archived


def archive_remote(run_dir: Path, remote: Remote) -> str | None:
    """``--fresh`` on a store: move the run's objects under ``<run>.archived-<time>``, holding
    its lease meanwhile; None when there was nothing to move."""
    with hold(run_dir, pull=False):
        keys = [k for k in remote.keys() if k != ".lease"]
        if not keys:
            return None
        target = f"{remote.url}.archived-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        for key in keys:  # copy everything (on the store's side), then delete: a kill leaves both, never neither
            remote.fs.copy(remote.path(key), f"{Remote(target).root}/{key}")
        for key in keys:
            remote.delete(key)
    return target


def is_complete(run_dir: Path) -> bool:
    """A run is complete once ``run.json`` says so (written after every output is in place)."""
    record = read_json(Path(run_dir) / RUN_FILE) or {}
    return record.get("status") == "completed" and (Path(run_dir) / "metrics.json").exists()


class hold:  # noqa: N801 - used like a function: ``with hold(run_dir): ...``
    """Exclusive hold of a run folder. Locally: an OS file lock, released by the kernel when
    the process dies, so a killed run never leaves a stale lock. For a run on a store, also its
    :class:`~tasks.store.Lease` (across machines), and then (``pull``) a fresh copy of its files
    in the staging folder."""

    def __init__(self, run_dir: Path, wait: float = 0, pull: bool = True):
        self.run_dir, self.wait, self.pull = Path(run_dir), wait, pull
        self.lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=wait)
        self.lease: Lease | None = None

    def __enter__(self) -> "hold":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            owner = read_json(self.run_dir / OWNER_FILE) or {}
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"
            raise UserError(
                f"run folder {where(self.run_dir)} is in use by another process ({who}); wait for it to finish, "
                f"pass --wait-lock SECONDS, or use another --run-name"
            ) from None
        try:
            self.hold_remote()
        except BaseException:
            self.lock.release()
            raise
        atomic_write_json(
            self.run_dir / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}
        )
        return self

    def hold_remote(self) -> None:
        remote = remote_of(self.run_dir)
        if remote is not None:
            self.lease = Lease(remote).acquire(self.wait)
            if self.pull:
                pull(self.run_dir, remote)

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()
        self.lock.release()
