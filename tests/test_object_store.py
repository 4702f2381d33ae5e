"""Runs on object storage (issue 19), against a real S3 server (moto) that the session starts:
one checkpoint suite for both protocols, the lease, a run killed and resumed on "another
machine" (an empty local cache), and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tasks.storage.checkpoint import LocalCheckpoints
from tasks.storage.remote import LEASE_KEY, Lease, Remote
from tasks.storage.store import ObjectCheckpoints
from tests.helpers import (
    FP,
    ROOT,
    TRAIN,
    assert_same_tensors,
    machine,
    start_moto,
    state_dict,
    train_cli,
    wait_until,
)
from tests.helpers import checkpoint_payload as payload


class Raw:
    """Bytes access to a checkpoint store, around its protocol (to damage it as a crash would)."""

    def __init__(self, kind: str, tmp_path: Path, s3_server):
        if kind == "local":
            self.folder = tmp_path / "checkpoints"
            self.store = LocalCheckpoints(self.folder)
        else:
            self.remote = Remote(f"{s3_server.bucket()}/run/checkpoints")
            self.store = ObjectCheckpoints(self.remote)
        self.kind = kind

    def get(self, key: str) -> bytes:
        return (self.folder / key).read_bytes() if self.kind == "local" else self.remote.get(key)

    def put(self, key: str, data: bytes) -> None:
        (self.folder / key).write_bytes(data) if self.kind == "local" else self.remote.put(key, data)

    def delete(self, key: str) -> None:
        (self.folder / key).unlink() if self.kind == "local" else self.remote.delete(key)


@pytest.fixture(params=["local", "s3"])
def raw(request, tmp_path: Path, s3_server) -> Raw:
    # s3_server is an argument, not getfixturevalue(): set up before the test, the stray-process
    # cleanup (conftest) counts its server as the session's, not as the test's.
    return Raw(request.param, tmp_path, s3_server)


def truncate(raw: Raw, name: str) -> None:
    raw.put(name, raw.get(name)[:100])


def bitflip(raw: Raw, name: str) -> None:
    data = bytearray(raw.get(name))
    data[len(data) // 2] ^= 0x01
    raw.put(name, bytes(data))


def no_manifest(raw: Raw, name: str) -> None:  # a save killed between its bytes and its commit
    raw.delete(name[:-3] + ".json")


def foreign_manifest(raw: Raw, name: str) -> None:  # another run's manifest in its place
    manifest = json.loads(raw.get(name[:-3] + ".json"))
    raw.put(name[:-3] + ".json", json.dumps({**manifest, "fingerprint": "0" * 64}).encode())


def older_under_a_newer_name(raw: Raw, name: str) -> None:  # checkpoint 1 committed again as the newest
    oldest = raw.store.manifests()[0]
    data = raw.get(oldest.file)
    raw.put(name, data)
    forged = oldest.model_copy(update={"file": name, "chunk": 3, "epoch": 29, "sha256": hashlib.sha256(data).hexdigest(),
                                       "bytes": len(data)})
    raw.put(name[:-3] + ".json", forged.json_bytes())


def bytes_missing(raw: Raw, name: str) -> None:  # the manifest stays, its bytes are gone
    raw.delete(name)


@pytest.mark.parametrize("damage", [truncate, bitflip, no_manifest, foreign_manifest, older_under_a_newer_name,
                                    bytes_missing])
def test_both_protocols_resume_from_the_newest_valid_commit(raw: Raw, damage) -> None:
    names = [raw.store.save(payload(k)).name for k in (1, 2, 3)]
    got = raw.store.latest_valid(FP)
    assert got.path.name == names[2] and got.rejected == () and got.payload["chunk"] == 3
    damage(raw, names[2])
    warned: list[str] = []
    got = raw.store.latest_valid(FP, warn=lambda msg, *a: warned.append(msg % a))
    assert got.path.name == names[1] and torch.equal(got.payload["model_state_dict"]["w"], torch.full((2,), 2.0))
    assert len(got.rejected) == 1 and names[2] in got.rejected[0] and warned


def test_both_protocols_keep_the_newest_and_the_best(raw: Raw) -> None:
    for k in (1, 2, 3, 4):
        raw.store.save(payload(k))
    values = [float(v) for v in range(40)]
    values[19] = -1.0  # chunk 2's epoch is the best (lowest)
    raw.store.prune(1, values, higher_is_better=False)
    assert [m.chunk for m in raw.store.manifests()] == [2, 4]


def test_clean_up_never_deletes_what_it_cannot_vouch_for_and_clears_interrupted_saves(s3_server) -> None:
    """On a store: the newest manifest unreadable (a cut upload), so its bytes and it go to
    quarantine/, never deleted; a save of the last chunk whose manifest never came is deleted
    once that chunk is committed."""
    remote = Remote(f"{s3_server.bucket()}/c/checkpoints")
    store = ObjectCheckpoints(remote)
    names = [store.save(payload(k)).name for k in (1, 2, 3)]
    kept = remote.get(names[2])
    remote.put(names[2][:-3] + ".json", b'{"file": "chec')  # truncated
    remote.put("checkpoint-4.0123456789ab.pt", b"cut by a kill")  # no manifest ever came
    store.save(payload(4))
    store.prune(None, [], higher_is_better=False)
    assert remote.get(f"quarantine/{names[2]}") == kept and remote.keys("quarantine") == sorted(
        [f"quarantine/{names[2]}", f"quarantine/{names[2][:-3]}.json"])
    assert "checkpoint-4.0123456789ab.pt" not in remote.keys()
    assert [m.chunk for m in store.manifests()] == [1, 2, 4]


def test_each_manifest_is_read_once_until_its_bytes_change(s3_server) -> None:
    remote = Remote(f"{s3_server.bucket()}/once/checkpoints")
    store = ObjectCheckpoints(remote)
    names = [store.save(payload(k)).name for k in (1, 2, 3)]
    got: list[str] = []
    read = remote.get
    remote.get = lambda key: got.append(key) or read(key)  # type: ignore[method-assign]
    store.manifests()
    assert got == [n[:-3] + ".json" for n in names]
    got.clear()
    assert [m.chunk for m in store.manifests()] == [1, 2, 3] and got == []  # the store keeps what it read
    remote.put(names[0][:-3] + ".json", read(names[0][:-3] + ".json").replace(b'"chunk": 1', b'"chunk": 7'))
    assert [m.chunk for m in store.manifests()] == [7, 2, 3] and got == [names[0][:-3] + ".json"]


def test_a_store_never_overwrites_a_save(s3_server) -> None:
    """A SIGTERM's mid-chunk save and the chunk's end save are two keys; the newer epoch wins;
    create-only writes refuse to replace a commit."""
    store = ObjectCheckpoints(Remote(f"{s3_server.bucket()}/run/checkpoints"))
    first = store.save(payload(2, epoch=13)).name
    second = store.save(payload(2, epoch=19)).name
    assert first != second and {m.file for m in store.manifests()} == {first, second}
    assert store.latest_valid(FP).payload["epoch"] == 19
    assert not store.remote.put_new(first[:-3] + ".json", b"{}")
    assert json.loads(store.remote.get(first[:-3] + ".json"))["epoch"] == 13


# --- the lease --------------------------------------------------------------------------------


def test_of_sixteen_racing_claimants_exactly_one_holds_the_run(s3_server) -> None:
    remote = Remote(f"{s3_server.bucket()}/run")
    won: list[Lease] = []
    barrier = threading.Barrier(16)

    def claim() -> None:
        lease = Lease(remote)
        barrier.wait()
        if lease.try_acquire() is None:
            won.append(lease)

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert json.loads(remote.get(LEASE_KEY))["token"] == won[0].token


def test_a_dead_holders_lease_expires_and_one_claimant_takes_it_over(s3_server) -> None:
    remote = Remote(f"{s3_server.bucket()}/run")
    dead = Lease(remote, ttl=600)
    assert dead.try_acquire() is None  # then it "dies" on another machine: nothing renews it
    assert Lease(remote).try_acquire() is not None, "a live lease blocks"
    held = json.loads(remote.get(LEASE_KEY))
    remote.put(LEASE_KEY, json.dumps({**held, "boot": "another machine", "expires": time.time() - 1}).encode())  # 600 s on
    results = [Lease(remote).try_acquire() for _ in range(4)]
    assert results.count(None) == 1, results
    assert json.loads(remote.get(LEASE_KEY))["token"] != dead.token
    assert not dead.write(IfMatch=dead.tag), "the old holder's renewal must be refused (it lost the run)"


def test_a_holder_whose_lease_was_taken_over_commits_nothing_more(s3_server) -> None:
    """A stalled worker whose lease another took over finds out at its next renewal and refuses
    to commit a checkpoint into the run it no longer owns."""
    from tasks.storage.remote import LeaseLost

    remote = Remote(f"{s3_server.bucket()}/run")
    lease = Lease(remote, ttl=6).acquire()  # renews every 2 s
    store = ObjectCheckpoints(remote.child("checkpoints"), fence=lease.check)
    store.save(payload(1))
    held = json.loads(remote.get(LEASE_KEY))
    remote.put(LEASE_KEY, json.dumps({**held, "token": "another worker"}).encode())  # taken over meanwhile
    wait_until(lambda: lease.lost is not None, what="the renewal to notice", every=0.1)
    with pytest.raises(LeaseLost, match="lost the lease"):
        store.save(payload(2))
    assert [m.chunk for m in store.manifests()] == [1]
    lease.release()
    assert json.loads(remote.get(LEASE_KEY))["token"] == "another worker", "release must not delete another's lease"


# --- whole runs -------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_commands_on_one_run_on_a_store_one_is_refused(prefect_api: str, s3_server, tmp_path: Path) -> None:
    """Two machines, one run: the second command is refused in one line while the first holds it."""
    root = f"{s3_server.bucket()}/arts"
    args = [sys.executable, str(TRAIN), "--job", "nonlinear", "--epochs", "100000", "--chunk-epochs", "100000",
            "--artifacts-dir", root, "--run-name", "r"]
    first = subprocess.Popen(args, cwd=ROOT, env=machine(tmp_path, "a", prefect_api), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    run = Remote(f"{root}/nonlinear/r")
    wait_until(lambda: {LEASE_KEY, "run.json"} <= set(run.keys()), what="the first to hold the run", proc=first,
               every=0.2)
    second = subprocess.run(args, cwd=ROOT, env=machine(tmp_path, "b", prefect_api), capture_output=True, text=True,
                            timeout=600)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "is in use by another process" in lines[0], second.stderr


# --- bad input --------------------------------------------------------------------------------


def one_line_refusal(args: list[str], env: dict[str, str], expected: str) -> None:
    proc = subprocess.run([sys.executable, str(TRAIN), "--job", "nonlinear", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("url,expected", [
    ("ftp://host/x", "unknown URL scheme ftp://"),
    ("gs://bucket/x", "pip install -e '.[gcs]'"),
])
def test_unknown_scheme_or_missing_extra(url: str, expected: str, prefect_api: str, tmp_path: Path) -> None:
    one_line_refusal(["--artifacts-dir", url], machine(tmp_path, "a", prefect_api), expected)


def test_missing_bucket_and_missing_or_refused_credentials(prefect_api: str, s3_server, tmp_path: Path) -> None:
    env = machine(tmp_path, "a", prefect_api)
    one_line_refusal(["--artifacts-dir", "s3://no-such-bucket-here/x"], env, "the bucket does not exist")
    bare = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    bare["AWS_SHARED_CREDENTIALS_FILE"] = bare["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    one_line_refusal(["--artifacts-dir", f"{s3_server.bucket()}/x"], bare, "set credentials the usual way")
    strict, endpoint = start_moto(INITIAL_NO_AUTH_ACTION_COUNT="0")  # an S3 that checks keys: ours are unknown
    try:
        one_line_refusal(["--artifacts-dir", "s3://some-bucket/x"], {**env, "AWS_ENDPOINT_URL": endpoint},
                         "access failed (PermissionError")
    finally:
        strict.kill()
        strict.wait()
    # A store that does not answer is not bad input: exit 1, and rerun once it is back.
    gone = subprocess.run([sys.executable, str(TRAIN), "--job", "nonlinear", "--artifacts-dir", "s3://some-bucket/x"],
                          cwd=ROOT,
                          env={**env, "AWS_ENDPOINT_URL": endpoint}, capture_output=True, text=True, timeout=600)
    err = gone.stderr.strip()
    assert gone.returncode == 1 and err.count("\n") == 0 and "is unreachable" in err and "rerun when it is back" in err, err


def test_a_run_made_with_another_config_is_refused_and_untouched(prefect_api: str, s3_server, tmp_path: Path) -> None:
    root = f"{s3_server.bucket()}/arts"
    env = machine(tmp_path, "a", prefect_api)
    done = subprocess.run([sys.executable, str(TRAIN), "--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10",
                           "--artifacts-dir", root, "--run-name", "r"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = Remote(f"{root}/nonlinear/r")
    before = {k: run.etag(k) for k in run.keys()}
    one_line_refusal(["--epochs", "30", "--chunk-epochs", "10", "--artifacts-dir", root, "--run-name", "r"],
                     machine(tmp_path, "b", prefect_api), "was made with a different config (epochs 20 -> 30)")
    assert {k: run.etag(k) for k in run.keys()} == before


def test_data_from_a_url_trains_the_same_run_as_the_local_file(prefect_api: str, s3_server, tmp_path: Path) -> None:
    """--data s3://... reads the object (fetched once per version into the cache): the same
    bytes give the same data fingerprint, so the same derived run, and the same model."""
    from tasks.jobs.nonlinear import CSV_PATH

    bucket = s3_server.bucket()
    Remote(bucket).put("in/non_linear.csv", CSV_PATH.read_bytes())
    args = ["--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10"]
    local = train_cli(args, prefect_api, tmp_path / "local", "x").parent
    remote = subprocess.run([sys.executable, str(TRAIN), *args, "--data", f"{bucket}/in/non_linear.csv",
                             "--artifacts-dir", str(tmp_path / "remote")], cwd=ROOT,
                            env=machine(tmp_path, "a", prefect_api), capture_output=True, text=True, timeout=600)
    assert remote.returncode == 0, remote.stderr[-2000:]
    (derived,) = (tmp_path / "remote" / "nonlinear").glob("run-*")
    again = subprocess.run([sys.executable, str(TRAIN), *args, "--artifacts-dir", str(tmp_path / "remote")], cwd=ROOT,
                           env=machine(tmp_path, "b", prefect_api), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr, again.stderr[-2000:]
    assert_same_tensors(state_dict(derived / "model_state_dict.pt"), state_dict(local / "x" / "model_state_dict.pt"))
    one_line_refusal(["--data", f"{bucket}/in/missing.csv"], machine(tmp_path, "c", prefect_api), "does not exist")


def test_fresh_on_a_store_moves_the_old_run_aside_and_predictions_read_the_new_one(prefect_api: str, s3_server, tmp_path: Path) -> None:
    root = f"{s3_server.bucket()}/arts"
    args = [sys.executable, str(TRAIN), "--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10",
            "--artifacts-dir", root, "--run-name", "r"]
    first = subprocess.run(args, cwd=ROOT, env=machine(tmp_path, "a", prefect_api), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert not list((tmp_path / "a" / "runs").glob("*/*")), "a completed run keeps no staging copy"
    run = Remote(f"{root}/nonlinear/r")
    old = {k: run.get(k) for k in run.keys() if k != LEASE_KEY}
    again = subprocess.run([*args, "--fresh"], cwd=ROOT, env=machine(tmp_path, "b", prefect_api), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    (archived,) = [p for p in Remote(f"{root}/nonlinear").fs.ls(Remote(f"{root}/nonlinear").root) if ".archived-" in p]
    moved = Remote(f"s3://{archived}")
    assert {k: moved.get(k) for k in moved.keys()} == old, "the archive must hold the old run, whole"
    record = json.loads(run.get("run.json"))
    assert record["status"] == "completed" and record["attempts"] == 1
    # Predictions straight from the store, through its `latest` pointer.
    predicted = subprocess.run([sys.executable, str(ROOT / "flows" / "predict_flow.py"), "--run",
                                f"{root}/nonlinear/latest", "--x", "1", "5", "--json"], cwd=ROOT,
                               env=machine(tmp_path, "c", prefect_api), capture_output=True, text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    from tasks.jobs.registry import JOBS

    model = JOBS["nonlinear"].build_model(JOBS["nonlinear"].config())
    (tmp_path / "w.pt").write_bytes(run.get("model_state_dict.pt"))
    model.load_state_dict(state_dict(tmp_path / "w.pt"))
    expected = model(torch.tensor([[1.0, 1.0], [25.0, 5.0]])).detach().flatten().tolist()
    assert [row["output"][0] for row in json.loads(predicted.stdout)] == expected
