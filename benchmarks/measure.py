"""Measuring whole commands the way a user runs them: wall time, CPU time of the command and of
every process it starts, and when observable events (a log line, a checkpoint file) happen.

Linux only (prctl, process groups). CPU time is the kernel's own accounting of reaped
processes, so no sampling and no psutil.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.02  # event polling period: fine enough for events seconds apart, cheap on 2 busy cores


def become_subreaper() -> None:
    """Adopt orphaned descendants. Our flow stops its Prefect server with SIGTERM and exits at
    once; the server then dies as an orphan. As subreaper this process can still reap it, so its
    CPU time lands in RUSAGE_CHILDREN instead of being lost to init."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children_cpu() -> float:
    """User + system CPU seconds of all reaped descendants so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Launch:
    """One command running in its own process group, its output timestamped line by line."""

    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    t0: float = 0.0
    cpu0: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self) -> Launch:
        self.cpu0, self.t0 = children_cpu(), time.perf_counter()
        # A new session: one killpg reaches the command and everything it started.
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                self.lines.append((time.perf_counter() - self.t0, line.rstrip("\n")))
                log.write(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def wait_for(self, event: Callable[[], bool], timeout: float) -> float | None:
        """Seconds from launch until ``event()`` holds; None if the command ended or timed out first."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if event():
                return self.elapsed()
            if self.proc.poll() is not None:
                return self.elapsed() if event() else None
            time.sleep(POLL_S)
        return None

    def kill(self) -> None:
        """SIGKILL the whole process group, as an OOM killer or a lost machine would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float) -> tuple[float, float, int]:
        """Wait for the command: (wall seconds to its exit, CPU seconds of it and all its
        descendants, exit status). Descendants still alive 30 s after it exited are killed."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait()
        wall = self.elapsed()
        reap_descendants(self.proc.pid, grace=30.0)
        return wall, children_cpu() - self.cpu0, rc

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def reap_descendants(pgid: int, grace: float) -> None:
    """Reap adopted orphans (see become_subreaper) so that their CPU time is counted."""
    deadline = time.perf_counter() + grace
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.perf_counter() > deadline:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = float("inf")  # killed: now just wait for them
            time.sleep(POLL_S)


def new_files(folder: Path, pattern: str, before: set[str]) -> Callable[[], bool]:
    """An event: a file matching ``pattern`` that was not in ``before`` exists in ``folder``."""
    return lambda: bool(files(folder, pattern) - before)


def files(folder: Path, pattern: str) -> set[str]:
    return {p.name for p in folder.glob(pattern)} if folder.is_dir() else set()


def line_event(launch: Launch, needle: str) -> Callable[[], bool]:
    """An event: a line containing ``needle`` was printed."""
    return lambda: any(needle in line for _, line in launch.lines)


def first_line_time(launch: Launch, needle: str) -> float | None:
    """When (seconds from launch) the first line containing ``needle`` was read."""
    return next((t for t, line in launch.lines if needle in line), None)
