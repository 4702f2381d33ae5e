"""The flow's Prefect tasks: each a verb, with its retry and cache policy in the decorator,
calling a plain function that tests call directly. The modules of those functions (data,
training, evaluation, export) import no Prefect, so the ranks of a multi-process chunk, which
import the training code, start without it (0.65 s less per chunk, measured)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from tasks.data import describe_data, ensure_split
from tasks.evaluation import evaluate_run
from tasks.export import save_model_files
from tasks.jobs.spec import TrainConfig
from tasks.policy import NO_RETRY_ON_USER_ERROR
from tasks.training import run_chunk


@task(name="load_data", retries=1, retry_delay_seconds=1, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def load_data(cfg: TrainConfig) -> dict[str, Any]:
    """Parse and check the job's data; its fingerprint, source and row counts."""
    info = describe_data(cfg)
    get_run_logger().info("%s: data from %s", cfg.job, info["source"])
    return info


@task(name="split_data", retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def split_data(cfg: TrainConfig, run_dir: Path) -> dict[str, int]:
    """Create the split once per run folder; later calls reuse the persisted one."""
    return ensure_split(cfg, run_dir)


@task(name="train_chunk", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE,
      retry_condition_fn=NO_RETRY_ON_USER_ERROR, task_run_name="train_chunk-{chunk}")
def train_chunk(cfg: TrainConfig, run_dir: Path, fingerprint: str, chunk: int, resuming: bool = False,
                report: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """One checkpointed chunk; a retry resumes from the latest valid checkpoint. ``resuming``:
    no chunk of this attempt has trained yet, so the checkpoint is an earlier attempt's."""
    resumed = resuming or task_run.run_count > 1  # a new attempt, or a retry of this chunk
    return run_chunk(cfg, run_dir, fingerprint, chunk, get_run_logger(), resumed, report)


@task(name="evaluate", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def evaluate(cfg: TrainConfig, run_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Evaluate the final model and write metrics.json."""
    return evaluate_run(cfg, run_dir, fingerprint)


@task(name="save_model", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def save_model(cfg: TrainConfig, run_dir: Path, fingerprint: str) -> dict[str, str]:
    """Write model.pt, model_state_dict.pt and model.pt2."""
    return save_model_files(cfg, run_dir, fingerprint)
