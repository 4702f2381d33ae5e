"""A writer that lost its lease writes nothing more: the interleaving of the fault trial.

Machine A trains a run on S3 through a proxy that holds A's upload of checkpoint 2. While that
upload is in flight A is stopped (SIGSTOP) past its lease's expiry; machine B (another cache,
straight to the store) takes the run over and completes it. Then A continues and its held upload
goes through: A must commit nothing, push nothing, exit 1 naming the lost lease, and leave B's
completed run exactly as B left it."""

from __future__ import annotations

import http.client
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import ROOT, TRAIN, cli_env

ARGS = ["--job", "nonlinear", "--epochs", "1500", "--chunk-epochs", "500", "--seed", "5"]
LEASE_S = "4"


class HoldingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to ``upstream``; holds the first PUT whose path matches ``hold``
    until :attr:`release` is set (:attr:`held` is set once it arrives)."""

    daemon_threads = True

    def __init__(self, upstream: str, hold: str):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.hold = upstream.removeprefix("http://"), re.compile(hold)
        self.held, self.release = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def forward(self) -> None:
        proxy: HoldingProxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and not proxy.held.is_set() and proxy.hold.search(self.path):
            proxy.held.set()
            proxy.release.wait(300)
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward


def listing(bucket: str) -> dict[str, str]:
    """Every object of the bucket with its ETag."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return {k: v["ETag"] for k, v in fs.find(bucket.removeprefix("s3://"), detail=True).items()}


def test_a_holder_that_lost_its_lease_writes_nothing_more(prefect_api: str, s3_server, tmp_path: Path) -> None:
    bucket = s3_server.bucket()
    proxy = HoldingProxy(s3_server.endpoint, hold=r"/checkpoints/checkpoint-2\.[0-9a-f]+\.pt")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    args = [*ARGS, "--artifacts-dir", f"{bucket}/p"]
    env = cli_env(prefect_api, TRAINFLOW_LEASE_SECONDS=LEASE_S)
    a = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**env, "AWS_ENDPOINT_URL": proxy.url,
                                                        "TRAINFLOW_CACHE": str(tmp_path / "machine-a")})
    try:
        assert proxy.held.wait(300), "machine A never uploaded checkpoint 2"
        a.send_signal(signal.SIGSTOP)  # stopped with its upload in flight
        time.sleep(float(LEASE_S) + 2)  # its lease runs out
        b = subprocess.run([sys.executable, str(TRAIN), *args], cwd=ROOT, text=True, capture_output=True, timeout=600,
                           env={**env, "TRAINFLOW_CACHE": str(tmp_path / "machine-b")})
        assert b.returncode == 0, b.stderr[-3000:]
        completed = listing(bucket)
        a.send_signal(signal.SIGCONT)
        proxy.release.set()
        out, _ = a.communicate(timeout=300)
    finally:
        proxy.release.set()
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
        proxy.shutdown()
    assert a.returncode == 1, out[-3000:]
    assert "lost the lease" in out, out[-3000:]
    after = listing(bucket)
    # The one write A could not take back was already on the wire: the bytes of checkpoint 2,
    # under a key of its own, which no manifest commits. Everything else is as B left it.
    extra = after.keys() - completed.keys()
    assert all(re.search(r"/checkpoints/checkpoint-2\.[0-9a-f]+\.pt$", k) for k in extra), extra
    assert {k: after[k] for k in completed} == completed
    rerun = subprocess.run([sys.executable, str(TRAIN), *args], cwd=ROOT, text=True, capture_output=True, timeout=300,
                           env={**env, "TRAINFLOW_CACHE": str(tmp_path / "machine-b")})
    assert rerun.returncode == 0 and "already complete" in rerun.stdout, rerun.stdout + rerun.stderr[-2000:]
