"""The flow that deployments run: ``train`` for one job, in a run folder named after the
flow run's *scheduled* start time.

Why a separate flow: a nightly schedule must get a new run folder every night (the CLI's
default name, derived from config + data, would find last night's completed run and stop),
while a retry of the same flow run must find the same folder again. The scheduled start time
(``prefect.runtime.flow_run.scheduled_start_time``, the flow run's ``expected_start_time``)
is set once when the run is created and survives flow-level retries, ``prefect flow-run
retry`` and reruns on another worker; the flow run id would too, but is meaningless to humans.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.options import config_parameters, parameter, with_parameters
from flows.train_flow import train_flow
from tasks.jobs.registry import get_job
from tasks.kernel import ARTIFACTS_ENV, UserError
from tasks.orchestration.prefect_adapter import quiet_user_errors

#: Default ``run_name`` of a deployment run: ``artifacts/<job>/scheduled-20250101T020000Z``.
RUN_NAME_TEMPLATE = "scheduled-{scheduled:%Y%m%dT%H%M%SZ}"
#: Flow-level retries: an exception anywhere re-runs the flow under the same flow run, which
#: resumes from the run folder's latest valid checkpoint.
FLOW_RETRIES = 2
FLOW_RETRY_DELAY_S = 10
#: Hard cap on attempts of one flow run (flow retries + crash requeues), so an automation that
#: requeues crashed runs can never loop forever on a run that crashes every time.
MAX_RUNS = 6


def resolve_run_name(template: str, job: str, scheduled: datetime) -> str:
    """``template`` with ``{job}`` and ``{scheduled[:strftime]}`` (UTC) filled in."""
    scheduled = scheduled.astimezone(UTC)
    try:
        name = template.format(job=job, scheduled=scheduled)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"run_name template {template!r} is invalid ({exc}); use {{job}} and {{scheduled:%Y%m%d}}") from None
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def scheduled(job: str, run_name: str = RUN_NAME_TEMPLATE, **options: Any) -> dict[str, Any]:
    """Train ``job`` into ``<artifacts_dir>/<job>/<run_name>``, where ``run_name`` may use
    ``{job}`` and ``{scheduled:%Y%m%d...}``; a retry of this flow run resumes the same folder.
    The other parameters are ``train``'s, left None for the job's defaults."""
    logger = get_run_logger()
    quiet_user_errors()  # a worker's bad input (e.g. no s3 extra) is one line in the run's logs, as on the CLI
    if flow_run.run_count > MAX_RUNS:
        raise UserError(f"flow run attempted {flow_run.run_count - 1} times; giving up (start a new run to try again)")
    options["artifacts_dir"] = options.get("artifacts_dir") or os.environ.get(ARTIFACTS_ENV) or None
    job = get_job(job).name  # an import path (my_job:JOB) -> its folder name (my_job.JOB); checks it too
    name = resolve_run_name(run_name, job, flow_run.scheduled_start_time)
    logger.info("%s: run folder %s/%s/%s (attempt %d)", job, options["artifacts_dir"] or "artifacts", job, name,
                flow_run.run_count)
    return train_flow.fn(job=job, run_name=name, **options)


#: Parameters: ``job`` (required), the ``run_name`` template, then every TrainConfig field but
#: ``fresh`` (a scheduled run never archives its own folder), as ``train`` has them.
scheduled_train = flow(name="scheduled-train", retries=FLOW_RETRIES, retry_delay_seconds=FLOW_RETRY_DELAY_S,
                       persist_result=False)(with_parameters(scheduled, [
                           parameter("job", required=True), parameter("run_name", RUN_NAME_TEMPLATE),
                           *config_parameters(exclude={"job", "run_name", "fresh"})]))
