"""Two deployments per registered job, built from ``tasks.jobs.JOBS``: its scheduled training
(``scheduled-train/<job>``) and its on-demand sweep (``sweep/<job>``); the single source for
``deployments/serve.py`` and the generated ``deployments/prefect.yaml``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from tasks.jobs.registry import JOBS, get_job

HERE = Path(__file__).resolve().parent
PREFECT_YAML = HERE / "prefect.yaml"
FLOW_NAME = "scheduled-train"
#: Relative to the repository root: run ``prefect deploy`` from there.
ENTRYPOINT = "deployments/flow.py:scheduled_train"
WORK_POOL = "trainflow"
DEFAULT_CRON = "0 2 * * *"  # nightly, 02:00
DEFAULT_TIMEZONE = "UTC"
CRON_ENV, TIMEZONE_ENV = "TRAINFLOW_CRON", "TRAINFLOW_TIMEZONE"
#: Deployment concurrency: one run of a job at a time; a run due while another runs waits.
CONCURRENCY = {"limit": 1, "collision_strategy": "ENQUEUE"}
#: Prefect variables naming the git repository and branch that workers clone the code from
#: (``prefect variable set trainflow_repository https://...``); read when a run starts.
REPOSITORY_VAR, BRANCH_VAR = "trainflow_repository", "trainflow_branch"
#: Flow runs of the work-pool deployments send a heartbeat this often (Prefect's minimum; its
#: default is 180 s); ``deployments/automations.py`` crashes a run silent for 3 of them.
HEARTBEAT_SECONDS = 30
HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
#: The environment of a work-pool flow run: that heartbeat, and a clone that fails rather than
#: waits for a password nobody types.
RUN_ENV = {**HEARTBEAT_ENV, "GIT_TERMINAL_PROMPT": "0"}


def default_cron() -> str:
    return os.environ.get(CRON_ENV) or DEFAULT_CRON


def default_timezone() -> str:
    return os.environ.get(TIMEZONE_ENV) or DEFAULT_TIMEZONE


def job_parameters(job: str) -> dict[str, Any]:
    """``{"job": job, **the job's defaults}``: visible, editable deployment parameters. ``data``
    stays the job's default: it is a path on the machine that built the registry. ``job`` may be
    an import path (``my_job:JOB``, docs/jobs.md)."""
    spec = get_job(job)
    values = {k: v for k, v in spec.defaults.items() if k != "data"}
    return {"job": spec.name, **{k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}}


#: The ``sweep/<job>`` deployments (on demand, no schedule): trials and space to edit per run.
SWEEP_FLOW_NAME = "sweep"
SWEEP_ENTRYPOINT = "flows/sweep_flow.py:sweep_flow"
SWEEP_TRIALS = 8


def sweep_parameters(job: str) -> dict[str, Any]:
    """A sweep's editable parameters: the job, a budget, and a space: the learning rate a decade
    either side of the job's default (flows/sweep_flow.py, docs/sweeps.md)."""
    spec = get_job(job)
    lr = spec.config().lr
    return {"job": spec.name, "trials": SWEEP_TRIALS, "space": [f"lr=log:{lr / 10:g}:{lr * 10:g}"],
            "sampler": "tpe", "pruner": "median"}


def deployments(cron: str | None = None, timezone: str | None = None, jobs: list[str] | None = None) -> list[dict[str, Any]]:
    """Deployment definitions (prefect.yaml's shape) for ``jobs`` (default: every registered job;
    an import path names the user's own, see docs/jobs.md)."""
    cron, timezone = cron or default_cron(), timezone or default_timezone()
    out = []
    for spec in map(get_job, jobs or list(JOBS)):
        name = spec.name  # an import path's dotted form (my_job.JOB), as its run folders
        out.append({
            "name": name,
            "description": spec.description,
            "entrypoint": ENTRYPOINT,
            "parameters": job_parameters(name),
            "schedules": [{"cron": cron, "timezone": timezone, "active": True}],
            "concurrency_limit": dict(CONCURRENCY),
            "tags": ["trainflow", name],
            "work_pool": {"name": WORK_POOL, "job_variables": {"env": dict(RUN_ENV)}},
        })
    return out


def sweep_deployments(jobs: list[str] | None = None) -> list[dict[str, Any]]:
    """The on-demand ``sweep/<job>`` deployments (prefect.yaml's shape): on a worker, the sweep
    and its trials' runs live under the worker's ``$TRAINFLOW_ARTIFACTS_DIR`` (a store on a
    cluster: docs/sweeps.md)."""
    return [{
        "name": spec.name,
        "description": f"Search options of {spec.name}: edit trials, space, sampler, pruner",
        "entrypoint": SWEEP_ENTRYPOINT,
        "parameters": sweep_parameters(spec.name),
        "tags": ["trainflow", "sweep", spec.name],
        "work_pool": {"name": WORK_POOL, "job_variables": {"env": dict(RUN_ENV)}},
    } for spec in map(get_job, jobs or list(JOBS))]


def variable(name: str) -> str:
    return "{{ prefect.variables.%s }}" % name


def check_repository_step() -> dict[str, Any]:
    """Run by ``prefect deploy``: fail there, not on every worker, when the repository or its
    branch cannot be reached."""
    script = f"git ls-remote --exit-code --heads -- '{variable(REPOSITORY_VAR)}' '{variable(BRANCH_VAR)}'"
    return {"prefect.deployments.steps.run_shell_script": {
        "id": "check-repository", "script": script, "shell": True, "stream_output": False}}


def clone_step() -> dict[str, Any]:
    """Run by the worker before each flow run: a shallow clone of the branch into the run's
    working folder, which becomes the working directory, so workers need no checkout of their
    own. The variables are resolved there, when the run starts."""
    return {"prefect.deployments.steps.git_clone": {
        "id": "clone", "repository": variable(REPOSITORY_VAR), "branch": variable(BRANCH_VAR)}}


def prefect_yaml(cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE) -> str:
    """The content of ``deployments/prefect.yaml`` (a test keeps the committed file equal to it)."""
    doc = {
        "name": "trainflow",
        "prefect-version": "3.8.8",
        "build": [check_repository_step()],
        "pull": [clone_step()],
        "deployments": deployments(cron, timezone) + sweep_deployments(),
    }
    header = (
        "# GENERATED by `python deployments/serve.py --write-yaml` from tasks.jobs.JOBS: do not edit by hand\n"
        "# (tests/test_deployments.py fails when this file and the job registry differ).\n"
        "# Workers clone the code: set the repository and branch once, then deploy from the repository root:\n"
        f"#   prefect variable set {REPOSITORY_VAR} https://github.com/you/trainflow.git\n"
        f"#   prefect variable set {BRANCH_VAR} main\n"
        "#   prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
