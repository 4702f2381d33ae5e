"""Every place trainflow works around a behaviour of Prefect, in one module. Each item names the
behaviour it depends on; tests/test_prefect_adapter.py fails if Prefect changes it.

1. :class:`Chain`: Prefect links a task's inputs to upstream task runs by object identity, after
   walking every argument (dataclasses, pydantic models, their fields) and it maps each task's
   result to its task run by ``id()``. So arguments are passed ``quote``-d (not walked: a Run
   shares objects such as ``cfg.lr`` with other results, and holds locks and threads), the order
   is given by ``wait_for`` on the previous result (``opaque``: not walked either), and every
   result is kept alive to the end of the flow (a freed result's ``id()`` can be reused by a new
   object, which Prefect would then link to the wrong task run).
2. :func:`quiet_user_errors`: Prefect logs a failed task or flow run on the ``prefect.task_runs`` /
   ``prefect.flow_runs`` loggers with the exception's traceback; bad input is one line.
3. :class:`OneCrashLine`: a task crashed by Ctrl-C crashes its flow run, and both log
   ``Crash detected!``; the task's copy only repeats it.
4. :func:`without_heartbeats`: flow runs send heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``)
   so a real server notices a dead run; on the command's own temporary server they only hold up
   the end of every flow run.
5. :func:`terminal_console`: Prefect's console log handler keeps its rich ``Console`` as
   ``.console``; drawing the live progress line on it keeps log lines above the line.
6. :func:`api_answers`: at exit, Prefect's handlers try to deliver every queued event to the API,
   for minutes when the API is gone.
7. :class:`NoDrainNotice`: while the events worker delivers what is still queued at exit, it logs
   ``Still processing items: N items remaining...`` on the ``EventsWorker`` logger, even when
   it is done a moment later: a finished command should exit quietly.

Prefect is imported inside the functions: the progress line (item 5) is drawn by modules that
a multi-process chunk's ranks import, and they start without Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from tasks.kernel import UserError


class Chain:
    """Call Prefect tasks one after another so that the UI's graph is one chain (item 1)."""

    def __init__(self) -> None:
        self.previous: Any = None
        self.kept: list[Any] = []  # alive to the end: Prefect maps results to task runs by id()

    def __call__(self, task: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from prefect.utilities.annotations import opaque, quote

        after = [] if self.previous is None else [opaque(self.previous)]
        result = task(*(quote(a) for a in args), **kwargs, wait_for=after)
        self.kept.append(result)
        self.previous = result
        return result


class HideUserErrorTracebacks(logging.Filter):
    """Drop the traceback of a UserError from a Prefect log record (item 2)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


class OneCrashLine(logging.Filter):
    """Drop the task run's copy of ``Crash detected!`` (item 3)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Crash detected!")


class NoDrainNotice(logging.Filter):
    """Drop the events worker's ``Still processing items`` line (item 7)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Still processing items")


def install(kind: type[logging.Filter], *loggers: str) -> None:
    """Add a ``kind`` filter to each logger that has none yet (idempotent)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def quiet_user_errors() -> None:
    """Bad input is one line in Prefect's logs too (item 2)."""
    install(HideUserErrorTracebacks, "prefect.task_runs", "prefect.flow_runs")


def quiet_command() -> None:
    """What the command's own output needs: bad input in one line, one crash line for a crash,
    and a quiet exit (items 2, 3, 7)."""
    quiet_user_errors()
    install(OneCrashLine, "prefect.task_runs")
    install(NoDrainNotice, "EventsWorker")


@contextlib.contextmanager
def without_heartbeats() -> Iterator[None]:
    """Flow runs without heartbeats, for the command's temporary server (item 4)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def terminal_console() -> Any | None:
    """The rich console of Prefect's log handler, when it writes to a terminal; else None (item 5)."""
    from rich.console import Console

    for handler in logging.getLogger().handlers:
        console = getattr(handler, "console", None)  # prefect.logging.handlers.PrefectConsoleHandler
        if isinstance(console, Console) and console.is_terminal:
            return console
    return None


def api_answers(timeout: float = 2.0) -> bool:
    """Whether the Prefect API still answers at all (any HTTP response counts), so the command
    knows whether Prefect's exit handlers can deliver what they hold (item 6)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:  # Prefect's own temporary server, inside this process's lifetime
        return True
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True
