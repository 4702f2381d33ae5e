"""Retry policy shared by the tasks, and the advice a failed run ends with: failures that would
happen again the same way are not retried, and the user is told what to fix before a rerun."""

from __future__ import annotations

import errno
from typing import Any

from tasks.kernel import UserError
from tasks.storage.remote import LeaseLost

#: OS errors that a retry or a rerun meets again until the user changes something.
NEEDS_A_FIX = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def fix_first(exc: BaseException) -> str | None:
    """What the user must fix before a rerun can succeed; None when a plain rerun may."""
    if isinstance(exc, OSError) and exc.errno in NEEDS_A_FIX:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{NEEDS_A_FIX[exc.errno]}{where}: fix that first"
    if type(exc).__module__.startswith(("httpx", "httpcore")) and "Connect" in type(exc).__name__:
        from prefect.settings import PREFECT_API_URL

        return (f"the Prefect API at {PREFECT_API_URL.value()} can't be reached: start that server (or unset "
                f"PREFECT_API_URL, and the command starts its own) first")
    return None


def retried(exc: BaseException) -> bool:
    """Whether a task retry may help: not bad input or divergence (UserError), not a lost lease
    (it is lost for good), not a full or read-only disk."""
    return not isinstance(exc, UserError | LeaseLost) and fix_first(exc) is None


def NO_RETRY_ON_USER_ERROR(task: Any, task_run: Any, state: Any) -> bool:  # noqa: N802 - reads as a constant policy
    """Prefect ``retry_condition_fn`` (see :func:`retried`)."""
    return retried(state.data)
