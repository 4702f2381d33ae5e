"""Fixtures: one Prefect server for the whole session (under xdist the controller starts it and
every worker shares it), one S3 server per test process, an isolated PREFECT_HOME. Helpers that are not fixtures: tests/helpers.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports prefect: isolate its home, results and settings for the session.
_HOME = tempfile.mkdtemp(prefix="trainflow-prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(Path(_HOME) / "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Test processes run side by side (pytest-xdist): one thread each, and each command the tests
# start (--threads auto reads this) too, so they do not fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import S3Server, answers, parents, start_moto, wait_until  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


#: Where the controller's shared Prefect server answers (set for the xdist workers it starts).
SHARED_API = "TRAINFLOW_TEST_PREFECT_API"


def pytest_configure(config: pytest.Config) -> None:
    """With xdist, the controller starts one Prefect server for every worker (a server's start
    costs ~15 CPU-seconds; the workers inherit its URL); without, each session starts its own."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from tasks.orchestration.server import reserve_port

    with reserve_port() as sock:
        port = sock.getsockname()[1]
    log = open(Path(_HOME) / "shared-server.log", "w")  # noqa: SIM115 - open as long as the server
    config.stash[SERVER] = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_HOME": str(Path(_HOME) / "shared")})
    os.environ[SHARED_API] = f"http://127.0.0.1:{port}/api"


SERVER = pytest.StashKey[subprocess.Popen]()


def pytest_unconfigure(config: pytest.Config) -> None:
    if (server := config.stash.get(SERVER, None)) is not None:
        server.terminate()
        server.wait(60)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The session's Prefect server (the controller's shared one under xdist, else a temporary
    one); returns its API URL so subprocesses (real `python flows/train_flow.py` runs) share it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    shared = os.environ.get(SHARED_API)
    if shared:
        wait_until(lambda: answers(shared), 300, "the shared Prefect server", every=0.5)
    with temporary_settings({PREFECT_API_URL: shared}) if shared else prefect_test_harness(server_startup_timeout=300):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url  # for subprocesses started by tests
        yield url
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server; point boto (and so s3fs, and every subprocess) at it with the
    standard variables, as a user would point it at MinIO."""
    proc, endpoint = start_moto()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, proc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()
        proc.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with long tests (marked slow) first, each module's tests kept together (its
    module-scoped fixtures are made once): a long test that starts last keeps one worker busy
    while the others have nothing left to do."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow)


def children() -> set[int]:
    return {pid for pid, parent in parents().items() if parent == os.getpid()}


@pytest.fixture(autouse=True)
def no_stray_processes():
    """A test that failed half-way leaves none of its commands running (they would slow down
    every test after it); processes of fixtures, started before, stay."""
    before = children()
    yield
    for pid in children() - before:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
