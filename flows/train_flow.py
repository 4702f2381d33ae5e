"""The training flow and its command line: ``python flows/train_flow.py --help``."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: The command's own temporary Prefect server (tasks/server.py), started before Prefect and torch
#: are imported so that it boots meanwhile; None when Prefect's settings name a server.
SERVER = None
if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    from flows.options import (
        train_parser,  # help without importing Prefect (torch: the jobs' defaults)
    )

    train_parser().parse_args()
elif __name__ == "__main__":
    # Start-up creates ~500 000 objects that live as long as the command (torch's, Prefect's);
    # each full collection among them walks them all: ~0.5 s of a 3 s start. Python's gc docs'
    # pattern: no collections while they are made, then gc.freeze() in main(), before the flow.
    gc.disable()
    from tasks.server import launch

    SERVER = launch()

from prefect import flow, get_run_logger
from prefect.utilities.annotations import opaque, quote
from pydantic import ValidationError

from flows.options import config_parameters, with_parameters
from flows.options import train_parser as parser
from tasks.checkpoint import remove_debris
from tasks.data import load_job_data, make_split
from tasks.evaluation import METRICS_FILE
from tasks.jobs import default_jobs, get_job
from tasks.jobs.spec import TrainConfig, UserError
from tasks.policy import fix_first
from tasks.reporting import RunReport
from tasks.run import (
    RUN_FILE,
    check_run,
    hold,
    is_complete,
    prepare_run_dir,
    read_json,
    run_dir_for,
    utc_now,
    where,
    with_run_threads,
)
from tasks.steps import evaluate, load_data, save_model, split_data, train_chunk
from tasks.training import StopRequested, chunk_count


def build_configs(job: str | None, overrides: dict[str, Any]) -> list[TrainConfig]:
    """One validated config per requested job (all default jobs when ``job`` is None)."""
    names = [job] if job else default_jobs()
    return [get_job(name).config(**overrides) for name in names]


def run_job(cfg: TrainConfig) -> dict[str, Any]:
    """The pipeline for one job: load -> split -> train_chunk x N -> evaluate -> save_model."""
    logger = get_run_logger()
    info = load_data(cfg)
    fingerprint = cfg.fingerprint(info["fingerprint"])
    run_dir, archived = prepare_run_dir(cfg, info["fingerprint"])
    cfg = with_run_threads(cfg, fingerprint)
    if archived is not None:
        logger.info("--fresh: moved the previous run to %s", archived)
    with hold(run_dir, wait=cfg.wait_lock):
        if debris := remove_debris([run_dir, run_dir / "checkpoints"]):
            logger.info("removed %d temp files left by writes that a kill interrupted", len(debris))
        if is_complete(run_dir):
            metrics = read_json(run_dir / METRICS_FILE)
            logger.info("%s is already complete; not retraining (use --fresh to start over)", where(run_dir))
            return {"job": cfg.job, "run_dir": where(run_dir), "status": "already complete", "metrics": metrics}
        report = RunReport.start(cfg, run_dir, info, fingerprint, logger)  # run.json, progress
        try:
            metrics = pipeline(cfg, run_dir, fingerprint, info, report)
            report.finish(metrics)  # plots, summary.md + artifacts, run.json "completed" with file hashes
        except BaseException as exc:
            report.interrupted(exc)  # run.json "failed" (or "stopped") with the error
            raise
    logger.info("%s: done, test loss %.6g, outputs in %s", cfg.job, metrics["test"].get("loss", float("nan")),
                where(run_dir))
    return {"job": cfg.job, "run_dir": where(run_dir), "status": "completed", "metrics": metrics}


def pipeline(cfg: TrainConfig, run_dir: Path, fingerprint: str, info: dict[str, Any], report: RunReport) -> dict[str, Any]:
    """split -> train_chunk x N -> evaluate -> save_model; returns the metrics.

    The UI's graph is one chain: each task waits for the one before. Prefect links inputs to
    tasks by object identity, so cfg (quote) and the previous result's contents (opaque) are not
    searched: they share objects (cfg.lr, say) with other tasks' results."""
    previous = split_data(quote(cfg), run_dir, wait_for=[opaque(info)])
    kept = []
    # A later attempt (a rerun, a flow retry) resumes until one of its chunks trains; the first
    # attempt of a run has nothing to resume, so its first chunk does not say "resuming".
    resuming = report.later_attempt
    for chunk in range(1, chunk_count(cfg) + 1):
        result = previous = train_chunk(quote(cfg), run_dir, fingerprint, chunk, resuming, report.artifacts.update_progress,
                                        wait_for=[opaque(previous)])
        kept.append(result)  # alive to the end: Prefect maps results to tasks by id(), which a freed one frees
        resuming = resuming and result["skipped"]
        report.chunk_done(result)  # TensorBoard, progress artifact, run.json
    metrics = evaluate(quote(cfg), run_dir, fingerprint, wait_for=[opaque(previous)])
    save_model(quote(cfg), run_dir, fingerprint, wait_for=[opaque(metrics)])
    return metrics


def train(job: str | None = None, **options: Any) -> dict[str, Any]:
    """Train ``job`` (or every default job) resumably; parameters left None take the job's defaults."""
    return {cfg.job: run_job(cfg) for cfg in build_configs(job, options)}


#: The flow: its parameters are TrainConfig's fields (flows/options.py), all optional.
train_flow = flow(name="train", retries=0)(with_parameters(train, config_parameters()))


# --- command line ------------------------------------------------------------------------


def one_line(exc: ValidationError) -> str:
    """First pydantic error as ``--option: message (got value)``; a field of several types
    (``--threads``: a number or auto) lists what each would need."""
    err = exc.errors()[0]
    field = "--" + str(err["loc"][0]).replace("_", "-")
    msgs = [e["msg"].removeprefix("Value error, ") for e in exc.errors() if e["loc"][:1] == err["loc"][:1]]
    return f"invalid {field}: {', or '.join(dict.fromkeys(msgs))} (got {err.get('input')!r})"


def preflight(configs: list[TrainConfig]) -> None:
    """Check everything checkable before Prefect starts, so bad input fails in one line and
    touches nothing: data, split size, artifacts folder or store, run-folder conflicts."""
    for cfg in configs:
        data = load_job_data(cfg)
        make_split(data, cfg)
        check_run(cfg, data.fingerprint)


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs every task failure with a traceback; for bad input that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors() -> None:
    """Bad input is one line in Prefect's logs too: no traceback for a UserError (idempotent)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrorTracebacks) for f in logger.filters):
            logger.addFilter(_HideUserErrorTracebacks())


class _OneCrashLine(logging.Filter):
    """A crashed task (Ctrl-C, SIGTERM) crashes the flow run, which logs the same "Crash detected!"
    line: the task's copy only repeats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Crash detected!")


def refused(job: str | None, args: dict[str, Any]) -> str | None:
    """The one-line error for input that cannot run, or None (see :func:`preflight`)."""
    try:
        preflight(build_configs(job, args))
    except ValidationError as exc:
        return f"error: {one_line(exc)}"
    except UserError as exc:
        return f"error: {exc}"
    return None


def flow_settings() -> contextlib.AbstractContextManager:
    """Once the command's own server answers: the settings its flow runs under."""
    if SERVER is None:
        return contextlib.nullcontext()
    from tasks.server import temporary_server_settings

    SERVER.wait_ready()  # RuntimeError in one line if it cannot start
    return temporary_server_settings()


def print_results(results: dict[str, dict[str, Any]]) -> None:
    """One line per job: status, test (or train) metrics, run folder."""
    for name, result in results.items():
        metrics = result["metrics"] or {}
        shown = ", ".join(f"{part} {k} {v:.6g}" for part in ("test", "train") for k, v in metrics.get(part, {}).items()
                          if k != "rows" and isinstance(v, float))
        print(f"{name}: {result['status']}: {shown} -> {result['run_dir']}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = vars(parser().parse_args(argv))
    job = args.pop("job")
    if error := refused(job, args):
        print(error, file=sys.stderr)
        return 2
    try:
        settings = flow_settings()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    quiet_user_errors()
    logging.getLogger("prefect.task_runs").addFilter(_OneCrashLine())
    if not gc.isenabled():  # started as a command: what exists now lives until the exit
        gc.freeze()
        gc.enable()
    with settings:
        status = run_flow(job, args)
        if not api_answers():
            # Prefect's exit handlers would try to deliver every queued event to the dead API, for
            # minutes; the run folder already holds the whole record, flushed to disk.
            print("warning: the Prefect API stopped answering during the run; the run folder has the whole "
                  "record, the Prefect UI misses the end of this run", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(status)
        return status


def api_answers(timeout: float = 2.0) -> bool:
    """Whether the Prefect API still answers at all (any HTTP response counts)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:  # Prefect's own temporary server, inside this process's lifetime
        return True
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def run_flow(job: str | None, args: dict[str, Any]) -> int:
    """Run the flow; print its results, or one line on why it stopped and what to do; the exit status."""
    started = utc_now()
    try:
        results = train_flow(job=job, **args)
    except StopRequested as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        # A second signal, or the first outside a chunk's epochs: the last checkpoint is the latest state.
        print("stopped at once; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Prefect already logged the details
        what, fix = f"{type(exc).__name__}: {exc}".splitlines()[0], fix_first(exc)
        if (results := results_on_disk(job, args, started)) is None:
            print(f"error: {what}; {fix + ', then r' if fix else 'r'}erun the same command to resume", file=sys.stderr)
            return 1
        # The runs completed; Prefect failed after them (recording the flow run's final state).
        print(f"warning: every run completed, but Prefect then failed: {what}", file=sys.stderr)
    print_results(results)
    return 0


def results_on_disk(job: str | None, args: dict[str, Any], since: str) -> dict[str, dict[str, Any]] | None:
    """The flow's results as the run folders record them; None unless every run is complete
    (with --fresh: completed by this command, at or after ``since``)."""
    results = {}
    try:
        for cfg in build_configs(job, args):
            run_dir = run_dir_for(cfg, cfg.fingerprint(load_job_data(cfg).fingerprint))
            finished = (read_json(run_dir / RUN_FILE) or {}).get("finished_at", "")
            if not is_complete(run_dir) or (cfg.fresh and finished < since):
                return None
            results[cfg.job] = {"run_dir": where(run_dir), "status": "completed",
                                "metrics": read_json(run_dir / METRICS_FILE)}
    except Exception:  # noqa: BLE001 - this only decides which message the failure gets
        return None
    return results


if __name__ == "__main__":
    status = main()
    # Exit handlers (log and event flush, server stop) and finalizers still run as usual; the
    # interpreter's exit-time garbage collections just skip the objects alive now (torch's and
    # Prefect's: ~1 s of teardown, more on a busy machine) after one last ordinary collection.
    gc.collect()
    gc.freeze()
    sys.exit(status)
