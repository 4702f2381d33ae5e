"""Test-only fault injection, loaded by a subprocess that has this folder on PYTHONPATH: the
``os.fsync`` of a checkpoint's temp file first sleeps ``SLOW_FSYNC_SECONDS``. An atomic write
fsyncs its temp file before the rename, so this widens the window in which a kill lands inside
a checkpoint write, and only there (Linux: the file's name comes from /proc/self/fd)."""

import os
import time

DELAY = float(os.environ.get("SLOW_FSYNC_SECONDS", "0"))

if DELAY > 0:
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = ""
        if name.startswith(".checkpoint-") and name.endswith(".tmp"):
            time.sleep(DELAY)
        real_fsync(fd)

    os.fsync = slow_fsync
