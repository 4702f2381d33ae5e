"""A run: one config on one dataset, with its identity and its store. Built once per attempt
(:meth:`Run.of`) and handed to every step, so nothing asks a folder where it lives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.kernel import TRAINING_FORMAT, TrainConfig, UserError
from tasks.storage.records import RUN_FILE, DataInfo, RunRecord
from tasks.storage.store import LocalStore, ObjectStore, open_store

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


class RunSpec(BaseModel):
    """What another process needs to work on the same run (a rank of a multi-process chunk):
    the same on every machine."""

    config: dict[str, Any]
    data: DataInfo
    fingerprint: str
    name: str
    #: The lease token of the process that holds the run on a store (its ranks write under it).
    lease: str | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    """The config, its data, its identity (``fingerprint``: config, data content and the
    training format) and its store (local folder or object storage)."""

    cfg: TrainConfig
    data: DataInfo
    fingerprint: str
    store: LocalStore | ObjectStore

    @classmethod
    def of(cls, cfg: TrainConfig, data: DataInfo) -> Run:
        """The run of ``cfg`` on ``data``: ``--run-name``, else a name derived from the config and
        the data, so rerunning the same command after a kill finds the same run."""
        fingerprint = cfg.fingerprint(data.fingerprint)
        name = cfg.run_name or f"run-{fingerprint[:10]}"
        return cls(cfg, data, fingerprint, open_store(cfg.artifacts_dir, cfg.job, name))

    @classmethod
    def attach(cls, spec: RunSpec) -> Run:
        """The run another process described (:meth:`spec`), writing under its lease."""
        cfg = TrainConfig.model_validate(spec.config)
        store = open_store(cfg.artifacts_dir, cfg.job, spec.name)
        if spec.lease is not None and isinstance(store, ObjectStore):
            store.follow(spec.lease)
        return cls(cfg, spec.data, spec.fingerprint, store)

    def spec(self) -> RunSpec:
        lease = getattr(self.store, "lease", None)
        return RunSpec(config=self.cfg.model_dump(mode="json"), data=self.data, fingerprint=self.fingerprint,
                       name=self.name, lease=lease.token if lease is not None else None)

    @property
    def name(self) -> str:
        return self.store.folder.name

    @property
    def dir(self) -> Path:
        """The local folder the run's files are written in (for a run on a store, its staging copy)."""
        return self.store.folder

    @property
    def where(self) -> str:
        """What to show a user: the run's URL on a store, else its folder."""
        return self.store.name

    def record(self) -> RunRecord | None:
        """``run.json`` as the store has it."""
        return RunRecord.parse(self.store.read(RUN_FILE))

    @property
    def complete(self) -> bool:
        """Complete once ``run.json`` says so (written after every output is in place)."""
        record = self.record()
        return record is not None and record.complete and self.metrics() is not None

    def metrics(self) -> dict[str, Any] | None:
        """``metrics.json`` as the store has it (None until the run is evaluated)."""
        return self.stored_json(METRICS_FILE)

    def config_record(self) -> dict[str, Any]:
        """What ``config.json`` holds."""
        return {"job": self.cfg.job, "format": TRAINING_FORMAT, "fingerprint": self.fingerprint,
                "data_fingerprint": self.data.fingerprint, "identity": self.cfg.identity(),
                "config": self.cfg.model_dump(mode="json"),
                "threads": self.cfg.thread_count()}  # --threads auto, resolved once: a resume elsewhere trains the same

    def stored_config(self) -> dict[str, Any] | None:
        """The run's ``config.json`` as its store has it, or None."""
        return self.stored_json(CONFIG_FILE)

    def stored_json(self, key: str) -> dict[str, Any] | None:
        """A JSON file of the run as its store has it (None when absent or unreadable)."""
        blob = self.store.read(key)
        try:
            return json.loads(blob) if blob else None
        except ValueError:
            return None

    def with_threads(self) -> Run:
        """This run with ``--threads auto`` replaced by the count its config.json stored when it
        was created, so that the same command gives the same floats on a machine with other cores.
        The identity stays the one computed from ``auto``."""
        if self.cfg.threads != "auto":
            return self
        stored = (self.stored_config() or {}).get("threads")
        threads = int(stored) if stored else self.cfg.thread_count()
        return dataclasses.replace(self, cfg=self.cfg.model_copy(update={"threads": threads}))

    def check_compatible(self) -> None:
        """Refuse to resume into a run made with another config or other data."""
        old = self.stored_config()
        if old is None or old.get("fingerprint") == self.fingerprint:
            return
        if old.get("format", 1) != TRAINING_FORMAT:
            raise UserError(
                f"run folder {self.where} was made by an older trainflow that trained with other floats (format "
                f"{old.get('format', 1)}), so it cannot be resumed exactly; use --fresh to archive it and start over, "
                f"or another --run-name")
        diff = describe_difference(old.get("identity", {}), self.cfg.identity())
        if old.get("data_fingerprint") != self.data.fingerprint:
            diff = ", ".join(filter(None, [diff, "data content differs"]))
        raise UserError(f"run folder {self.where} was made with a different config ({diff}); "
                        f"use another --run-name, or --fresh to archive the old run and start over")

    def check(self) -> None:
        """Before anything runs: the artifacts root takes writes, the run was made by this
        config (unless --fresh), and no other process holds it."""
        self.store.check_access()
        if not self.cfg.fresh:
            self.check_compatible()
            self.store.check_run_writable(self.complete)
        if self.dir.exists():
            with self.store.hold(self.cfg.wait_lock, pull=False):
                pass

    def prepare(self) -> str | None:
        """Create the run (its ``config.json``, create-only); with ``--fresh`` archive an existing
        one first. Returns where it was archived to, if it was."""
        self.store.check_access()
        archived = self.store.archive() if self.cfg.fresh else None
        self.check_compatible()
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.store.check_run_writable(self.complete)
        self.store.create(CONFIG_FILE, (json.dumps(self.config_record(), indent=2) + "\n").encode())
        return archived


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``'lr 0.0001 -> 0.001, epochs 10000 -> 500'`` for the fields that differ."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))
