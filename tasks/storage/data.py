"""Loading a job's data and splitting it; the split is persisted in the run folder."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from tasks.jobs.registry import get_job
from tasks.jobs.shards import Shards, ShardUnavailable
from tasks.jobs.spec import JobData, Tensors
from tasks.kernel import TrainConfig, UserError, atomic_write_json, saved_traceback
from tasks.storage.records import DataInfo
from tasks.storage.remote import fetch_data, is_url, store_error
from tasks.storage.run import Run

SPLIT_FILE = "split.json"
PARTS = ("train", "val", "test")


def load_job_data(cfg: TrainConfig) -> JobData:
    """The job's data for ``cfg`` (parsed and checked once per process per file version); data
    on a store is read from a local copy, fetched again when the store's version changes, unless
    the job streams it (its ``load`` gets the URL)."""
    if is_url(cfg.data) and get_job(cfg.job).streams:
        return _load_cached(cfg.job, str(cfg.data), None)
    path = fetch_data(str(cfg.data)) if is_url(cfg.data) else Path(cfg.data)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    return _load_cached(cfg.job, str(path.resolve()), stamp)


@lru_cache(maxsize=4)
def _load_cached(job: str, path: str, stamp: int | None) -> JobData:
    try:
        return get_job(job).load(path if is_url(path) else Path(path))
    except UserError:
        raise
    except ShardUnavailable as exc:  # the store, not the job: one line, exit 1 if it does not answer
        raise store_error(path, exc.__cause__ or exc) from None
    except Exception as exc:  # noqa: BLE001 - the job's own code: it fails the same on every retry
        raise UserError(f"job {job}: its load({path}) failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); fix the job's load or --data "
                        f"(traceback in {saved_traceback(exc)})") from None


def make_split(data: JobData, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Seeded split of the pool into train/val/test index tensors (``random_split``'s
    algorithm; for shards, its rows grouped by shard); a job with its own test (or validation)
    set keeps that set whole."""
    n = len(data.pool)
    train, val, test = (n, 0, 0) if data.val is not None else get_job(cfg.job).split_sizes(n)
    if train < cfg.batch_size * cfg.grad_accum:
        step = f"one batch of {cfg.batch_size}" if cfg.grad_accum == 1 else \
            f"one step of {cfg.grad_accum} batches of {cfg.batch_size}"
        raise UserError(f"too few rows to split in {cfg.data}: {n} rows give {train} training rows, fewer than "
                        f"{step}; add rows or lower --batch-size{'' if cfg.grad_accum == 1 else ' or --grad-accum'}")
    generator = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=generator)
    if isinstance(data.pool, Shards):  # whole shards to each part, but where one part ends (docs/jobs.md)
        perm = perm[data.pool.locality(perm, generator)]
    split = {"train": perm[:train], "val": perm[train : train + val], "test": perm[train + val : train + val + test]}
    if data.val is not None:
        split["train"], split["val"] = perm, torch.arange(len(data.val))
    if data.test is not None:
        split["test"] = torch.arange(len(data.test))
    return split


def split_tensors(data: JobData, split: dict[str, torch.Tensor], part: str) -> Tensors:
    """Rows of ``part`` as a Tensors pair (the fixed test set when the job has one)."""
    if part == "test" and data.test is not None:
        return data.test
    idx = split[part]
    return Tensors(data.pool.x[idx], data.pool.y[idx])


def save_split(run_dir: Path, split: dict[str, torch.Tensor], data: JobData, cfg: TrainConfig) -> Path:
    """Persist the split as readable JSON (row indices into the pool / the test set)."""
    path = Path(run_dir) / SPLIT_FILE
    atomic_write_json(
        path,
        {
            "seed": cfg.seed,
            "pool_rows": len(data.pool),
            "data_fingerprint": data.fingerprint,
            "test_source": "test_set" if data.test is not None else "pool",
            **({"val_source": "val_set"} if data.val is not None else {}),
            "sizes": {p: len(split[p]) for p in PARTS},
            **{p: split[p].tolist() for p in PARTS},
        },
    )
    return path


def read_split(run_dir: Path, data: JobData) -> dict[str, torch.Tensor]:
    """Load the persisted split and check it still fits the data."""
    path = Path(run_dir) / SPLIT_FILE
    blob = json.loads(path.read_text())
    if blob["data_fingerprint"] != data.fingerprint or blob["pool_rows"] != len(data.pool):
        raise UserError(f"{path} was made from other data; rerun with --fresh or another --run-name")
    return {p: torch.tensor(blob[p], dtype=torch.long) for p in PARTS}


def describe_data(cfg: TrainConfig) -> DataInfo:
    """Parse and check the job's data; its fingerprint, source and row counts."""
    data = load_job_data(cfg)
    return DataInfo(fingerprint=data.fingerprint, source=data.source or str(cfg.data), pool_rows=len(data.pool),
                    test_rows=len(data.test) if data.test is not None else None)


def ensure_split(run: Run) -> dict[str, int]:
    """Create the split once per run; later calls reuse the persisted one."""
    data = load_job_data(run.cfg)
    if (run.dir / SPLIT_FILE).exists():
        split = read_split(run.dir, data)
    else:
        split = make_split(data, run.cfg)
        save_split(run.dir, split, data, run.cfg)
    return {p: len(split[p]) for p in PARTS}
