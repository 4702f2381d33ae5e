"""Serve one scheduled deployment per registered job: ``python deployments/serve.py --help``.

Needs a running Prefect server (``PREFECT_API_URL``); this process registers the deployments
(and the automations that recover crashed and silent runs, ``deployments/automations.py``) and
runs their flow runs as subprocesses, with this checkout's code, until it is stopped (Ctrl-C
pauses the schedules). For workers on other machines, see ``deployments/deploy.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python deployments/serve.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.registry import (
    CRON_ENV,
    HEARTBEAT_ENV,
    PREFECT_YAML,
    TIMEZONE_ENV,
    default_cron,
    default_timezone,
    deployments,
    prefect_yaml,
    sweep_deployments,
)
from tasks.jobs.registry import JOBS
from tasks.kernel import UserError
from tasks.storage.remote import is_url


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python deployments/serve.py",
        description="Register and serve two deployments per registered job, scheduled-train/<job> and an "
        "on-demand sweep/<job>, on the Prefect server at PREFECT_API_URL.",
    )
    p.add_argument("--cron", default=None, help=f"cron schedule for every job (default ${CRON_ENV} or '{default_cron()}')")
    p.add_argument("--timezone", default=None, help=f"schedule time zone (default ${TIMEZONE_ENV} or {default_timezone()})")
    p.add_argument("--job", action="append", metavar="JOB", help=f"serve only this job: {', '.join(JOBS)}, or your own "
                   "as module.path:NAME (docs/jobs.md) (repeatable; default: every built-in job)")
    p.add_argument("--artifacts-dir", help="root of run folders, passed as a parameter "
                   "(default $TRAINFLOW_ARTIFACTS_DIR of the process running the flow, else artifacts/)")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once (default: no limit)")
    p.add_argument("--no-schedule", action="store_true", help="register without schedules (manual runs only)")
    p.add_argument("--no-automation", action="store_true",
                   help="do not register the automations that recover crashed runs (deployments/automations.py)")
    p.add_argument("--write-yaml", action="store_true",
                   help=f"do not serve; regenerate {PREFECT_YAML.relative_to(PREFECT_YAML.parents[1])} from the registry and exit")
    return p


def to_deployments(args: argparse.Namespace) -> list:
    """``RunnerDeployment`` objects, one scheduled training and one on-demand sweep per job,
    from the shared definitions."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron

    from deployments.flow import scheduled_train
    from flows.sweep_flow import sweep_flow

    out, where = [], {}
    if args.artifacts_dir:
        where["artifacts_dir"] = args.artifacts_dir if is_url(args.artifacts_dir) else str(Path(args.artifacts_dir).resolve())
    for d, w in zip(deployments(args.cron, args.timezone, args.job), sweep_deployments(args.job)):
        schedules = [] if args.no_schedule else [Cron(s["cron"], timezone=s["timezone"]) for s in d["schedules"]]
        out.append(scheduled_train.to_deployment(
            name=d["name"], description=d["description"], parameters={**d["parameters"], **where},
            schedules=schedules, tags=d["tags"], concurrency_limit=ConcurrencyLimitConfig(**d["concurrency_limit"]),
        ))
        out.append(sweep_flow.to_deployment(name=w["name"], description=w["description"],
                                            parameters={**w["parameters"], **where}, tags=w["tags"]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.write_yaml:
        PREFECT_YAML.write_text(prefect_yaml())
        print(f"wrote {PREFECT_YAML}")
        return 0
    from prefect import serve

    try:
        deps = to_deployments(args)
    except UserError as exc:  # an unknown --job or an import path that does not load
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_automation:
        from deployments.automations import register

        register()  # idempotent: a crashed run of these deployments is requeued and resumes
    os.environ.update(HEARTBEAT_ENV)  # the flow runs' heartbeat, which the automations expect
    print("serving: " + ", ".join(f"{d.flow_name}/{d.name}" for d in deps), flush=True)
    serve(*deps, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
