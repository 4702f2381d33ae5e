"""The resume rules, proven by equality with an uninterrupted run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.train_flow import main, train_flow
from tasks.kernel import auto_threads
from tests.helpers import ROOT, TRAIN, assert_same_run, cli_env, run_cli, train_cli, wait_until


# Small but real: 200 rows, 3 chunks.
SMALL = ["--job", "nonlinear", "--epochs", "1500", "--chunk-epochs", "500", "--seed", "7"]


@pytest.fixture(scope="module")
def reference(prefect_api: str, tmp_path_factory) -> Path:
    """An uninterrupted run of SMALL (a real process, like every interrupted run below)."""
    return train_cli(SMALL, prefect_api, tmp_path_factory.mktemp("reference"), "ref")


def test_without_a_server_the_command_boots_its_own_which_dies_with_it(reference: Path, tmp_path: Path) -> None:
    """No PREFECT_API_URL (a new user's machine): the command starts Prefect's temporary server
    itself; SIGKILL of the command takes the server down too (no orphan), and rerunning the
    command (with a new server) resumes bit-exact. Both runs are recorded in $PREFECT_HOME.
    And --threads auto (the default) is resolved when the run folder is created
    ($OMP_NUM_THREADS stands in for a first machine with other cores): the rerun on this machine
    resumes with the stored count, to the same result."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in cli_env("").items() if k not in ("PREFECT_API_URL", "OMP_NUM_THREADS")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="INFO")
    there = auto_threads(1) + 2  # what auto gives on "the first machine": not what it gives here
    args = [sys.executable, str(TRAIN), *SMALL, "--artifacts-dir", str(tmp_path), "--run-name", "r"]
    ckpts = tmp_path / "nonlinear" / "r" / "checkpoints"
    proc = subprocess.Popen(args, cwd=ROOT, env={**env, "OMP_NUM_THREADS": str(there)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_until((ckpts / "checkpoint-1.json").exists, what="checkpoint 1", proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_output = proc.stderr.read()
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", first_output).group(1))
    assert "chunk 1/3: training epochs 1-500" in first_output
    assert "resuming" not in first_output  # a new run's first attempt resumes nothing

    def server_gone() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    wait_until(server_gone, what="its temporary server to stop")
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Stopping temporary server" in again.stderr
    assert "chunk 2: resuming from checkpoint-1.pt, 500 of 1500 epochs kept" in again.stderr
    assert_same_run(tmp_path / "nonlinear" / "r", reference)
    record = json.loads((ckpts.parent / "run.json").read_text())
    assert json.loads((ckpts.parent / "config.json").read_text())["threads"] == there
    assert record["attempts"] == 2 and record["environment"]["device"]["threads"] == there
    with sqlite3.connect(home / "prefect.db") as db:
        states = sorted(row[0] for row in db.execute("SELECT state_type FROM flow_run"))
        tasks = {row[0] for row in db.execute("SELECT name FROM task_run WHERE state_type = 'COMPLETED'")}
    assert states == ["COMPLETED", "RUNNING"]  # the killed run stays Running, as on any server
    assert {"train_chunk-1", "train_chunk-2"} <= tasks  # the UI shows the task runs, too
    # Bad input on this path is still one line (the server started early goes quietly).
    bad = subprocess.run([*args, "--epochs", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: invalid --epochs: Input should be greater than 0 (got 0)"]


def test_completed_run_is_not_retrained(reference: Path, prefect_api: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "nonlinear" / "ref"
    shutil.copytree(reference, run_dir)  # a completed run
    args = [*SMALL, "--artifacts-dir", str(tmp_path), "--run-name", "ref"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == stamps
    again = run_cli(args, prefect_api, PREFECT_LOGGING_LEVEL="INFO")  # as a user reruns it: it exits quietly
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]
    assert "Still processing items" not in again.stderr + again.stdout, again.stderr[-2000:]

    # --fresh starts over but keeps the old run's files, moved aside.
    assert main([*args, "--fresh"]) == 0
    archived = [p for p in (tmp_path / "nonlinear").iterdir() if p.name.startswith("ref.archived-")]
    assert len(archived) == 1 and (archived[0] / "checkpoints" / "checkpoint-3.pt").exists()
    assert_same_run(run_dir, reference)


def test_same_run_name_with_other_config_is_refused(prefect_api: str, tmp_path: Path, capsys) -> None:
    base = ["--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10", "--artifacts-dir", str(tmp_path), "--run-name", "r"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--lr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "different config (lr 0.0001 -> 0.001)" in err and err.strip().count("\n") == 0


def test_other_data_without_run_name_starts_a_separate_run(prefect_api: str, tmp_path: Path) -> None:
    csv = tmp_path / "other.csv"
    csv.write_text((ROOT / "data" / "non_linear.csv").read_text().replace("327.83", "327.84"))
    for data in (None, str(csv)):
        train_flow(job="nonlinear", epochs=20, chunk_epochs=10, data=data, artifacts_dir=str(tmp_path / "a"))
    runs = sorted(p.name for p in (tmp_path / "a" / "nonlinear").glob("run-*"))
    assert len(runs) == 2, runs


def test_checkpoints_keep_the_tutorial_format(reference: Path) -> None:
    """The tutorial's own resume code works on our checkpoints unchanged."""
    from tasks.jobs.nonlinear import CustomModel

    checkpoint = torch.load(reference / "checkpoints" / "checkpoint-2.pt")  # torch's default: weights_only
    model = CustomModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0001)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    assert checkpoint["epoch"] == 999  # last completed 0-based epoch: chunk 2 of 500 epochs
    assert checkpoint["model"] == "CustomModel" and "체크포인트-2" in checkpoint["description"]
    assert isinstance(checkpoint["cost"], float)


def test_threads_auto_uses_the_cores_but_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, procs, threads in [(16, 1, 15), (16, 2, 7), (16, 16, 1), (2, 1, 1), (1, 1, 1)]:
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert auto_threads(procs) == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert auto_threads(2) == 4  # per process, as OpenMP and torchrun read it
