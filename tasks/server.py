"""Prefect's temporary API server for a command-line run, started at launch.

With no ``PREFECT_API_URL``, Prefect starts a temporary server (a uvicorn subprocess, ~4 s)
at the first flow call, i.e. only after this process has imported Prefect and torch and checked
its input, and waits for it doing nothing. :func:`boot_temporary_server` starts the same server
(Prefect's own command, UI off) before even Prefect is imported, then points this process at it:
it boots on the other core while this process imports, checks the input and does the imports
training would do lazily anyway (:func:`preimport`); a thread makes the server's slow first
answers (:meth:`TemporaryServer.warm_up`) meanwhile. The parent also skips Prefect's
server-side imports (~1.6 s), and the server dies with this process even on SIGKILL (Linux),
where Prefect's own would be orphaned. When settings name a server, nothing changes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

#: Imported lazily during the first chunk or the report (torch.optim imports torch._dynamo when
#: the first optimizer is built: ~1.3 s); importing them while the server boots costs no wall time.
LAZY_IMPORTS = ("torch._dynamo", "tensorboard.compat.proto.event_pb2", "matplotlib.backends.backend_agg")

#: Read-only requests (nothing is written to the database) whose first answer is slow; see
#: TemporaryServer.warm_up.
WARM_UP_REQUESTS = (("/admin/version", None), ("/flows/filter", b'{"limit": 1}'),
                    ("/flow_runs/filter", b'{"limit": 1}'), ("/task_runs/filter", b'{"limit": 1}'))

#: uvicorn's exit status when the port was taken between our check and its bind.
PORT_TAKEN = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TemporaryServer:
    """A Prefect API server subprocess on a free local port, for this process only."""

    def __init__(self) -> None:
        # Prefect's own environment for its temporary server. The settings it adds from its
        # context come, on a command line, from this same environment, profile and project files.
        self.env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1"}
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.announced = False

    @property
    def api_url(self) -> str:
        """The server's API URL."""
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        """Start the subprocess (Prefect's own command for its temporary server)."""
        self.port = _free_port()
        # prctl in a forked child is only safe while this process has a single thread.
        linux_single = sys.platform.startswith("linux") and threading.active_count() == 1
        package = Path(importlib.util.find_spec("prefect").origin).parent  # without importing it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=self.env, preexec_fn=_die_with_parent if linux_single else None)

    def use(self) -> None:
        """Point this process's Prefect at the server."""
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ["PREFECT_UI_URL"] = ""  # the UI is off: no "View at <dead link>" lines
        refresh_global_settings_context()  # Prefect reads settings once at import; see the new URL

    def warm_up(self) -> None:
        """In a daemon thread: as soon as the server answers, make the requests whose first
        answer is slow (~0.6 s in all; the version check every client makes loads Prefect's
        version lazily), while this process is still importing rather than in the first flow run."""

        def get(path: str, body: bytes | None) -> None:
            request = urllib.request.Request(f"{self.api_url}{path}", data=body, method="POST" if body else "GET",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5):
                pass

        def run() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
                try:
                    get(*WARM_UP_REQUESTS[0])  # fails until the server is up
                except OSError:
                    time.sleep(0.05)
                    continue
                for path, body in WARM_UP_REQUESTS[1:]:
                    with contextlib.suppress(OSError):
                        get(path, body)
                return

        threading.Thread(target=run, name="prefect-server-warm-up", daemon=True).start()

    def wait_ready(self) -> None:
        """Block until the server answers its health check; RuntimeError if it cannot start."""
        from prefect.logging import get_logger
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        log = get_logger()  # "prefect", like Prefect's own temporary-server messages
        # Announced here, not at spawn: a run that stops at bad input prints just its one error line.
        self.announced = True
        log.info("Starting temporary server on http://127.0.0.1:%d (it stops when this command ends; "
                 "set PREFECT_API_URL to use a server of your own)", self.port)
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == PORT_TAKEN:
                self.spawn()
                self.use()
                continue
            if status is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {status} (its output is above)")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the temporary Prefect server did not start within {timeout} s; "
                           "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")

    def stop(self) -> None:
        """Ask the subprocess to shut down (at exit)."""
        if self.process is not None and self.process.poll() is None:
            if self.announced:
                from prefect.logging import get_logger

                get_logger().info("Stopping temporary server on http://127.0.0.1:%d", self.port)
            # No waiting: every request this process made has been answered, and uvicorn shuts
            # down cleanly on SIGTERM by itself (waiting for it cost ~0.2 s per run).
            self.process.terminate()


def boot_temporary_server() -> TemporaryServer | None:
    """Start the temporary server now and point Prefect at it; None when a server is configured.
    Call it before importing Prefect."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = TemporaryServer()
    server.spawn()  # first: it boots while Prefect's settings (below) are imported
    atexit.register(server.stop)
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        server.stop()  # a profile or project file names a server (or forbids a temporary one)
        return None
    server.use()
    server.warm_up()
    return server


def preimport() -> None:
    """Do the imports that training and reporting would do later, while the server boots."""
    for name in LAZY_IMPORTS:
        importlib.import_module(name)


@contextlib.contextmanager
def temporary_server_settings() -> Iterator[None]:
    """Settings for a flow on the temporary server: no flow-run heartbeats. They exist so a real
    server notices a dead run; the temporary server dies with this process, and stopping the
    heartbeat thread holds up the end of every flow run by up to 1 s."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
