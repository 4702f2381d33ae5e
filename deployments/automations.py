"""Recover crashed and silent scheduled runs automatically: ``python deployments/automations.py``.

Registers (idempotently: create or update by name) two Prefect automations on the server at
``PREFECT_API_URL``, both scoped to flow runs of the ``scheduled-train`` flow:

- ``trainflow-crash-silent-runs``: a run whose heartbeats stopped (its worker and machine died
  with it, so nobody reports anything) is marked ``Crashed``: Prefect's "detect zombie flows"
  recipe, a heartbeat followed by no other event of that flow run within
  ``HEARTBEAT_WINDOW`` (3 heartbeats of ``deployments.registry.HEARTBEAT_SECONDS``, which the
  deployments set on their flow runs). A run that already ended is never touched: the action
  does not force the state, and Prefect refuses to move a finished run to ``Crashed`` (a late
  heartbeat after completion, PrefectHQ/prefect#18653, stays harmless).
- ``trainflow-requeue-crashed-runs``: when a run enters ``Crashed`` (its process died: OOM kill,
  SIGKILL, a worker reporting the process gone, the automation above, or
  ``deployments/mark_crashed.py``) and nothing has picked it up again within ``REQUEUE_AFTER``
  (a manual ``prefect flow-run retry`` wins), put that *same* flow run back to ``Scheduled``
  (named ``AwaitingRetry``), so any worker of its deployment (or the serve process) runs it
  again. Same flow run, so same scheduled start time, so same run folder: it resumes from its
  latest valid checkpoint.

Bounded: the requeue trigger only matches crashes after attempt 1 .. ``MAX_RUNS - 1`` (the
event's ``prefect.run-count`` label), so a run that crashes every time is requeued at most
``MAX_RUNS - 1`` times; the flow itself refuses attempt ``MAX_RUNS + 1`` as well. A run that
crashed before it ever started running (run count 0: a repository its pull step cannot reach,
a bad entrypoint, a missing environment) is not requeued, since running it again would crash
again.

Why wait before requeueing: a Prefect 3.9 process worker reports a crash twice, first from its
run executor, then itself, after it loaded the flow for ``on_crashed`` hooks (an import of
torch: tens of seconds on a busy machine) and freed its ``--limit`` slot. A run requeued in that
gap comes back to a worker still holding its slot ("Duplicate submission ... detected") and the
late second report marks it Crashed again. So the trigger is proactive: "a Crashed event, then
no Pending event of that flow run within ``REQUEUE_AFTER``" (evaluated every 5 s, so the run is
requeued 60-65 s after its crash).

``deployments/serve.py`` and ``deployments/deploy.py`` register them too.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python deployments/automations.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.flow import MAX_RUNS
from deployments.registry import FLOW_NAME, HEARTBEAT_SECONDS

AUTOMATION_NAME = "trainflow-requeue-crashed-runs"
SILENT_NAME = "trainflow-crash-silent-runs"
#: How long a crashed run stays Crashed before the automation requeues it.
REQUEUE_AFTER = timedelta(seconds=60)
#: A run that sent no event for this long after a heartbeat is declared crashed (Prefect's
#: recipe asks for at least three heartbeat intervals).
HEARTBEAT_WINDOW = timedelta(seconds=3 * HEARTBEAT_SECONDS)
#: Events of our own flow's runs only.
OUR_RUNS = {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}


def proactive(name: str, description: str, trigger: dict[str, Any], action: dict[str, Any]) -> "Automation":  # noqa: F821
    """An automation on our flow's runs, not yet registered: when ``trigger`` (``after``,
    ``expect``, ``match``, ``within``) fires for one flow run, change that run's state (``action``)."""
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=name, description=f"{description} Registered by deployments/automations.py.", enabled=True,
        trigger=EventTrigger(match_related=OUR_RUNS, for_each={"prefect.resource.id"}, posture=Posture.Proactive,
                             threshold=1, **trigger),
        actions=[ChangeFlowRunState(**action)],
    )


def requeue_crashed() -> "Automation":  # noqa: F821 - prefect imported lazily
    """The requeue automation, not yet registered."""
    from prefect.client.schemas.objects import StateType

    return proactive(
        AUTOMATION_NAME,
        f"Reschedule a crashed {FLOW_NAME} flow run (same flow run id, so it resumes its run folder); "
        f"attempts 1-{MAX_RUNS - 1} only.",
        trigger={"after": {"prefect.flow-run.Crashed"},
                 "expect": {"prefect.flow-run.Pending"},  # picked up again (e.g. a manual retry): nothing to do
                 "match": {"prefect.resource.id": "prefect.flow-run.*",
                           "prefect.run-count": [str(n) for n in range(1, MAX_RUNS)]},
                 "within": REQUEUE_AFTER},
        action={"state": StateType.SCHEDULED, "name": "AwaitingRetry",
                "message": f"crashed; requeued by automation {AUTOMATION_NAME} to resume its run folder"},
    )


def crash_silent() -> "Automation":  # noqa: F821
    """The zombie-run automation, not yet registered."""
    from prefect.client.schemas.objects import StateType

    return proactive(
        SILENT_NAME,
        f"Mark a {FLOW_NAME} flow run Crashed when its heartbeats stop (its worker died with it), so "
        f"{AUTOMATION_NAME} requeues it.",
        trigger={"after": {"prefect.flow-run.heartbeat"},
                 "expect": {"prefect.flow-run.*"},  # the next heartbeat, or any state change
                 "match": {"prefect.resource.id": "prefect.flow-run.*"},
                 "within": HEARTBEAT_WINDOW},
        # force=False: Prefect refuses Crashed for a run already Completed/Failed/Cancelled.
        action={"state": StateType.CRASHED, "force": False,
                "message": f"no heartbeat for {HEARTBEAT_WINDOW.seconds} s: its worker is presumed dead "
                           f"(automation {SILENT_NAME})"},
    )


def register() -> list["Automation"]:  # noqa: F821
    """Create both automations, or update (and re-enable) the ones of those names; duplicates
    are deleted. Safe to call on every start."""
    return [upsert(crash_silent()), upsert(requeue_crashed())]


def upsert(wanted: "Automation") -> "Automation":  # noqa: F821
    from prefect import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(wanted.name)
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
    silent, requeue = register()
    print(f"automation {silent.name} ({silent.id}): marks {FLOW_NAME} runs Crashed after "
          f"{HEARTBEAT_WINDOW.seconds} s without a heartbeat")
    print(f"automation {requeue.name} ({requeue.id}): requeues crashed {FLOW_NAME} runs, attempts 1-{MAX_RUNS - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
