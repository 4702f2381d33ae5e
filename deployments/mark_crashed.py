"""Mark a flow run whose worker died as Crashed, so it can be retried:
``python deployments/mark_crashed.py <flow-run-id> && prefect flow-run retry <flow-run-id>``.

A SIGKILLed worker (or a dead machine) reports nothing, so its flow run stays ``Running`` on
the server and ``prefect flow-run retry`` refuses it. Only use this once you know the process
running the flow is gone.
"""

from __future__ import annotations

import sys
from uuid import UUID


def mark_crashed(flow_run_id: str | UUID, message: str = "marked crashed: its worker died") -> str:
    """Force ``Running``/``Pending`` -> ``Crashed``; returns the resulting state's name."""
    from prefect import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        if run.state is None or run.state.type.value not in ("RUNNING", "PENDING"):
            return run.state.name if run.state else "unknown"
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        return client.read_flow_run(run.id).state.name


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python deployments/mark_crashed.py <flow-run-id>", file=sys.stderr)
        return 2
    state = mark_crashed(args[0])
    print(f"flow run {args[0]} is {state}; now: prefect flow-run retry {args[0]}")
    return 0 if state == "Crashed" else 1


if __name__ == "__main__":
    sys.exit(main())
