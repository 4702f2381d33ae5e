"""The flow's Prefect tasks: each a verb, with its retry and cache policy in the decorator,
calling a plain function. The modules of those functions (data, training, evaluation, export)
import no Prefect, so the ranks of a multi-process chunk, which import the training code, start
without it."""

from __future__ import annotations

from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from tasks.engine.evaluation import evaluate_run
from tasks.engine.export import save_model_files
from tasks.engine.progress import Watchers
from tasks.engine.runners import runner_for
from tasks.engine.training import GracefulStop
from tasks.kernel import TrainConfig
from tasks.orchestration.policy import NO_RETRY_ON_USER_ERROR
from tasks.orchestration.prefect_adapter import terminal_console
from tasks.storage.data import describe_data, ensure_split
from tasks.storage.records import ChunkResult, DataInfo
from tasks.storage.run import Run


@task(name="load_data", retries=1, retry_delay_seconds=1, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def load_data(cfg: TrainConfig) -> DataInfo:
    """Parse and check the job's data; its fingerprint, source and row counts."""
    info = describe_data(cfg)
    get_run_logger().info("%s: data from %s", cfg.job, info.source)
    return info


@task(name="split_data", retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def split_data(run: Run) -> dict[str, int]:
    """Create the split once per run; later calls reuse the persisted one."""
    return ensure_split(run)


@task(name="train_chunk", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE,
      retry_condition_fn=NO_RETRY_ON_USER_ERROR, task_run_name="train_chunk-{chunk}")
def train_chunk(run: Run, stop: GracefulStop, chunk: int, resuming: bool = False,
                report: Callable[[float, str], None] | None = None) -> ChunkResult:
    """One checkpointed chunk; a retry resumes from the latest valid checkpoint. ``resuming``:
    no chunk of this attempt has trained yet, so the checkpoint is an earlier attempt's;
    ``stop``: the attempt's stop request (a signal)."""
    resumed = resuming or task_run.run_count > 1  # a new attempt, or a retry of this chunk
    watchers = Watchers(get_run_logger(), report, terminal_console())
    return runner_for(run.cfg).run(run, chunk, resumed, watchers, stop)


@task(name="evaluate", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def evaluate(run: Run) -> dict[str, Any]:
    """Evaluate the final model and write metrics.json."""
    return evaluate_run(run)


@task(name="save_model", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def save_model(run: Run) -> dict[str, str]:
    """Write model.pt, model_state_dict.pt and model.pt2."""
    return save_model_files(run)
