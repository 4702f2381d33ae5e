"""What a hostile user's fault trial found: the record tells what was done, nothing stalls in
silence, a dead API or a full or read-only disk gets the right advice, debris goes away."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

import tasks.storage.checkpoint as ck
from flows.train_flow import main, train_flow
from tasks.kernel import read_json
from tasks.orchestration.server import reserve_port
from tests.helpers import (
    FP,
    ROOT,
    TRAIN,
    Command,
    assert_same_run,
    checkpoint_payload,
    cli_env,
    fail_at,
    flip_a_bit,
    run_cli,
    start,
    stopped_run,
    wait_until,
)


# 6 chunks of 250 epochs.
CFG = dict(job="nonlinear", epochs=1500, chunk_epochs=250, seed=3)
ARGS = ["--job", "nonlinear", "--epochs", "1500", "--chunk-epochs", "250", "--seed", "3"]


@pytest.fixture(scope="module")
def reference(prefect_api: str, tmp_path_factory) -> Path:
    """The uninterrupted run that every faulted one must reproduce."""
    return Path(train_flow(**CFG, artifacts_dir=str(tmp_path_factory.mktemp("trial-ref")), run_name="ref")
                ["nonlinear"]["run_dir"])


def test_record_names_the_checkpoint_actually_used_and_a_start_from_scratch(reference: Path, prefect_api: str,
                                                                           tmp_path: Path, monkeypatch) -> None:
    """Attempt 2: the newest checkpoint is damaged, so it resumes from the one before, and says
    so. Attempt 3: every checkpoint is damaged, so it starts over, and says that."""
    from tasks.kernel import UserError

    run_dir = tmp_path / "nonlinear" / "r"
    ckpts = run_dir / "checkpoints"
    for attempt, epoch in ((1, 600), (2, 1100)):  # 2 checkpoints, then 4 (chunks of 250 epochs)
        monkeypatch.undo()
        fail_at(monkeypatch, epoch)
        if attempt == 2:
            flip_a_bit(ckpts / "checkpoint-2.pt")
        with pytest.raises(UserError):
            train_flow(**CFG, artifacts_dir=str(tmp_path), run_name="r")
    for _, path in ck.list_checkpoints(ckpts):
        flip_a_bit(path)
    monkeypatch.undo()
    train_flow(**CFG, artifacts_dir=str(tmp_path), run_name="r")
    record = read_json(run_dir / "run.json")
    second, third = record["resumes"]
    assert (second["attempt"], second["from_checkpoint"], second["epochs_saved"]) == (2, "checkpoint-1.pt", 250)
    assert [s.split(":")[0] for s in second["skipped_checkpoints"]] == ["checkpoint-2.pt"]
    assert (third["attempt"], third["from_checkpoint"], third["epochs_saved"]) == (3, None, 0)
    assert len(third["skipped_checkpoints"]) == 4  # checkpoints 4, 3, 2 (rewritten) and 1
    summary = (run_dir / "summary.md").read_text()
    assert "attempt 2 from `checkpoint-1.pt` (250 of 1500 epochs kept, 1 skipped: checkpoint-2.pt: sha256" in summary
    assert "attempt 3 started over from epoch 1 (no valid checkpoint, 4 skipped" in summary
    # Chunks say "resumed" only where an attempt began, never for a chunk after its own predecessor.
    # Attempt 3 trained every chunk again, from scratch and then each from its predecessor.
    assert not [k for k, row in record["chunks"].items() if "resumed_from" in row]
    assert_same_run(run_dir, reference)


def test_full_disk_is_recorded_as_failed_with_what_to_fix_and_not_retried(prefect_api: str, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    """A disk that fills up as the run writes its outputs: run.json says `failed` with the error,
    Prefect does not retry the same failure, and the command says to free space first."""
    import tasks.engine.export

    calls: list[Path] = []

    def full(path, obj):
        calls.append(Path(path))
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tasks.engine.export, "atomic_torch_save", full)
    code = main([*ARGS, "--epochs", "500", "--artifacts-dir", str(tmp_path), "--run-name", "f"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and len(calls) == 1, err  # the task's retries were not spent on it
    assert err.startswith("error: OSError: [Errno 28] No space left on device") and \
        "the disk is full" in err and "fix that first, then rerun the same command to resume" in err, err
    record = read_json(tmp_path / "nonlinear" / "f" / "run.json")
    assert record["status"] == "failed" and "No space left on device" in record["error"]


def test_huge_epoch_counts_start_at_once_and_report_progress_within_the_chunk(prefect_api: str, tmp_path: Path) -> None:
    """10^12 epochs in one chunk: no list of chunk boundaries is built, the run trains at once,
    and a log line of progress comes every few seconds (not a terminal: no live line); SIGTERM still saves the epoch reached."""
    run = Command.train(["--job", "nonlinear", "--epochs", str(10**12), "--chunk-epochs", str(10**12),
                         "--artifacts-dir", str(tmp_path), "--run-name", "huge"],
                        cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO"))
    wait_until(lambda: sum(f"/{10**12}: ETA" in line for line in run.lines) >= 2, what="two progress lines", proc=run)
    assert not any("\r" in line or "\x1b[" in line for line in run.lines)  # no live line into a pipe
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.output[-2000:]
    saved = json.loads((tmp_path / "nonlinear" / "huge" / "checkpoints" / "checkpoint-1.json").read_text())
    assert saved["epoch"] > 0


@contextlib.contextmanager
def own_server(tmp_path: Path):
    """A Prefect server of this test's own, which the test can kill; yields its API URL."""
    with reserve_port() as sock:
        port = sock.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port), "--no-ui", "--no-services"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: _answers(url), what="the Prefect server", proc=server, every=0.5)
        yield url, server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/health", timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_dead_prefect_server_does_not_slow_training(reference: Path, tmp_path: Path) -> None:
    """The server dies after chunk 1: the remaining chunks train at full speed (before, each one
    waited about a minute on the progress artifact), the command says once that the UI can't be
    reached, exits 0 without minutes of Prefect's event delivery, and the result is exact."""
    args = [*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "dead"]
    ckpts = tmp_path / "nonlinear" / "dead" / "checkpoints"
    with own_server(tmp_path) as (url, server):
        proc = start(args, url, PREFECT_LOGGING_LEVEL="INFO")
        wait_until((ckpts / "checkpoint-1.json").exists, what="checkpoint 1", proc=proc)
        os.killpg(server.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("the Prefect UI won't show the rest of this run") <= 1
    assert "the Prefect API stopped answering during the run" in err  # the exit skips Prefect's event delivery
    assert out.startswith("nonlinear: completed: test loss "), out
    # No chunk waits on the dead API (each once waited about a minute on the progress artifact):
    # from one chunk's end to the next there is the chunk's training and a local report only.
    chunks = read_json(tmp_path / "nonlinear" / "dead" / "run.json")["chunks"]
    for k in range(3, 7):
        waited = finished(chunks[str(k)]) - finished(chunks[str(k - 1)]) - chunks[str(k)]["seconds"]
        assert waited < 30, (k, chunks)
    assert_same_run(tmp_path / "nonlinear" / "dead", reference)


def finished(row: dict) -> float:
    """A chunk row's end, in seconds since the epoch."""
    return datetime.strptime(row["finished_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def test_debris_of_killed_writes_is_removed_by_the_next_holder(prefect_api: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "nonlinear" / "d"
    debris = [run_dir / "checkpoints" / ".checkpoint-2.pt.0123456789ab.tmp", run_dir / ".metrics.json.abcdef012345.tmp"]
    kept = [run_dir / ".keep-me.tmp", run_dir / "checkpoints" / "notes.tmp"]  # not ours: never touched
    for path in debris + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    train_flow(**{**CFG, "epochs": 500}, artifacts_dir=str(tmp_path), run_name="d")
    assert not any(p.exists() for p in debris) and all(p.exists() for p in kept)


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` refuses new files, even to root (the immutable attribute where chmod is not enough)."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if os.geteuid() == 0 and not immutable:
            pytest.skip("root without chattr: cannot make a folder read-only")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_checkpoints_folder_is_refused_before_training(prefect_api: str, tmp_path: Path,
                                                                 monkeypatch) -> None:
    args = [*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "ro"]
    run_dir = tmp_path / "nonlinear" / "ro"
    stopped_run(monkeypatch, 300, **CFG, artifacts_dir=str(tmp_path), run_name="ro")  # in chunk 2
    history = (run_dir / "history.csv").read_bytes()
    with read_only(run_dir / "checkpoints"):
        refused = run_cli(args, prefect_api)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().count("\n") == 0 and "checkpoints folder" in refused.stderr and \
        "is not writable" in refused.stderr and "make it writable" in refused.stderr, refused.stderr
    assert (run_dir / "history.csv").read_bytes() == history  # nothing was trained


def test_a_damaged_checkpoint_in_a_read_only_folder_is_skipped_and_reported_once(tmp_path: Path) -> None:
    for chunk in (1, 2):
        ck.save_checkpoint(tmp_path, checkpoint_payload(chunk))
    flip_a_bit(tmp_path / "checkpoint-2.pt")
    warnings: list[str] = []
    with read_only(tmp_path):
        found = ck.latest_valid(tmp_path, FP, warn=lambda m, *a: warnings.append(m % a))
    assert found.path.name == "checkpoint-1.pt"
    assert len(warnings) == 1 and "left in place" in warnings[0]


def test_a_checkpoint_without_manifest_is_reported_once_per_run(reference: Path, prefect_api: str, tmp_path: Path,
                                                                monkeypatch) -> None:
    """A kill between a checkpoint's bytes and its manifest leaves checkpoint-5.pt alone; the rerun
    says so once, not once per chunk, and still ends exact."""
    args = [*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "m"]
    ckpts = stopped_run(monkeypatch, 600, **CFG, artifacts_dir=str(tmp_path), run_name="m") / "checkpoints"
    assert sorted(k for k, _ in ck.list_checkpoints(ckpts)) == [1, 2]
    (ckpts / "checkpoint-5.pt").write_bytes(b"the bytes of a write whose manifest never came")
    again = run_cli(args, prefect_api)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("checkpoint-5.pt: no manifest") == 1, again.stderr[-3000:]
    assert_same_run(tmp_path / "nonlinear" / "m", reference)


def test_bad_input_prints_one_line_even_when_the_machine_is_busy(tmp_path: Path) -> None:
    """Three refused commands at once on two cores, each with its own temporary server starting:
    each prints its one line and nothing else (no server output, no traceback)."""
    cases = [["--lr", "inf"], ["--data", str(tmp_path / "missing.csv")], ["--job", "nope"]]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    procs = [subprocess.Popen([sys.executable, str(TRAIN), *c, "--artifacts-dir", str(tmp_path / "a")], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cases]
    for case, proc in zip(cases, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and out == "", (case, out, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (case, err)
    assert not (tmp_path / "a").exists()
