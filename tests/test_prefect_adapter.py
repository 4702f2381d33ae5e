"""The behaviours of Prefect that tasks/orchestration/prefect_adapter.py works around, one test each: if Prefect
changes one, its test fails and the workaround can go (or must change)."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from tasks.kernel import UserError
from tasks.orchestration.prefect_adapter import (
    Chain,
    HideUserErrorTracebacks,
    terminal_console,
    without_heartbeats,
)


@dataclasses.dataclass(frozen=True)
class Box:
    lock: object
    items: list


@task(cache_policy=NO_CACHE)
def identity(box: Box) -> dict[str, int]:
    return {"id": id(box)}


@task(cache_policy=NO_CACHE)
def refuse() -> None:
    raise UserError("bad input, in one line")


def test_chain_hands_tasks_the_object_itself_and_prefect_maps_dict_results_by_id(prefect_api: str) -> None:
    @flow
    def chained() -> tuple[bool, bool, object]:
        box, chain = Box(threading.Lock(), [1]), Chain()
        first = chain(identity, box)
        second = chain(identity, box)
        entry = FlowRunContext.get().run_results.get(id(second))
        return first["id"] == id(box), entry is not None, entry[2] if entry else "missing"

    same, mapped, weak = chained()
    assert same  # a quoted argument arrives as the object itself
    # Item 1: a dict result is found by id() alone, with no reference that could tell a recycled
    # address: Chain keeps every result alive for this.
    assert mapped and weak is None


def test_prefect_logs_a_failed_task_with_its_traceback_and_the_filter_drops_it(prefect_api: str, monkeypatch) -> None:
    raw, shown = [], []

    class Spy(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raw.append(record.exc_info)
            return True

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.exc_info)

    logger = logging.getLogger("prefect.task_runs")
    spy, hide, keep = Spy(), HideUserErrorTracebacks(), Keep()
    monkeypatch.setattr(logger, "filters", [spy, hide])  # Prefect's record first, then the filter's (an earlier test may have installed one)
    logger.addHandler(keep)
    try:
        @flow
        def failing() -> None:
            refuse()

        with pytest.raises(UserError):
            failing()
    finally:
        logger.removeHandler(keep)
    assert any(e and isinstance(e[1], UserError) for e in raw)  # item 2: Prefect attaches the traceback
    assert shown and not any(e and isinstance(e[1], UserError) for e in shown)


def test_the_heartbeat_setting_and_the_console_handler_are_what_the_adapter_uses() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    from rich.console import Console

    with without_heartbeats():  # item 4
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
    assert isinstance(PrefectConsoleHandler().console, Console)  # item 5
    assert terminal_console() is None  # the test's output is not a terminal


def test_the_events_worker_logs_its_drain_on_a_logger_of_its_class_name() -> None:
    import inspect

    from prefect.events.worker import EventsWorker

    source = inspect.getsource(inspect.getmodule(EventsWorker.__mro__[1]))  # its queue service's module
    assert 'logging.getLogger(f"{type(self).__name__}")' in source  # item 7: the logger "EventsWorker"
    assert "Still processing items" in source
