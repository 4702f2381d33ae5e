"""Fault injection: every fault below is survived, and the outcome is asserted."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tasks.storage.checkpoint as ck
from flows.train_flow import train_flow
from tasks.engine.training import DivergedError
from tasks.kernel import read_json
from tasks.reporting import verify_hashes
from tasks.storage.store import OWNER_FILE
from tests.helpers import (
    ROOT,
    Command,
    assert_same_run,
    assert_tensorboard_matches_history,
    cli_env,
    fail_once_at,
    flip_a_bit,
    own_server_env,
    run_cli,
    start,
    stopped_run,
    train_cli,
    wait_until,
)


# 6 chunks of 250 epochs: short, but long enough to be interrupted.
CFG = dict(job="nonlinear", epochs=1500, chunk_epochs=250, seed=3)
ARGS = ["--job", "nonlinear", "--epochs", "1500", "--chunk-epochs", "250", "--seed", "3"]


@pytest.fixture(scope="module")
def reference(prefect_api: str, tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must reproduce exactly."""
    return train_cli(ARGS, prefect_api, tmp_path_factory.mktemp("faults-ref"), "ref")


#: A sitecustomize that slows a checkpoint's fsync: kills can be aimed inside its write.
SLOW_FSYNC = Path(__file__).parent / "slow_fsync"
# The soak job: 16 chunks, more than the kills below get through (each attempt trains at most
# about one chunk before its kill: it is aimed at the start-up, the first new chunk or a write).
SOAK = ["--job", "nonlinear", "--epochs", "4000", "--chunk-epochs", "250", "--seed", "3"]
#: Where the kills are aimed, in turn: the middle of a chunk, an attempt's start (it holds the
#: run folder, resumes from a checkpoint), the inside of a checkpoint write (its bytes, then its
#: manifest: the commit, in turn).
PHASES = ("mid-chunk", "start-up", "in-write .pt", "mid-chunk", "in-write .json")


def newest_chunk(folder: Path) -> int:
    """The highest checkpoint number in ``folder`` (0 when none)."""
    return max((k for k, _ in ck.list_checkpoints(folder)), default=0)


def temp_files(folder: Path, kind: str = "") -> set[str]:
    """Checkpoint writes in progress (or cut by a kill) of files ending in ``kind``: their temp files."""
    return {p.name for p in folder.glob(f".checkpoint-*{kind}.*.tmp")}


def kill_in(phase: str, args: list[str], prefect_api: str, run_dir: Path, rng: random.Random) -> bool:
    """Start the command, SIGKILL it in ``phase``; returns whether the kill cut a checkpoint write."""
    ckpts = run_dir / "checkpoints"
    before, debris = newest_chunk(ckpts), temp_files(ckpts)
    # Only the attempts aimed at a write get the slow fsync: the others train at full speed.
    slow = {"PYTHONPATH": str(SLOW_FSYNC), "SLOW_FSYNC_SECONDS": "1"} if phase.startswith("in-write") else {}
    proc = start(args, prefect_api, **slow)
    if phase == "start-up":  # once it holds the run folder, before or while it resumes
        wait_until(lambda: (read_json(run_dir / OWNER_FILE) or {}).get("pid") == proc.pid, what="the hold", proc=proc)
        time.sleep(rng.uniform(0.0, 0.5))
    elif phase == "mid-chunk":  # after this attempt's first new checkpoint, inside a later chunk
        wait_until(lambda: newest_chunk(ckpts) > before, what="a new checkpoint", proc=proc)
        time.sleep(rng.uniform(0.0, 0.5))
    else:  # a temp file of this attempt: written, not yet renamed to a checkpoint's name
        kind = phase.split()[1]
        wait_until(lambda: temp_files(ckpts, kind) - debris, what=f"a checkpoint write ({kind})", proc=proc,
                   every=0.01)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return bool(temp_files(ckpts) - debris)


@pytest.mark.slow
def test_soak_random_sigkills(prefect_api: str, tmp_path: Path) -> None:
    """SIGKILLs aimed in turn at an attempt's start, the middle of a chunk and the inside of a
    checkpoint write, each followed by the same command. The end result is bit-identical to the
    uninterrupted run, nothing half-written is ever taken for a checkpoint, and TensorBoard and
    run.json's hashes come out whole."""
    reference = train_cli(SOAK, prefect_api, tmp_path / "reference", "ref")
    rng = random.Random(1234)
    args = [*SOAK, "--artifacts-dir", str(tmp_path), "--run-name", "soak"]
    run_dir = tmp_path / "nonlinear" / "soak"
    cut, progress = 0, []
    for phase in PHASES:
        cut += kill_in(phase, args, prefect_api, run_dir, rng) and phase.startswith("in-write")
        progress.append(newest_chunk(run_dir / "checkpoints"))
    final = run_cli(args, prefect_api)
    assert final.returncode == 0, final.stderr[-3000:]
    # Two mid-chunk kills each follow a new checkpoint; the last one may land before that
    # checkpoint's manifest (an uncommitted .pt, redone by the next attempt), hence >= 2.
    assert cut >= 2 and progress[-1] >= 2 and progress == sorted(progress), (cut, progress)
    # Nothing half-written ever carried a checkpoint's name: nothing was quarantined.
    assert not (run_dir / "checkpoints" / "quarantine").exists()
    assert_same_run(run_dir, reference)
    assert_tensorboard_matches_history(run_dir, 4000)  # each epoch once, across every kill
    assert verify_hashes(run_dir) == []


def test_damaged_newest_checkpoint_is_reported_once_and_the_rerun_falls_back(reference: Path, prefect_api: str,
                                                                            tmp_path: Path, monkeypatch) -> None:
    """A stopped run whose newest checkpoint then gets damaged on disk: the rerun says so in
    exactly one line (console and Prefect UI share it), moves it aside, resumes from the one
    before, and still ends bit-exact."""
    run_dir = stopped_run(monkeypatch, 600, **CFG, artifacts_dir=str(tmp_path), run_name="d")  # in chunk 3
    ckpts = run_dir / "checkpoints"
    newest, path = max(ck.list_checkpoints(ckpts))
    flip_a_bit(path)
    again = run_cli([*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "d"], prefect_api)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [line for line in again.stderr.splitlines() if f"checkpoint-{newest}.pt" in line and "skip" in line]
    assert len(lines) == 1, again.stderr[-3000:]
    assert list((ckpts / "quarantine").glob(f"checkpoint-{newest}.*.pt"))
    assert_same_run(run_dir, reference)


def server_pids(port: str) -> list[int]:
    """Processes running ``prefect server start ... --port PORT`` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if b"server" in argv and b"start" in argv and port.encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def server_outside_group(out: str, pgid: int) -> str:
    """The port of the command's temporary server (from its log line), checked to run outside the
    process group ``pgid``, which a terminal's Ctrl-C reaches."""
    port = re.search(r"temporary server on http://127\.0\.0\.1:(\d+)", out).group(1)
    servers = server_pids(port)
    assert servers and all(os.getpgid(pid) != pgid for pid in servers), "the server is in the terminal's group"
    return port


def test_ctrl_c_saves_after_the_batch_then_resumes(reference: Path, prefect_api: str, tmp_path: Path) -> None:
    """Ctrl-C goes, as a terminal sends it, to the whole foreground process group of a command
    that started its own temporary server: the server is outside that group, so the run stops
    cleanly and the server stops with the command. Exit 130 with a checkpoint from inside the
    chunk (the current batch finished, the chunk not), no crash reported, and a rerun that ends
    bit-exact. (SIGTERM to the process alone takes the same path: tests/test_datasets.py stops a
    run with it inside an epoch; tests/test_sweeps.py stops a sweep's trials with it.)"""
    sig = signal.SIGINT
    args = [*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "t"]
    ckpts = tmp_path / "nonlinear" / "t" / "checkpoints"
    run = Command.train(args, own_server_env(tmp_path / "prefect-home"), start_new_session=True)  # as in a shell
    run.wait_line("temporary server on")
    port = server_outside_group(run.output, run.pid)
    # Into chunk 3 (epochs 501-750) by a fifth of chunk 2's time: its first line comes just before its
    # first epoch, and a chunk takes a fraction of a second on a quiet machine, seconds on a busy one.
    run.wait_line("Task run 'train_chunk-2'")
    t2 = time.monotonic()
    run.wait_line("Task run 'train_chunk-3'")
    time.sleep(min(max((time.monotonic() - t2) / 5, 0.02), 0.5))
    os.killpg(run.pid, sig)  # Ctrl-C
    assert run.wait() == 128 + sig, run.output[-2000:]
    out = run.output
    name = signal.Signals(sig).name
    last = next((line for line in reversed(out.splitlines()) if line.startswith("stopped")), "")
    assert last.startswith(f"stopped: {name}: saved checkpoint-3.pt at epoch "), out[-2000:]
    saved = json.loads((ckpts / "checkpoint-3.json").read_text())["epoch"] + 1
    assert 500 <= saved < 750 and f"at epoch {saved}/1500" in last  # mid-chunk
    inside = json.loads((ckpts / "checkpoint-3.json").read_text())["batch"]  # batches of the next epoch done
    assert (inside > 0) == (f" and {inside}/" in last), last  # the message says where inside the epoch
    assert "Crash detected" not in out and "Crashed(" not in out, out[-3000:]  # a stop, not a crash
    wait_until(lambda: not server_pids(port), what="the temporary server to stop with the command")
    again = run_cli(args, prefect_api)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(tmp_path / "nonlinear" / "t", reference)


def test_ctrl_c_between_two_chunks_stops_the_run_as_a_stop(prefect_api: str, tmp_path: Path) -> None:
    """Ctrl-C to the command's group the moment chunk 1's checkpoint is committed (between two
    chunks, or at the very start of the next) stops the run within seconds: exit 130, one line
    saying where, no crash; it does not train on to the end."""
    args = ["--job", "nonlinear", "--epochs", "40000", "--chunk-epochs", "1000", "--artifacts-dir", str(tmp_path),
            "--run-name", "c"]
    ckpts = tmp_path / "nonlinear" / "c" / "checkpoints"
    run = Command.train(args, cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO"), start_new_session=True)
    wait_until(lambda: (ckpts / "checkpoint-1.json").exists(), what="chunk 1's commit", proc=run, every=0.005)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=300) == 130, run.output[-2000:]
    last = [line for line in run.output.splitlines() if line.strip()][-1]
    assert last.startswith("stopped: SIGINT: ") and "rerun the same command to resume" in last, run.output[-2000:]
    assert "Crash detected" not in run.output and "Crashed(" not in run.output, run.output[-3000:]
    assert max(k for k, _ in ck.list_checkpoints(ckpts)) <= 3  # it stopped, within a chunk or two


def test_divergence_stops_with_one_line_and_is_not_retried(prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    """A NaN loss in chunk 2 fails at once (no Prefect retries), naming the epoch, and the last
    good checkpoint stays."""
    import tasks.engine.training as training

    real = training.train_epoch
    epochs: list[int] = []

    def poisoned(*a, **k):
        epochs.append(len(epochs))
        return float("nan") if len(epochs) == 300 else real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", poisoned)
    with pytest.raises(DivergedError, match=r"training diverged at epoch 300 \(train loss nan\)"):
        train_flow(**CFG, artifacts_dir=str(tmp_path), run_name="d")
    assert len(epochs) == 300  # never retried
    ckpts = tmp_path / "nonlinear" / "d" / "checkpoints"
    assert [k for k, _ in ck.list_checkpoints(ckpts)] == [1]
    assert ck.latest_valid(ckpts, json.loads((tmp_path / "nonlinear" / "d" / "config.json").read_text())["fingerprint"]).path.name == "checkpoint-1.pt"


@pytest.mark.parametrize("option, value", [("--lr", "10"), ("--weight-decay", "1e6")])
def test_divergence_from_the_command_line_names_the_option_at_fault(option: str, value: str, prefect_api: str,
                                                                    tmp_path: Path) -> None:
    proc = run_cli(["--job", "nonlinear", "--epochs", "50", "--chunk-epochs", "10", option, value,
                    "--artifacts-dir", str(tmp_path)], prefect_api)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at epoch ") and f"lower {option} (now {float(value)}" in last
    assert "Traceback" not in proc.stderr


def test_failed_checkpoint_write_keeps_previous_and_retry_takes_over(reference: Path, prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    real = ck.atomic_write_bytes
    failures: list[str] = []

    def flaky_disk(path, data):
        if Path(path).name == "checkpoint-3.pt" and not failures:
            failures.append(str(path))
            before = (Path(path).parent / "checkpoint-2.pt").read_bytes()
            try:
                raise OSError(5, "Input/output error (simulated)")
            finally:
                assert (Path(path).parent / "checkpoint-2.pt").read_bytes() == before
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", flaky_disk)
    result = train_flow(**CFG, artifacts_dir=str(tmp_path), run_name="disk")
    assert len(failures) == 1
    assert_same_run(Path(result["nonlinear"]["run_dir"]), reference)


def hold_in_a_process(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir`` until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from tasks.storage.store import LocalStore\n"
                               f"hold = LocalStore({str(run_dir)!r}).hold(); hold.__enter__(); print('held', flush=True); "
                               "time.sleep(3600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_process_is_refused_naming_the_holder_or_waits_and_a_killed_holder_never_blocks(
        prefect_api: str, tmp_path: Path) -> None:
    args = ["--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10", "--artifacts-dir", str(tmp_path), "--run-name", "l"]
    run_dir = tmp_path / "nonlinear" / "l"
    holder = hold_in_a_process(run_dir)
    try:
        refused_or_waits(args, prefect_api, holder)
    finally:
        holder.kill()
        holder.wait()


def refused_or_waits(args: list[str], prefect_api: str, holder: subprocess.Popen) -> None:
    t0 = time.monotonic()
    refused = run_cli(args, prefect_api)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"is in use by another process (pid {holder.pid} " in refused.stderr and refused.stderr.strip().count("\n") == 0
    reached_the_lock = time.monotonic() - t0  # what a command needs to get there, on this machine now
    t0 = time.monotonic()
    gave_up = run_cli([*args, "--wait-lock", "2"], prefect_api)
    assert gave_up.returncode == 2 and time.monotonic() - t0 >= 2, gave_up.stderr[-2000:]
    # --wait-lock: still held when the command gets to the lock, so it waits; the holder is then
    # SIGKILLed, which leaves no stale lock (the kernel drops it), and the command goes on.
    waiting = start([*args, "--wait-lock", "600"], prefect_api)
    time.sleep(reached_the_lock + 1)
    assert waiting.poll() is None, waiting.stderr.read()[-2000:]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert waiting.wait(timeout=600) == 0, waiting.stderr.read()[-2000:]


def test_retention_keeps_newest_and_best(prefect_api: str, tmp_path: Path) -> None:
    result = train_flow(**CFG, artifacts_dir=str(tmp_path), run_name="k", keep_last=2, save_best=True)
    run_dir = Path(result["nonlinear"]["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [line.split(",") for line in (run_dir / "history.csv").read_text().splitlines()]
    col = history[0].index("val_loss")
    losses = [float(r[col]) for r in history[1:]]
    assert metrics["best"]["epoch"] == losses.index(min(losses)) + 1
    assert (run_dir / "model_best_state_dict.pt").exists()
    kept = {k for k, _ in ck.list_checkpoints(run_dir / "checkpoints")}
    best_ckpt_epochs = {k: json.loads((run_dir / "checkpoints" / f"checkpoint-{k}.json").read_text())["epoch"] for k in kept}
    assert {5, 6} <= kept and len(kept) <= 3, kept
    # The best of the chunk-end checkpoints survives pruning.
    chunk_end_losses = {k: losses[250 * k - 1] for k in range(1, 7)}
    assert min(chunk_end_losses, key=chunk_end_losses.get) in kept, (chunk_end_losses, best_ckpt_epochs)


def test_early_stopping_is_identical_with_and_without_interruption(prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    cfg = dict(CFG, early_stopping_patience=40, save_best=True)
    plain = train_flow(**cfg, artifacts_dir=str(tmp_path / "a"), run_name="e")["nonlinear"]
    m = plain["metrics"]
    assert m["stopped_early"] and m["epochs_trained"] < 1500, m
    seen = fail_once_at(monkeypatch, m["epochs_trained"] - 5, "injected fault just before the early stop")
    interrupted = train_flow(**cfg, artifacts_dir=str(tmp_path / "b"), run_name="e")["nonlinear"]
    assert seen.count(m["epochs_trained"] - 5) == 2
    assert_same_run(Path(interrupted["run_dir"]), Path(plain["run_dir"]))
    assert (Path(interrupted["run_dir"]) / "model_best_state_dict.pt").read_bytes() == (
        Path(plain["run_dir"]) / "model_best_state_dict.pt").read_bytes()

