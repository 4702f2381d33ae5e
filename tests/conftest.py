"""Shared fixtures: one temporary Prefect server per session, isolated PREFECT_HOME."""

from __future__ import annotations

import os
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

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "flows" / "train_flow.py"


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """Start one temporary Prefect server for the session; returns its API URL so
    subprocesses (real `python flows/train_flow.py` runs) can share it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url  # for subprocesses started by tests
        yield url
        os.environ.pop("PREFECT_API_URL", None)


def cli_env(prefect_api: str) -> dict[str, str]:
    """Environment for a CLI subprocess that talks to the session's server."""
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], prefect_api: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python flows/train_flow.py ARGS` to completion."""
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=ROOT, env=cli_env(prefect_api),
                          capture_output=True, text=True, timeout=timeout)


def train_cli(args: list[str], prefect_api: str, root: Path, run_name: str) -> Path:
    """Run the real command into ``root`` uninterrupted; returns the run folder."""
    proc = run_cli([*args, "--artifacts-dir", str(root), "--run-name", run_name], prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = args[args.index("--job") + 1]
    return root / job / run_name


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A saved state_dict, loaded the safe way."""
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of two state_dicts (not allclose)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs: {a[k]} vs {b[k]}"


def fail_once_at(monkeypatch, epoch: int, message: str = "injected fault inside chunk 2") -> list[int]:
    """Make ``Trainer.run_epoch`` raise the first time it reaches ``epoch``; returns the list of
    every epoch it is called with, in order."""
    from tasks.training import Trainer

    real = Trainer.run_epoch
    calls: list[int] = []

    def flaky(self, e: int, *args):
        calls.append(e)
        if e == epoch and calls.count(epoch) == 1:
            raise RuntimeError(message)
        return real(self, e, *args)

    monkeypatch.setattr(Trainer, "run_epoch", flaky)
    return calls


class S3Server:
    """A moto S3 server of the test session's own, on a loopback port (``moto_server``)."""

    def __init__(self, endpoint: str, proc: subprocess.Popen):
        self.endpoint, self.proc, self.count = endpoint, proc, 0

    def bucket(self) -> str:
        """A new, empty bucket: ``s3://<name>``."""
        import s3fs

        self.count += 1
        name = f"trainflow-test-{os.getpid()}-{self.count}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"


def start_moto(**env: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port (``env``: moto's settings); returns it and its URL."""
    import time
    import urllib.request

    from tasks.server import reserve_port

    with reserve_port() as sock:
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return proc, endpoint
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error: it answers (one that checks credentials refuses)
                return proc, endpoint
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)


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
