"""Requeue crashed scheduled runs automatically: ``python deployments/automations.py``.

Registers (idempotently: create or update by name) one Prefect automation on the server at
``PREFECT_API_URL``: when a flow run of the ``scheduled-train`` flow enters ``Crashed`` (its
process died: OOM kill, SIGKILL, a worker reporting the process gone, or
``deployments/mark_crashed.py`` for a run whose worker died) and nothing has picked it up again
within ``REQUEUE_AFTER`` (a manual ``prefect flow-run retry`` wins), put that *same* flow run
back to ``Scheduled`` (named ``AwaitingRetry``), so any worker of its deployment (or the serve
process) runs it again. Same flow run, so same scheduled start time, so same run folder: it resumes
from its latest valid checkpoint.

Bounded: the trigger only matches crashes after attempt 1 .. ``MAX_RUNS - 1`` (the event's
``prefect.run-count`` label), so a run that crashes every time is requeued at most
``MAX_RUNS - 1`` times; the flow itself refuses attempt ``MAX_RUNS + 1`` as well. A run that
crashed before it ever started running (run count 0: bad entrypoint, missing environment) is
not requeued, since running it again would crash again.

Why wait instead of requeueing at once: a Prefect 3.9 process worker reports a crash twice,
first from its run executor, then itself, after it loaded the flow for ``on_crashed`` hooks
(an import of torch: tens of seconds on a busy machine) and freed its ``--limit`` slot. A run
requeued in that gap comes back to a worker still holding its slot ("Duplicate submission ...
detected") and the late second report marks it Crashed again. So the trigger is proactive: "a
Crashed event, then no Pending event of that flow run within ``REQUEUE_AFTER``" (evaluated
every 5 s, so the run is requeued 60-65 s after its crash).

``deployments/serve.py`` registers it too; for a work pool run this once after ``prefect deploy``.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # `python deployments/automations.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.flow import MAX_RUNS
from deployments.registry import FLOW_NAME

AUTOMATION_NAME = "trainflow-requeue-crashed-runs"
#: How long a crashed run stays Crashed before the automation requeues it.
REQUEUE_AFTER = timedelta(seconds=60)


def requeue_crashed() -> "Automation":  # noqa: F821 - prefect imported lazily
    """The automation, not yet registered."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=AUTOMATION_NAME,
        description=f"Reschedule a crashed {FLOW_NAME} flow run (same flow run id, so it resumes its run folder); "
        f"attempts 1-{MAX_RUNS - 1} only. Registered by deployments/automations.py.",
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.Crashed"},
            expect={"prefect.flow-run.Pending"},  # picked up again (e.g. a manual retry): nothing to do
            match={"prefect.resource.id": "prefect.flow-run.*",
                   "prefect.run-count": [str(n) for n in range(1, MAX_RUNS)]},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=REQUEUE_AFTER,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.SCHEDULED, name="AwaitingRetry",
            message=f"crashed; requeued by automation {AUTOMATION_NAME} to resume its run folder",
        )],
    )


def register() -> "Automation":  # noqa: F821
    """Create the automation, or update (and re-enable) the one of that name; duplicates of
    that name are deleted. Safe to call on every start."""
    from prefect import get_client

    wanted = requeue_crashed()
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if not existing:
            wanted.create()
            return wanted
        keep, *extra = existing
        for a in extra:
            client.delete_automation(a.id)
    wanted.id = keep.id
    wanted.update()  # the whole definition, enabled again if it was paused
    return wanted


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print("usage: PREFECT_API_URL=... python deployments/automations.py", file=sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    a = register()
    print(f"automation {a.name} ({a.id}): requeues crashed {FLOW_NAME} runs, attempts 1-{MAX_RUNS - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
