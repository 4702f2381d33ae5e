"""The sweep flow and its command line: ``python flows/sweep_flow.py --help`` (docs/sweeps.md).

Each trial is an ordinary training run, the train command in its own process
(tasks/orchestration/trials.py) watched by a ``train-trial`` task of the ``sweep`` flow run: its
own run folder under the sweep's, its own checkpoints, the same resume. The study (Optuna)
chooses the trials, judges them after each chunk and keeps their results in the sweep's folder
(tasks/orchestration/sweeps.py)."""

from __future__ import annotations

import inspect
import os
import signal
import sys
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Cancelled
from pydantic import ValidationError

from flows.options import OneLineParser, add_arguments, config_parameters, with_parameters
from flows.train_flow import flow_settings, one_line
from tasks.engine.training import GracefulStop
from tasks.kernel import ARTIFACTS_ENV, UserError
from tasks.orchestration.sweeps import (
    PRUNERS,
    SAMPLERS,
    SPACE_HELP,
    STUDY_DB_ENV,
    Sweep,
    SweepPlan,
    end_tracker,
    open_tracker,
    trial_rows,
    write_outputs,
)
from tasks.orchestration.trials import TrialOutcome, TrialProcess, share_of_cores, watch
from tasks.tracking import PARENT_ENV

#: Training options that a sweep sets per trial itself.
PER_TRIAL = frozenset({"job", "run_name", "fresh", "wait_lock"})
#: The sweep's own options, beside the training options every trial shares.
OWN = ("job", "trials", "space", "sampler", "pruner", "parallel", "sweep_name", "study_db")


def sweep(job: str, trials: int, space: list[str], sampler: str = "tpe", pruner: str = "none", parallel: int = 1,
          sweep_name: str | None = None, study_db: str | None = None, **options: Any) -> Any:
    """Run ``trials`` trials of ``job`` over ``space``, ``parallel`` at a time; a rerun continues the
    sweep. Without ``artifacts_dir``, a worker's ``$TRAINFLOW_ARTIFACTS_DIR`` (as for its scheduled runs)."""
    options["artifacts_dir"] = options.get("artifacts_dir") or os.environ.get(ARTIFACTS_ENV) or None
    plan = SweepPlan.of(job, trials, space, sampler, sweep_name, options, pruner, parallel, study_db)
    with Sweep(plan) as study, GracefulStop() as stop:
        if study.done() >= plan.trials:
            get_run_logger().info("%s is already complete (%d trials)", plan.where, study.done())
            return outcome(plan, "already complete", write_outputs(study))
        tracker = open_tracker(plan, get_run_logger())  # MLflow's parent run of the trials, if asked for
        try:
            best = run_trials(study, stop, tracker.run_id if tracker else None)
        except BaseException:
            if tracker:
                tracker.end("FAILED")
            raise
        if stop.signum is not None:  # SIGTERM or Ctrl-C: every running trial stopped at a checkpoint
            if tracker:
                tracker.end("KILLED")
            return Cancelled(message=f"{signal.Signals(stop.signum).name}: the sweep and its running trials "
                                     "stopped at checkpoints; rerun the same command to continue the sweep")
        end_tracker(tracker, plan, best)
        return outcome(plan, "completed", best)


def run_trials(study: Sweep, stop: GracefulStop, parent: str | None) -> dict[str, Any] | None:
    """Keep ``parallel`` trials training until the budget is spent (or a stop is asked for);
    tell the study each one's outcome as it ends; the best trial's row. ``parent``: the MLflow
    run of the sweep, parent of the trials'."""
    running: dict[int, Any] = {}
    best, started, first = None, time.monotonic(), study.done()
    start_trials(study, stop, running, parent)
    while running:  # slots are filled again only when a trial was told (the study is read then)
        told = False
        for future in wait(list(running.values()), timeout=1.0).done:
            try:
                result: TrialOutcome = future.result()
            except BaseException:
                stop.signum = stop.signum or signal.SIGTERM  # the other trials stop at a checkpoint too
                wait(list(running.values()))
                raise
            del running[result.number]
            if result.state != "STOPPED":
                study.tell(result)
                told = True
        if told:  # the next trials boot meanwhile
            start_trials(study, stop, running, parent)
            best = write_outputs(study)
            study.sync()  # a sweep on a store: its study and outputs there
            progress(study, best, (time.monotonic() - started) / max(1, study.done() - first))
    return best


def start_trials(study: Sweep, stop: GracefulStop, running: dict[int, Any], parent: str | None) -> None:
    """Fill the free slots with trials (none once a stop is asked for or the budget is spent)."""
    while stop.signum is None and len(running) < study.plan.parallel and \
            study.done() + len(running) < study.plan.trials:
        number, params = study.next_trial(set(running))
        running[number] = train_trial.submit(study, number, params, stop, parent)


@task(name="train-trial", retries=0, cache_policy=NO_CACHE)
def train_trial(study: Sweep, number: int, params: dict[str, Any], stop: GracefulStop,
                parent: str | None = None) -> TrialOutcome:
    """Train trial ``number`` in its own process (a rerun of a cut trial resumes its run from its
    checkpoint), reporting each chunk to the study's pruner; what it came to."""
    logger, plan = get_run_logger(), study.plan
    cfg = plan.config(params, number)
    logger.info("trial %d: %s", number, ", ".join(f"{k}={v}" for k, v in params.items()))
    config = {**cfg.model_dump(mode="json"), "wait_lock": True}
    env = share_of_cores(cfg.threads, plan.parallel * cfg.nproc_per_node) | ({PARENT_ENV: parent} if parent else {})
    trial = TrialProcess(plan.folder, config, number, plan.metric, env)
    # The last chunk is not judged: the run ends there anyway, and a stop would race its end.
    judge = None if plan.pruner == "none" else \
        (lambda values: study.judge(number, {e: v for e, v in values.items() if e < cfg.epochs}))
    result = watch(trial, judge, lambda: stop.signum)
    if result.state in ("FAIL", "PRUNED"):
        logger.warning("trial %d %s: %s", number, "failed" if result.state == "FAIL" else "pruned",
                       result.message or "its options made the run fail")
    return result


def outcome(plan: SweepPlan, status: str, best: dict[str, Any] | None) -> dict[str, Any]:
    """The sweep's result, as the flow returns it and the command prints it."""
    return {"folder": plan.where, "status": status, "best": best, "metric": plan.metric,
            "space": list(plan.space)}


def progress(study: Sweep, best: dict[str, Any] | None, per_trial: float) -> None:
    """One line per finished trial: trials done, best so far, ETA; and the UI's table."""
    plan, done = study.plan, study.done()
    shown = f"best {plan.metric} {best[plan.metric]:.6g} (trial {best['trial']})" if best else "no trial finished yet"
    get_run_logger().info("sweep: %d/%d trials done, %s, ETA %.0fs", done, plan.trials, shown,
                          per_trial * (plan.trials - done))
    create_table_artifact(key="sweep-trials", table=trial_rows(study),
                          description=f"Trials of the sweep in {plan.where}")
    create_markdown_artifact(key="sweep-summary", markdown=(plan.folder / "summary.md").read_text(),
                             description=f"The sweep in {plan.where}: best trial, its command, every trial")


def sweep_parameters() -> list[inspect.Parameter]:
    """The flow's parameters: the sweep's own, then every training option but :data:`PER_TRIAL`."""
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [inspect.Parameter("job", kw, annotation=str), inspect.Parameter("trials", kw, annotation=int),
           inspect.Parameter("space", kw, annotation=list[str]),
           inspect.Parameter("sampler", kw, annotation=str, default="tpe"),
           inspect.Parameter("pruner", kw, annotation=str, default="none"),
           inspect.Parameter("parallel", kw, annotation=int, default=1),
           inspect.Parameter("sweep_name", kw, annotation=str | None, default=None),
           inspect.Parameter("study_db", kw, annotation=str | None, default=None)]
    return own + config_parameters(exclude=PER_TRIAL)


#: The flow; SIGTERM or Ctrl-C stops its running trials at checkpoints and ends it Cancelled.
#: Its trials are tasks on Prefect's thread pool, each watching its trial's process.
sweep_flow = flow(name="sweep", retries=0)(with_parameters(sweep, sweep_parameters()))


def parser() -> OneLineParser:
    p = OneLineParser(
        prog="python flows/sweep_flow.py",
        description="Search training options: each trial is a resumable training run; rerunning the same "
        "command continues the sweep (trials cut by a kill resume from their checkpoints).",
        epilog=f"--space: {SPACE_HELP}. Example: python flows/sweep_flow.py --job nonlinear --trials 8 "
        "--space lr=log:1e-5:1e-3 --epochs 2000. Every other option is fixed for all trials. docs/sweeps.md",
    )
    p.add_argument("--trials", type=int, required=True, help="how many trials the sweep runs in all")
    p.add_argument("--space", action="append", required=True, metavar="NAME=KIND:ARGS", help=SPACE_HELP)
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="tpe (default), random or grid; seeded with --seed")
    p.add_argument("--pruner", choices=PRUNERS, default="none",
                   help="stop a hopeless trial at a checkpoint, judged on its validation metric after each "
                   "chunk: median (against the other trials, from the third on) or hyperband; none (default)")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="trials training at a time, each in its own process (default 1; only 1 makes a "
                   "resumed sweep ask for the same trials as an uninterrupted one)")
    p.add_argument("--sweep-name", help="the sweep's folder under <artifacts-dir>/sweeps (default: from its options)")
    p.add_argument("--study-db", metavar="URL", help="the Optuna study's database, e.g. postgresql://user:pw@host/optuna "
                   f"(default: ${STUDY_DB_ENV}, else study.db in the sweep's folder; docs/sweeps.md)")
    p.add_argument("--job", required=True, help="the job to sweep: a built-in name or module.path:NAME")
    add_arguments(p, exclude=PER_TRIAL)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python flows/sweep_flow.py ...``; the exit status."""
    args = vars(parser().parse_args(argv))
    try:
        SweepPlan.of(args["job"], args["trials"], args["space"], args["sampler"], args["sweep_name"],
                     {k: v for k, v in args.items() if k not in OWN}, args["pruner"], args["parallel"], args["study_db"])
    except (UserError, ValidationError) as exc:
        print(f"error: {one_line(exc) if isinstance(exc, ValidationError) else exc}", file=sys.stderr)
        return 2
    from tasks.orchestration.prefect_adapter import quiet_command
    from tasks.orchestration.server import launch

    server = launch()
    quiet_command()
    with flow_settings(server):
        state = sweep_flow(**args, return_state=True)
        if state.is_cancelled():  # SIGTERM or Ctrl-C: the message names the signal first
            print(f"stopped: {state.message}", file=sys.stderr)
            return 128 + signal.Signals[state.message.split(":", 1)[0]].value
        try:
            result = state.result()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # between two trials
            print("stopped; rerun the same command to continue the sweep", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - Prefect logged the details
            print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; rerun the same "
                  "command to continue the sweep", file=sys.stderr)
            return 1
    best, metric = result["best"], result["metric"]
    shown = "no trial completed" if best is None else f"best trial {best['trial']}, {metric} {best[metric]:.6g} (" + \
        ", ".join(f"{k} {best[k]}" for k in result["space"]) + ")"
    print(f"sweep: {result['status']}: {shown}; best_config.json, trials.csv, summary.md in {result['folder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
