"""The command's temporary Prefect server: ``prefect server start`` as a child that dies with it.

With no Prefect server configured, Prefect itself starts a temporary server at the first flow
call, i.e. only after this process has imported Prefect and torch and checked its input, waits
for it doing nothing, and leaves it running if the command is killed with SIGKILL.
:func:`launch` instead starts Prefect's documented command, ``prefect server start --host
127.0.0.1 --port <free port> --no-ui --no-scheduler --no-late-runs`` (services that act on
deployments and workers off: :data:`SERVICES_OFF`), before Prefect is even imported, and points
this process at it with the documented ``PREFECT_API_URL`` environment variable (read when Prefect
is imported, so no setting is changed afterwards). The server boots on the other core while this
process imports, checks its input and does training's one-off set-up (:func:`warm_up`); a thread
makes the server's slow first answers meanwhile (:meth:`TemporaryServer.make_first_requests`).

- It dies with this process even on SIGKILL (Linux: the child asks the kernel for SIGTERM when its
  parent dies, ``prctl(PR_SET_PDEATHSIG)``, before it starts Prefect), and is stopped at exit.
- Its output goes to an unnamed temporary file, never to the terminal: a command that refuses
  its input while the server is still starting prints its one line and nothing else. Only a server
  that fails gets its output saved to a named file, which the one-line error names.
- When Prefect's settings name a server (``PREFECT_API_URL`` in the environment; another source,
  such as the active profile, is found once Prefect is imported, and the command then runs again
  without ours) or forbid a temporary one (``server.ephemeral.enabled = false``), nothing is
  started; ``TRAINFLOW_TEMPORARY_SERVER=off`` does the same (Prefect then starts its own temporary server, if enabled). A running server,
  ``PREFECT_API_URL``, is the fast path: nothing to start.
- Only public interfaces: the ``prefect`` command and its options (the same in Prefect 3.8.8 and
  3.9.1), documented settings, the REST API; nothing of Prefect's or torch's whose name starts
  with ``_``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import IO

#: Set to ``off`` (or 0, false, no) to never start the command's own server.
OPT_OUT = "TRAINFLOW_TEMPORARY_SERVER"

#: Read-only REST requests (nothing is written to the database) whose first answer is slow; see
#: TemporaryServer.make_first_requests.
WARM_UP_REQUESTS = (("/admin/version", None), ("/flows/filter", b'{"limit": 1}'),
                    ("/flow_runs/filter", b'{"limit": 1}'), ("/task_runs/filter", b'{"limit": 1}'))

#: Public modules that the first chunk's report and the final plots import (tasks/reporting.py,
#: tasks/plots.py); warm_up imports them while the server boots.
LATER_IMPORTS = ("torch.utils.tensorboard", "matplotlib.backends.backend_agg")

FALSE = ("0", "false", "off", "no")
MIN_STARTUP_SECONDS = 90
#: The server's services stay on where they record what a run did (task runs and events, which
#: --no-services would drop from the UI); those that act on deployments, workers and schedules
#: are off, as in Prefect's own temporary server. Documented settings (server.services.*).
SERVICES_OFF = {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in (
    "CANCELLATION_CLEANUP", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "TRIGGERS")}


def reserve_port() -> socket.socket:
    """A bound, not listening, socket on a free port of 127.0.0.1. While it is open, the kernel
    gives that port to no other socket except one that also sets SO_REUSEADDR and binds it by
    number, as the server does (Linux): no other process can take it between now and the server's
    start. Close it once the server listens."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def server_configured() -> bool:
    """Whether the environment names a server, forbids a temporary one, or opts out of ours: the
    cheap look before Prefect is imported. A server named anywhere else (a profile, a .env or
    toml file) is found by :meth:`TemporaryServer.confirm` with Prefect's own settings."""
    env = os.environ
    enabled = env.get("PREFECT_SERVER_EPHEMERAL_ENABLED", env.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", ""))
    return bool(env.get("PREFECT_API_URL")) or env.get(OPT_OUT, "").lower() in FALSE or enabled.lower() in FALSE


class TemporaryServer:
    """``prefect server start`` on a free local port, for this process only."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.reserved: socket.socket | None = None
        self.port = 0
        self.output: IO[bytes] | None = None
        self.announced = False
        self.started = time.monotonic()

    @property
    def api_url(self) -> str:
        """The server's API URL."""
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        """Start the child; its output goes to an unnamed temporary file (gone with both processes)."""
        self.reserved = reserve_port()
        self.port = self.reserved.getsockname()[1]
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the child runs
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tasks.orchestration.server", str(os.getpid()), str(self.port), "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-ui", "--no-scheduler", "--no-late-runs", "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT, env={**env, **SERVICES_OFF},
            start_new_session=True)  # Ctrl-C in the terminal is for this command, which stops gracefully

    def save_output(self) -> str:
        """Copy the server's output so far to a named file, for an error message; its path."""
        fd, name = tempfile.mkstemp(prefix="trainflow-prefect-server-", suffix=".log")
        self.output.seek(0)
        with os.fdopen(fd, "wb") as out:
            out.write(self.output.read())
        return name

    def use(self) -> None:
        """Point this process's Prefect at the server: call it before Prefect is imported."""
        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ["PREFECT_UI_URL"] = ""  # the UI is off: no "View at <dead link>" lines

    def make_first_requests(self) -> None:
        """In a daemon thread: as soon as the server answers, make the requests whose first
        answer is slow (the version check every client makes loads Prefect's version lazily),
        while this process is still importing rather than in the first flow run."""

        def get(path: str, body: bytes | None) -> None:
            request = urllib.request.Request(f"{self.api_url}{path}", data=body, method="POST" if body else "GET",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5):
                pass

        def run() -> None:
            process = self.process
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process is self.process and process.poll() is None:
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

    def confirm(self) -> None:
        """Check with Prefect's own settings (all its sources, without our PREFECT_API_URL) that
        it names no server and allows a temporary one; if it does, stop ours and run the command
        again without it (a source server_configured does not read; Prefect fixes its settings
        at import)."""
        from prefect.settings import Settings

        ours = os.environ.pop("PREFECT_API_URL"), os.environ.pop("PREFECT_UI_URL", None)
        try:
            settings = Settings()
        finally:
            os.environ["PREFECT_API_URL"] = ours[0]
            if ours[1] is not None:
                os.environ["PREFECT_UI_URL"] = ours[1]
        if settings.api.url or not settings.server.ephemeral.enabled:
            self.stop()
            for key in ("PREFECT_API_URL", "PREFECT_UI_URL"):
                os.environ.pop(key, None)
            os.environ[OPT_OUT] = "off"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

    def answering(self) -> bool:
        """Whether the server answers its health check now."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        """Once the input is checked: confirm the settings, do training's one-off set-up if the
        server is still booting (:func:`warm_up`), and block until the server answers its health
        check; RuntimeError (one line, naming a file with the server's output) if it cannot start."""
        from prefect.logging import get_logger
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        self.confirm()
        # Announced here, not at spawn: a run that stops at bad input prints just its one error line.
        self.announced = True
        get_logger().info("Starting temporary server on http://127.0.0.1:%d (it stops when this command ends; "
                          "set PREFECT_API_URL to use a server of your own)", self.port)
        if not self.answering():
            warm_up()
        # Prefect's default (20 s) is too short for a busy 2-core machine, and pyproject.toml's 90 s
        # is read only in the project's folder; a server that dies is noticed at once anyway.
        timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), MIN_STARTUP_SECONDS)
        deadline = self.started + timeout
        try:
            while time.monotonic() < deadline:
                if self.answering():
                    return
                if self.process.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with status {self.process.returncode}; "
                                       f"its output is in {self.save_output()}")
                time.sleep(0.05)
        finally:
            self.reserved.close()
        raise RuntimeError(f"the temporary Prefect server did not start within {timeout} s (its output is in "
                           f"{self.save_output()}); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or "
                           "set PREFECT_API_URL")

    def stop(self) -> None:
        """Stop the child at exit, quietly unless the server was announced."""
        if self.process is None or not self.announced:
            if self.process is not None:
                self.process.terminate()
            return
        from prefect.logging import get_logger

        if self.process.poll() is not None:  # it stopped during the run
            get_logger().warning("The temporary server on http://127.0.0.1:%d had stopped (status %s); its output "
                                 "is in %s", self.port, self.process.returncode, self.save_output())
            return
        get_logger().info("Stopping temporary server on http://127.0.0.1:%d", self.port)
        # No waiting: every request this process made has been answered, and the server shuts
        # down cleanly on SIGTERM by itself.
        self.process.terminate()


def launch() -> TemporaryServer | None:
    """Start the temporary server now and point Prefect at it; None when settings name a server.
    Call it before importing Prefect."""
    if server_configured():
        return None
    server = TemporaryServer()
    server.spawn()
    atexit.register(server.stop)  # registered before Prefect's exit handlers: runs after them
    server.use()
    server.make_first_requests()
    return server


def warm_up() -> None:
    """Training's one-off set-up, done while the server boots: the modules the first chunk's
    report and the plots import, and a first torch optimizer (the first one built in a process
    imports torch's compiler stack, which the first chunk would otherwise wait for)."""
    import importlib

    import torch

    for name in LATER_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def freeze_once_up(port: int) -> None:
    """In the server's process: once it accepts connections, freeze what its boot made (it lives
    as long as the server) and let the collector run again."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    gc.freeze()
    gc.enable()


def die_with_parent(parent: int, signum: int) -> None:
    """In a child, first thing: on Linux, ask the kernel for ``signum`` when the parent dies
    (PR_SET_PDEATHSIG = 1; done in the new process, not between fork and exec, so it is safe
    whatever threads the parent runs); exit at once if ``parent`` is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signum)
    if os.getppid() != parent:
        sys.exit(1)


def child(argv: list[str]) -> None:
    """The server's process (``python -m tasks.orchestration.server <parent pid> <port> <module> <args>``): on
    Linux, ask for SIGTERM when the parent dies (PR_SET_PDEATHSIG = 1; done in the new process, not
    between fork and exec, so it is safe whatever threads the parent runs), give up if the parent
    is already gone, then run ``python -m <module> <args>`` (``prefect``: the command). Its boot
    makes many objects that live as long as the server; no full collection runs among them until
    the server answers (:func:`freeze_once_up`), as in flows/train_flow.py."""
    gc.disable()
    die_with_parent(int(argv[0]), signal.SIGTERM)
    threading.Thread(target=freeze_once_up, args=(int(argv[1]),), daemon=True).start()
    sys.argv = argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    child(sys.argv[1:])
