"""The sweep flow and its command line: ``python flows/sweep_flow.py --help`` (docs/sweeps.md).

Each trial is an ordinary training run, a child flow run of the ``sweep`` flow run: its own run
folder under the sweep's, its own checkpoints, the same resume. The study (Optuna) chooses the
trials and keeps their results in the sweep's folder (tasks/orchestration/sweeps.py)."""

from __future__ import annotations

import inspect
import signal
import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled
from pydantic import ValidationError

from flows.options import OneLineParser, add_arguments, config_parameters, with_parameters
from flows.train_flow import flow_settings, one_line, train_flow
from tasks.kernel import UserError
from tasks.orchestration.sweeps import (
    SAMPLERS,
    SPACE_HELP,
    Sweep,
    SweepPlan,
    objective,
    trial_rows,
    write_outputs,
)

#: Training options that a sweep sets per trial itself.
PER_TRIAL = frozenset({"job", "run_name", "fresh", "wait_lock"})


def sweep(job: str, trials: int, space: list[str], sampler: str = "tpe", sweep_name: str | None = None,
          **options: Any) -> dict[str, Any]:
    """Run ``trials`` trials of ``job`` over ``space``, one at a time; a rerun continues the sweep."""
    plan = SweepPlan.of(job, trials, space, sampler, sweep_name, options)
    logger = get_run_logger()
    with Sweep(plan) as study:
        if study.done() >= plan.trials:
            logger.info("%s is already complete (%d trials)", plan.folder, study.done())
            return outcome(plan, "already complete", write_outputs(study))
        started, first = time.monotonic(), study.done()
        while study.done() < plan.trials:
            number, params = study.next_trial()
            try:
                value = run_trial(plan, number, params)
            except CancelledRun as exc:  # the trial stopped on request, at a checkpoint: so does the sweep
                return Cancelled(message=str(exc))
            study.tell(number, value)
            best = write_outputs(study)
            progress(logger, study, best, (time.monotonic() - started) / (study.done() - first))
        return outcome(plan, "completed", best)


def outcome(plan: SweepPlan, status: str, best: dict[str, Any] | None) -> dict[str, Any]:
    """The sweep's result, as the flow returns it and the command prints it."""
    return {"folder": str(plan.folder), "status": status, "best": best, "metric": plan.metric,
            "space": list(plan.space)}


def run_trial(plan: SweepPlan, number: int, params: dict[str, Any]) -> float | None:
    """Train trial ``number`` (a child flow run; a rerun of a cut trial resumes it); its value,
    None if its options made it fail (a diverged learning rate is a result, not an error)."""
    cfg = plan.config(params, number)
    get_run_logger().info("trial %d: %s", number, ", ".join(f"{k}={v}" for k, v in params.items()))
    try:
        result = train_flow(**{**plan.fixed, **params, "job": plan.job, "artifacts_dir": str(cfg.artifacts_dir),
                               "run_name": cfg.run_name})
    except UserError as exc:
        get_run_logger().warning("trial %d failed: %s", number, exc)
        return None
    return objective(result[plan.job]["metrics"], plan.metric)


def progress(logger: Any, study: Sweep, best: dict[str, Any] | None, per_trial: float) -> None:
    """One line per finished trial: trials done, best so far, ETA; and the UI's table."""
    plan, done = study.plan, study.done()
    shown = f"best {plan.metric} {best[plan.metric]:.6g} (trial {best['trial']})" if best else "no trial finished yet"
    logger.info("sweep: %d/%d trials done, %s, ETA %.0fs", done, plan.trials, shown, per_trial * (plan.trials - done))
    create_table_artifact(key="sweep-trials", table=trial_rows(study),
                          description=f"Trials of the sweep in {plan.folder}")


def sweep_parameters() -> list[inspect.Parameter]:
    """The flow's parameters: the sweep's own, then every training option but :data:`PER_TRIAL`."""
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [inspect.Parameter("job", kw, annotation=str), inspect.Parameter("trials", kw, annotation=int),
           inspect.Parameter("space", kw, annotation=list[str]),
           inspect.Parameter("sampler", kw, annotation=str, default="tpe"),
           inspect.Parameter("sweep_name", kw, annotation=str | None, default=None)]
    return own + config_parameters(exclude=PER_TRIAL)


#: The flow; a trial stopped on request (SIGTERM, Ctrl-C) stops it, Cancelled, with the trial's message.
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
    p.add_argument("--sweep-name", help="the sweep's folder under <artifacts-dir>/sweeps (default: from its options)")
    p.add_argument("--job", required=True, help="the job to sweep: a built-in name or module.path:NAME")
    add_arguments(p, exclude=PER_TRIAL)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python flows/sweep_flow.py ...``; the exit status."""
    args = vars(parser().parse_args(argv))
    try:
        SweepPlan.of(args["job"], args["trials"], args["space"], args["sampler"], args["sweep_name"],
                     {k: v for k, v in args.items() if k not in ("job", "trials", "space", "sampler", "sweep_name")})
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
