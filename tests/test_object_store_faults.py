"""Faults of runs on object storage, end to end through the real command against the session's
S3 server (moto): the store becoming unreachable in the middle of a run, and a soak of SIGKILLs,
some inside a checkpoint upload, each rerun on a fresh "machine" (an empty local cache).

moto keeps its objects in memory, so the store is never killed: the command reaches it through a
TCP proxy of this module (:class:`Proxy`), which can refuse every connection (the store is gone),
cut a given request, or hold a response back (a slow store), while the test looks at the store
directly."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tasks.storage.remote import LEASE_KEY, Remote, chunk_of
from tasks.storage.store import ObjectCheckpoints
from tests.helpers import (
    ROOT,
    TRAIN,
    assert_same_tensors,
    machine,
    state_dict,
    train_cli,
    wait_until,
)

#: 6 chunks of 100 epochs.
SMALL = ["--job", "nonlinear", "--epochs", "600", "--chunk-epochs", "100", "--seed", "3"]

#: What a proxy does with a request (``on_request(method, path)``): forward it (None), stop the
#: proxy before forwarding it ("cut"), or hold the response back for a number of seconds.
Action = None | str | float


class Proxy:
    """A TCP proxy on 127.0.0.1 forwarding to the S3 server: the store as the command sees it.

    :meth:`stop` closes the listener and every forwarded connection and keeps the port bound but
    not listening, so connections are refused at once (as by a host whose S3 server went away)
    and :meth:`start` can listen on the same port again (the store is back)."""

    REQUEST = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.[01]\r\n")

    def __init__(self, upstream: str, on_request: Callable[[str, str], Action] | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.on_request = on_request or (lambda method, path: None)
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.cut: tuple[float, str, str] | None = None  # the request that stopped the proxy
        self.stopped = threading.Event()
        self.stopped.set()  # until start()
        self.listener: socket.socket | None = None
        self.reserve = self.bound(0)
        self.port = self.reserve.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def bound(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def start(self) -> Proxy:
        with self.lock:
            self.reserve.close()
            self.listener = self.bound(self.port)
            self.listener.listen(64)
            self.stopped.clear()
            threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
            for sock in [self.listener, *self.sockets]:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()
            self.reserve = self.bound(self.port)  # bound, not listening: connections are refused

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.stopped.is_set():
                    client.close()
                    server.close()
                    return
                self.sockets |= {client, server}
            held: dict[str, float] = {}  # a response to hold back on this connection
            threading.Thread(target=self.pump, args=(client, server, held, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, held, False), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, held: dict[str, float], upstream: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if upstream:  # requests: the client sends one at a time on a connection (no pipelining)
                    seen = tail + data
                    for m in self.REQUEST.finditer(seen):
                        if m.end() <= len(tail):
                            continue  # seen with the previous data already
                        method, path = m.group(1).decode(), m.group(2).decode()
                        action = self.on_request(method, path)
                        if action == "cut":
                            self.cut = (time.monotonic(), method, path)
                            self.stop()
                            return
                        if isinstance(action, float):
                            held["seconds"] = action
                    tail = seen[-512:]
                elif held and not data.startswith(b"HTTP/1.1 100 "):  # the response itself, not "100 Continue"
                    time.sleep(held.pop("seconds"))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                for sock in (src, dst):
                    self.sockets.discard(sock)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()


@pytest.fixture
def proxies():
    """Proxies made by a test, all stopped at its end."""
    made: list[Proxy] = []
    yield made
    for proxy in made:
        proxy.stop()
        proxy.reserve.close()


def committed(run: Remote) -> dict[str, dict]:
    """Every manifest under ``checkpoints/`` by key, each checked to commit bytes that exist and
    match its size and sha256: a commit is whole or absent, never half."""
    ckpts = run.child("checkpoints")
    keys = set(ckpts.keys())
    found = {}
    for key in sorted(k for k in keys if k.endswith(".json")):
        manifest = json.loads(ckpts.get(key))
        assert manifest["file"] == key[:-5] + ".pt" and manifest["file"] in keys, f"{key} commits missing bytes"
        data = ckpts.get(manifest["file"])
        assert len(data) == manifest["bytes"] and hashlib.sha256(data).hexdigest() == manifest["sha256"], key
        found[key] = manifest
    return found


def assert_newest_commit_loads(run: Remote, manifests: dict[str, dict]) -> None:
    """The product's reader resumes from the newest commit and rejects none of them."""
    fingerprint = json.loads(run.get("config.json"))["fingerprint"]
    got = ObjectCheckpoints(run.child("checkpoints")).latest_valid(fingerprint, warn=lambda *a: None)
    newest = max(manifests.values(), key=lambda m: (m["epoch"], m["chunk"]))
    assert got.path is not None and got.path.name == newest["file"], (got.path, newest)
    assert not [r for r in got.rejected if "no manifest" not in r], got.rejected


def assert_same_as_reference(run: Remote, reference: Path, tmp_path: Path) -> None:
    """The run on the store ended with the bits and history of the uninterrupted local run."""
    local = tmp_path / "from-store"
    local.mkdir(exist_ok=True)
    (local / "model_state_dict.pt").write_bytes(run.get("model_state_dict.pt"))
    assert_same_tensors(state_dict(local / "model_state_dict.pt"), state_dict(reference / "model_state_dict.pt"))
    assert run.get("history.csv") == (reference / "history.csv").read_bytes()
    metrics, ref_metrics = json.loads(run.get("metrics.json")), json.loads((reference / "metrics.json").read_text())
    assert metrics.pop("checkpoint").startswith(ref_metrics.pop("checkpoint")[:-3] + ".")  # a store's has a token
    assert metrics == ref_metrics


def lease_pid(run: Remote) -> int | None:
    """The pid in the run's lease (None while there is none)."""
    try:
        return json.loads(run.get(LEASE_KEY))["pid"]
    except FileNotFoundError:
        return None


def task_runs(flow_run_id: str, name: str) -> list:
    """The Prefect task runs called ``name`` of a flow run, from the session's server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))


# --- the store goes away in the middle of a run -------------------------------------------------

#: A ceiling on how long the command takes to give up once the store refuses every connection
#: (it must give up, not hang; generous for a busy machine).
GIVE_UP_WITHIN = 600


@pytest.mark.slow
def test_s3_server_unreachable_mid_run_fails_clearly_commits_nothing_by_half_and_the_rerun_resumes(
        prefect_api: str, s3_server, tmp_path: Path, proxies: list[Proxy]) -> None:
    """The store becomes unreachable while chunk 3's checkpoint is being uploaded (the proxy cuts
    that request and refuses every connection from then on). The command retries the chunk as
    Prefect tasks do, then ends within a bounded time with a one-line error naming the endpoint
    it cannot reach; the commits made before stay whole and nothing is committed by half. Once
    the store is back, the same command on another machine resumes to the bits of an
    uninterrupted local run."""
    reference = train_cli(SMALL, prefect_api, tmp_path / "local", "ref")
    root = f"{s3_server.bucket()}/arts"
    run = Remote(f"{root}/nonlinear/r")
    chunk3 = re.compile(r"/nonlinear/r/checkpoints/checkpoint-3\.[0-9a-f]{12}\.pt(\?|$)")
    proxy = Proxy(s3_server.endpoint, lambda method, path: "cut" if method == "PUT" and chunk3.search(path) else None)
    proxies.append(proxy.start())
    args = [sys.executable, str(TRAIN), *SMALL, "--artifacts-dir", root, "--run-name", "r"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**machine(tmp_path, "a", prefect_api), "AWS_ENDPOINT_URL": proxy.url},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: proxy.cut is not None, what="chunk 3's checkpoint upload", proc=proc)
    try:
        out, err = proc.communicate(timeout=GIVE_UP_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {GIVE_UP_WITHIN} s after the store went away:\n{err[-5000:]}")
    gave_up_in = time.monotonic() - proxy.cut[0]
    print(f"gave up {gave_up_in:.1f} s after the store went away; exit {proc.returncode}; stderr tail:\n{err[-3000:]}")
    assert proc.returncode == 1, (proc.returncode, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Could not connect to the endpoint URL" in last and proxy.url in last, last
    assert last.endswith("rerun the same command to resume"), last
    assert "nonlinear: completed" not in out

    # Chunk 3 was retried as a Prefect task (retries=2) and failed each time.
    assert "Task run 'train_chunk-3' - Task run failed with exception: EndpointConnectionError" in err
    assert "Retries are exhausted" in err
    flow_run_id = json.loads(run.get("run.json"))["flow_runs"][0]["flow_run_id"]
    (chunk3_run,) = task_runs(flow_run_id, "train_chunk-3")
    assert chunk3_run.run_count == 3 and chunk3_run.state.is_failed(), (chunk3_run.run_count, chunk3_run.state)

    # Nothing committed by half: chunks 1 and 2 are whole, chunk 3 left nothing (its upload was cut).
    before = committed(run)
    assert sorted(m["chunk"] for m in before.values()) == [1, 2], sorted(run.keys("checkpoints"))
    assert not [k for k in run.keys("checkpoints") if "checkpoint-3." in k]
    assert_newest_commit_loads(run, before)
    etags = {k: run.etag(k) for k in run.keys("checkpoints")}
    assert lease_pid(run) == proc.pid  # not released (the store was gone): the dead process's

    # The store is back: the same command on another machine takes the dead holder's lease over
    # at once and resumes from chunk 2's commit.
    proxy.on_request = lambda method, path: None
    proxy.start()
    t0 = time.monotonic()
    again = subprocess.run(args, cwd=ROOT, env={**machine(tmp_path, "b", prefect_api), "AWS_ENDPOINT_URL": proxy.url},
                           capture_output=True, text=True, timeout=600, check=False)
    print(f"rerun took {time.monotonic() - t0:.1f} s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: run.etag(k) for k in etags} == etags, "commits made before the outage were rewritten"
    after = committed(run)
    assert sorted(m["chunk"] for m in after.values()) == [1, 2, 3, 4, 5, 6]
    assert_newest_commit_loads(run, after)
    assert_same_as_reference(run, reference, tmp_path)
    record = json.loads(run.get("run.json"))
    assert record["status"] == "completed" and record["attempts"] == 2
    chunk2 = next(m["file"] for m in before.values() if m["chunk"] == 2)
    assert [r["from_checkpoint"] for r in record["resumes"]] == [chunk2], record["resumes"]
    assert LEASE_KEY not in run.keys(), "the finished command released its lease"  # noqa: SIM118 - a store listing


# --- a soak of SIGKILLs, each rerun on another machine --------------------------------------------

#: 12 chunks of 250 epochs (about 1 s each): more chunks than the kills can get through.
SOAK = ["--job", "nonlinear", "--epochs", "3000", "--chunk-epochs", "250", "--seed", "3"]
#: The store answers a checkpoint's bytes upload this much later: a window to kill in, between
#: the bytes being stored and their manifest being sent (a slow store; the proxy holds the answer).
SLOW_ANSWER = 0.5
#: Where the kills are aimed, in turn: a random moment after the attempt's first new commit (so
#: the next machine resumes from a commit), inside an upload (bytes on the store, no manifest
#: yet), a random moment once the attempt began (training, a commit, a push, between chunks).
PHASES = ("after-commit", "in-upload", "random")


def newest_commit(ckpts: Remote) -> int:
    """The highest chunk with a manifest (a cheap look: one listing, nothing downloaded)."""
    return max((chunk_of(k) for k in ckpts.keys() if k.endswith(".json")), default=0)  # noqa: SIM118 - a store listing


def attempts_begun(run: Remote) -> int:
    """How many attempts run.json on the store records (an attempt records itself as it begins)."""
    try:
        return len(json.loads(run.get("run.json"))["flow_runs"])
    except FileNotFoundError:
        return 0


def uploading(ckpts: Remote, keys_before: set[str]) -> list[str]:
    """This attempt's first upload while it has bytes on the store and no manifest yet."""
    keys = set(ckpts.keys())
    new = [k for k in keys - keys_before if k.endswith(".pt")]
    return [k for k in new if k[:-3] + ".json" not in keys]


def kill_in(phase: str, args: list[str], env: dict[str, str], run: Remote, rng: random.Random) -> list[str]:
    """Start the command, SIGKILL it in ``phase``; returns the uploads it cut (bytes stored, never committed)."""
    ckpts = run.child("checkpoints")
    keys_before, begun, first = set(ckpts.keys()), attempts_begun(run), newest_commit(ckpts)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    aimed: list[str] = []
    if phase == "after-commit":
        wait_until(lambda: newest_commit(ckpts) > first, what="a new commit", proc=proc)
        time.sleep(rng.uniform(0.0, 2.0))
    elif phase == "in-upload":
        aimed = wait_until(lambda: uploading(ckpts, keys_before), what="a checkpoint upload", proc=proc, every=0.05)
    else:
        wait_until(lambda: attempts_begun(run) > begun, what="the attempt to begin", proc=proc, every=0.1)
        time.sleep(rng.uniform(0.0, 3.0))
    assert proc.poll() is None, f"finished before the kill ({phase}): {proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    keys = set(ckpts.keys())
    return [k for k in aimed if k in keys and k[:-3] + ".json" not in keys]


@pytest.mark.slow
def test_soak_random_sigkills_on_s3_end_bit_exact(prefect_api: str, s3_server, tmp_path: Path,
                                                   proxies: list[Proxy]) -> None:
    """SIGKILLs after a commit, inside a checkpoint upload (its bytes on the store, its manifest
    not yet sent) and at a random moment; each time the same command is rerun on a fresh machine
    (an empty cache). Every commit stays whole and is never rewritten, the interrupted upload is
    never committed, and the end is bit-identical to an uninterrupted local run."""
    reference = train_cli(SOAK, prefect_api, tmp_path / "local", "ref")
    rng = random.Random(11)
    root = f"{s3_server.bucket()}/arts"
    run = Remote(f"{root}/nonlinear/soak")
    ckpts = run.child("checkpoints")
    upload = re.compile(r"/nonlinear/soak/checkpoints/checkpoint-\d+\.[0-9a-f]{12}\.pt(\?|$)")
    proxy = Proxy(s3_server.endpoint, lambda method, path: SLOW_ANSWER if method == "PUT" and upload.search(path) else None)
    proxies.append(proxy.start())
    args = [sys.executable, str(TRAIN), *SOAK, "--artifacts-dir", root, "--run-name", "soak"]

    def on_machine(name: str) -> dict[str, str]:
        return {**machine(tmp_path, name, prefect_api), "AWS_ENDPOINT_URL": proxy.url}

    cut, progress, etags = [], [], {}
    for n, phase in enumerate(PHASES):
        cut += kill_in(phase, args, on_machine(f"machine-{n}"), run, rng)
        manifests = committed(run)  # whole after every kill
        progress.append(max((m["chunk"] for m in manifests.values()), default=0))
        etags |= {k: ckpts.etag(k) for k in manifests}
    final = subprocess.run(args, cwd=ROOT, env=on_machine("final"), capture_output=True, text=True, timeout=600,
                           check=False)
    assert final.returncode == 0, final.stderr[-3000:]
    assert len(cut) == 1 and 1 <= progress[-1] < 12 and progress == sorted(progress), (cut, progress)
    manifests = committed(run)
    assert sorted(m["chunk"] for m in manifests.values()) == list(range(1, 13)), sorted(manifests)
    assert {k: ckpts.etag(k) for k in etags} == etags, "commits made before a kill were rewritten"
    assert_newest_commit_loads(run, manifests)
    assert not {k[:-3] + ".json" for k in cut} & set(ckpts.keys()), "an interrupted upload was committed later"
    assert_same_as_reference(run, reference, tmp_path)
    record = json.loads(run.get("run.json"))
    assert record["status"] == "completed" and record["attempts"] == len(PHASES) + 1, record["attempts"]
    assert record["resumes"] and record["resumes"][-1]["from_checkpoint"].startswith("checkpoint-")
