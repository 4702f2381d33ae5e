"""Retry policy shared by the tasks: deterministic failures are not retried."""

from __future__ import annotations

from typing import Any

from tasks.jobs.spec import UserError


def NO_RETRY_ON_USER_ERROR(task: Any, task_run: Any, state: Any) -> bool:  # noqa: N802 - reads as a constant policy
    """Prefect ``retry_condition_fn``: retry anything but bad input or divergence (UserError),
    which would fail the same way again and only burn retries."""
    return not isinstance(state.data, UserError)
