"""The training flow and its command line: ``python flows/train_flow.py --help``."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any


def start_up(argv: list[str]) -> Any:
    """What the command does before Prefect and torch are imported: ``--help`` without them (the
    rendered help, flows.HELP_FILE), else start the command's temporary Prefect server
    (tasks/orchestration/server.py), so that it boots while they import. Start-up creates objects that live as
    long as the command (torch's, Prefect's); Python's gc docs' pattern: no collections while
    they are made, then gc.freeze() in :func:`main`. Returns the server (None: one is configured)."""
    if {"-h", "--help"} & set(argv):
        from flows import HELP_FILE

        print(HELP_FILE.read_text(), end="")
        sys.exit(0)
    # Prefect's client-side opt-out of its usage data (pyproject.toml opts the server out): the
    # same for every run of the command, and no first-run notice on a rerun.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    gc.disable()
    from tasks.orchestration.server import launch

    return launch()


def command(argv: list[str]) -> int:
    """``python flows/train_flow.py ...``: start up, then run the command; its exit status."""
    server = start_up(argv)
    from flows.train_flow import main  # this module proper, imported once the server is booting

    status = main(argv, server)
    # Exit handlers (log and event flush, server stop) and finalizers still run as usual; the
    # interpreter's exit-time garbage collections just skip the objects alive now (torch's and
    # Prefect's) after one last ordinary collection.
    gc.collect()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(command(sys.argv[1:]))

import contextlib  # noqa: E402 - the command starts up before these imports (above)
import signal  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Cancelled  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from flows.options import config_parameters, with_config_file, with_parameters  # noqa: E402
from flows.options import train_parser as parser  # noqa: E402
from tasks.engine.training import GracefulStop, StopRequested, check_job, chunk_count  # noqa: E402
from tasks.jobs.registry import default_jobs, get_job  # noqa: E402
from tasks.kernel import TrainConfig, UserError, remove_debris, utc_now  # noqa: E402
from tasks.orchestration.policy import fix_first  # noqa: E402
from tasks.orchestration.prefect_adapter import (  # noqa: E402
    Chain,
    api_answers,
    quiet_command,
    without_heartbeats,
)
from tasks.orchestration.steps import evaluate, load_data, save_model, split_data, train_chunk  # noqa: E402
from tasks.reporting import RunReport  # noqa: E402
from tasks.storage.data import describe_data, load_job_data, make_split  # noqa: E402
from tasks.storage.remote import LeaseLost, StoreUnreachable  # noqa: E402
from tasks.storage.run import Run  # noqa: E402
from tasks.tracking import check_installed  # noqa: E402


def build_configs(job: str | None, overrides: dict[str, Any]) -> list[TrainConfig]:
    """One validated config per requested job (all default jobs when ``job`` is None)."""
    names = [job] if job else default_jobs()
    return [get_job(name).config(**overrides) for name in names]


def run_job(cfg: TrainConfig) -> dict[str, Any]:
    """The pipeline for one job: load -> split -> train_chunk x N -> evaluate -> save_model. A
    SIGTERM or Ctrl-C at any moment stops it at the next checkpoint or step (GracefulStop)."""
    with GracefulStop() as stop:
        return attempt(cfg, stop)


def attempt(cfg: TrainConfig, stop: GracefulStop) -> dict[str, Any]:
    """One attempt at ``cfg``'s run, holding it."""
    logger, chain = get_run_logger(), Chain()
    run = Run.of(cfg, chain(load_data, cfg))
    archived = run.prepare()
    run = run.with_threads()
    if archived is not None:
        logger.info("--fresh: moved the previous run to %s", archived)
    with run.store.hold(cfg.wait_lock):
        if debris := remove_debris([run.dir, run.dir / "checkpoints"]):
            logger.info("removed %d temp files left by writes that a kill interrupted", len(debris))
        status = "already complete" if run.complete else "completed"
        if run.complete:
            logger.info("%s is already complete; not retraining (use --fresh to start over)", run.where)
        else:
            train_and_report(run, logger, chain, stop)
    run.store.release_local_copy()
    return outcome(run, status)


def train_and_report(run: Run, logger: Any, chain: Chain, stop: GracefulStop) -> None:
    """The attempt's pipeline, recorded in run.json from start to end (or to why it ended)."""
    report = RunReport.start(run, logger, flow_run.id)  # run.json, progress
    try:
        metrics = pipeline(run, report, chain, stop)
        report.finish(metrics)  # plots, summary.md + artifacts, run.json "completed" with file hashes
    except BaseException as exc:
        report.interrupted(exc)  # run.json "failed" (or "stopped") with the error
        raise
    logger.info("%s: done, test loss %.6g, outputs in %s", run.cfg.job, metrics["test"].get("loss", float("nan")),
                run.where)


def outcome(run: Run, status: str) -> dict[str, Any]:
    """A job's result, as the flow returns it and the command prints it."""
    return {"job": run.cfg.job, "run_dir": run.where, "status": status, "metrics": run.metrics()}


def pipeline(run: Run, report: RunReport, chain: Chain, stop: GracefulStop) -> dict[str, Any]:
    """split -> train_chunk x N -> evaluate -> save_model, one chain in the UI; the metrics.
    Between two steps, a stop request ends the attempt there."""
    chain(split_data, run)
    # A later attempt (a rerun, a flow retry) resumes until one of its chunks trains; the first
    # attempt of a run has nothing to resume, so its first chunk does not say "resuming".
    resuming, saved, chunks = report.later_attempt, "", chunk_count(run.cfg)
    for chunk in range(1, chunks + 1):
        stop.check(f"before chunk {chunk}/{chunks}{saved}")
        result = chain(train_chunk, run, stop, chunk=chunk, resuming=resuming, report=report.artifacts.update_progress)
        resuming = resuming and not result.trained
        saved = f", with epochs 1-{result.end_epoch} of {run.cfg.epochs} saved"
        report.chunk_done(result)  # TensorBoard, progress artifact, run.json
        if result.stopped_by is not None:
            raise StopRequested(result.stopped_by, result.stop_message)
    stop.check(f"after training, before the evaluation{saved}")
    metrics = chain(evaluate, run)
    chain(save_model, run)
    return metrics


def train(job: str | None = None, **options: Any) -> dict[str, Any]:
    """Train ``job`` (or every default job) resumably; parameters left None take the job's defaults.
    A stop on request (SIGTERM, Ctrl-C) ends the flow run Cancelled, with where it stopped and
    how to resume as its message: a stop the user asked for, not a crash."""
    try:
        return {cfg.job: run_job(cfg) for cfg in build_configs(job, options)}
    except StopRequested as exc:
        return Cancelled(message=str(exc))


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
    touches nothing: data, split size, the model and loss on the data, artifacts folder or
    store, run-folder conflicts."""
    for cfg in configs:
        data = load_job_data(cfg)
        make_split(data, cfg)
        check_job(cfg, data)
        check_installed(cfg.mlflow)
        Run.of(cfg, describe_data(cfg)).check()


def refused(job: str | None, args: dict[str, Any]) -> tuple[str, int] | None:
    """The one-line error for input that cannot run and the exit status (2: bad input, 1: the
    store does not answer), or None (see :func:`preflight`)."""
    try:
        preflight(build_configs(job, args))
    except ValidationError as exc:
        return f"error: {one_line(exc)}", 2
    except UserError as exc:
        return f"error: {exc}", 2
    except StoreUnreachable as exc:
        return f"error: {exc}", 1
    return None


def flow_settings(server: Any) -> contextlib.AbstractContextManager:
    """Once the command's own server answers: the settings its flow runs under."""
    if server is None:
        return contextlib.nullcontext()
    server.wait_ready()  # RuntimeError in one line if it cannot start
    return without_heartbeats()


def print_results(results: dict[str, dict[str, Any]]) -> None:
    """One line per job: status, test (or train) metrics, run folder."""
    for name, result in results.items():
        metrics = result["metrics"] or {}
        shown = ", ".join(f"{part} {k} {v:.6g}" for part in ("test", "train") for k, v in metrics.get(part, {}).items()
                          if k != "rows" and isinstance(v, float))
        print(f"{name}: {result['status']}: {shown} -> {result['run_dir']}")


def main(argv: list[str] | None = None, server: Any = None) -> int:
    """CLI entry point; returns the exit status. ``server``: the command's temporary Prefect
    server (:func:`start_up`), None to use the one Prefect's settings name."""
    try:
        args = with_config_file(vars(parser().parse_args(argv)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job = args.pop("job")
    if error := refused(job, args):
        print(error[0], file=sys.stderr)
        return error[1]
    try:
        settings = flow_settings(server)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    quiet_command()
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


def run_flow(job: str | None, args: dict[str, Any]) -> int:
    """Run the flow; print its results, or one line on why it stopped and what to do; the exit status."""
    started = utc_now()
    try:
        state = train_flow(job=job, **args, return_state=True)
        if state.is_cancelled():  # a stop on request: the message names the signal first
            print(f"stopped: {state.message}", file=sys.stderr)
            return 128 + signal.Signals[state.message.split(":", 1)[0]].value
        results = state.result()
    except KeyboardInterrupt:
        # A second signal, or the first outside a chunk's epochs: the last checkpoint is the latest state.
        print("stopped at once; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LeaseLost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
            run = Run.of(cfg, describe_data(cfg))
            record = run.record()
            if not run.complete or (cfg.fresh and (record.finished_at or "") < since):
                return None
            results[cfg.job] = outcome(run, "completed")
    except Exception:  # noqa: BLE001 - this only decides which message the failure gets
        return None
    return results

