"""Fault injection: every fault below is survived, and the outcome is asserted."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tasks.checkpoint as ck
from flows.train_flow import train_flow
from tasks.run import OWNER_FILE, hold, read_json
from tasks.training import DivergedError
from tests.conftest import ROOT, TRAIN, cli_env, fail_once_at, run_cli, train_cli
from tests.test_resume import assert_same_run, wait_for

# 6 chunks of 250 epochs (~0.15-1 s each): short, but long enough to be interrupted.
CFG = dict(job="nonlinear", epochs=1500, chunk_epochs=250, seed=3)
ARGS = ["--job", "nonlinear", "--epochs", "1500", "--chunk-epochs", "250", "--seed", "3"]


@pytest.fixture(scope="module")
def reference(prefect_api: str, tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must reproduce exactly."""
    return train_cli(ARGS, prefect_api, tmp_path_factory.mktemp("faults-ref"), "ref")


def start(args: list[str], prefect_api: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env={**cli_env(prefect_api), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed_once(args: list[str], prefect_api: str, written: Path) -> None:
    """Start the command and SIGKILL it as soon as ``written`` exists."""
    proc = start(args, prefect_api)
    wait_for(written.exists, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def flip_a_bit(path: Path) -> None:
    """Damage a file in its middle, keeping its size."""
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


#: A sitecustomize that slows a checkpoint's fsync: kills can be aimed inside its write.
SLOW_FSYNC = Path(__file__).parent / "slow_fsync"
# The soak job: 32 chunks, so 22 kills cannot finish it however fast the machine is.
SOAK = ["--job", "nonlinear", "--epochs", "8000", "--chunk-epochs", "250", "--seed", "3"]


def newest_chunk(folder: Path) -> int:
    """The highest checkpoint number in ``folder`` (0 when none)."""
    return max((k for k, _ in ck.list_checkpoints(folder)), default=0)


@pytest.mark.slow
def test_soak_random_sigkills(prefect_api: str, tmp_path: Path) -> None:
    """22 SIGKILLs at random moments, a third aimed inside a checkpoint write; each time the same
    command is rerun. The end result is bit-identical to the uninterrupted run."""
    reference = train_cli(SOAK, prefect_api, tmp_path / "reference", "ref")
    rng = random.Random(1234)
    args = [*SOAK, "--artifacts-dir", str(tmp_path), "--run-name", "soak"]
    run_dir = tmp_path / "nonlinear" / "soak"
    ckpts = run_dir / "checkpoints"
    kills, in_write, progress = 0, 0, []
    while kills < 22:
        proc = start(args, prefect_api, PYTHONPATH=str(SLOW_FSYNC), SLOW_FSYNC_SECONDS="0.25")
        try:
            if kills % 3 == 0:
                # Aim at the write window: the temp file exists, the rename has not happened yet.
                wait_for(lambda: any(p.name.endswith(".tmp") and p.name.startswith(".checkpoint-")
                                     for p in ckpts.glob(".*")), timeout=60, proc=proc)
                in_write += 1
            elif kills % 3 == 1:
                # A random moment once this process holds the run folder (past its imports), so the
                # kills land in chunks, between them and after them on fast and slow machines alike.
                wait_for(lambda: (read_json(run_dir / OWNER_FILE) or {}).get("pid") == proc.pid, proc=proc)
                time.sleep(rng.uniform(0.0, 3.5))
            else:
                # A random moment after this attempt's first new checkpoint: progress, however
                # long the start takes on a busy machine.
                newest = newest_chunk(ckpts)
                wait_for(lambda: newest_chunk(ckpts) > newest, timeout=120, proc=proc)
                time.sleep(rng.uniform(0.0, 1.0))
        except AssertionError:
            pass  # finished or died first; checked below
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break  # completed before this kill: rerun below must report it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        progress.append(newest_chunk(ckpts))
    final = run_cli(args, prefect_api)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills == 22 and in_write >= 5 and progress[-1] >= 3, (kills, in_write, progress)
    # Nothing half-written ever carried a checkpoint's name: nothing was quarantined.
    assert not (ckpts / "quarantine").exists()
    assert_same_run(run_dir, reference)


def test_damaged_newest_checkpoint_is_reported_once_and_the_rerun_falls_back(reference: Path, prefect_api: str, tmp_path: Path) -> None:
    """SIGKILL, then the newest checkpoint gets damaged on disk: the rerun says so in exactly one
    line (console and Prefect UI share it), moves it aside, resumes from the one before, and
    still ends bit-exact."""
    args = [*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "d"]
    ckpts = tmp_path / "nonlinear" / "d" / "checkpoints"
    killed_once(args, prefect_api, ckpts / "checkpoint-2.json")
    newest, path = max(ck.list_checkpoints(ckpts))
    flip_a_bit(path)
    again = run_cli(args, prefect_api)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [line for line in again.stderr.splitlines() if f"checkpoint-{newest}.pt" in line and "skip" in line]
    assert len(lines) == 1, again.stderr[-3000:]
    assert list((ckpts / "quarantine").glob(f"checkpoint-{newest}.*.pt"))
    assert_same_run(tmp_path / "nonlinear" / "d", reference)


def own_server_env(home: Path) -> dict[str, str]:
    """A user's shell: no PREFECT_API_URL, so the command starts its own temporary server (with
    an isolated PREFECT_HOME); INFO logs, which name that server's port."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    return dict(env, PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_after_the_batch_then_resume(sig, reference: Path, prefect_api: str, tmp_path: Path) -> None:
    """SIGTERM goes to the process alone (a process manager's stop). Ctrl-C goes, as a terminal
    sends it, to the whole foreground process group of a command that started its own temporary
    server: the server is outside that group, so the run stops cleanly and the server stops with
    the command. Both: exit 128+signal within seconds, a checkpoint from inside the chunk, at most
    one "Crash detected" line, and a rerun that ends bit-exact."""
    args = [*ARGS, "--artifacts-dir", str(tmp_path), "--run-name", "t"]
    ckpts = tmp_path / "nonlinear" / "t" / "checkpoints"
    terminal = sig == signal.SIGINT
    env = own_server_env(tmp_path / "prefect-home") if terminal else {**cli_env(prefect_api), "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own group, as in a shell
    lines: list[str] = []  # output as it comes, read by a thread, so the test can wait for a line
    reader = threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True)
    reader.start()

    def seen(text: str) -> bool:
        assert proc.poll() is None, "".join(lines)[-2000:]
        return any(text in line for line in lines)

    if terminal:
        wait_for(lambda: seen("temporary server on"), timeout=180)
        port = server_outside_group("".join(lines), proc.pid)
    # Into chunk 3 (epochs 501-750) by a fifth of chunk 2's time: its first line comes just before its
    # first epoch, and a fast machine trains a chunk in ~0.15 s, a busy one in seconds.
    wait_for(lambda: seen("Task run 'train_chunk-2'"), timeout=180)
    t2 = time.monotonic()
    wait_for(lambda: seen("Task run 'train_chunk-3'"), timeout=180)
    time.sleep(min(max((time.monotonic() - t2) / 5, 0.02), 0.5))
    if terminal:
        os.killpg(proc.pid, sig)  # Ctrl-C
    else:
        proc.send_signal(sig)
    t0 = time.monotonic()
    proc.wait(timeout=120)
    stopped_in = time.monotonic() - t0
    reader.join(timeout=60)
    out = "".join(lines)
    assert proc.returncode == 128 + sig and stopped_in < 20, (proc.returncode, stopped_in, out[-2000:])
    name = signal.Signals(sig).name
    last = next((line for line in reversed(out.splitlines()) if line.startswith("stopped")), "")
    assert last.startswith(f"stopped: {name}: saved checkpoint-3.pt at epoch "), out[-2000:]
    saved = json.loads((ckpts / "checkpoint-3.json").read_text())["epoch"] + 1
    assert 500 <= saved < 750 and f"at epoch {saved}/1500" in last  # mid-chunk
    inside = json.loads((ckpts / "checkpoint-3.json").read_text())["batch"]  # batches of the next epoch done
    assert (inside > 0) == (f" and {inside}/" in last), last  # the message says where inside the epoch
    assert out.count("Crash detected") <= 1, out[-3000:]
    if terminal:
        wait_for(lambda: not server_pids(port), timeout=10)  # it stopped with the command
    again = run_cli(args, prefect_api)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(tmp_path / "nonlinear" / "t", reference)


def test_divergence_stops_with_one_line_and_is_not_retried(prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    """A NaN loss in chunk 2 fails at once (no Prefect retries), naming the epoch, and the last
    good checkpoint stays."""
    import tasks.training as training

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


def test_second_process_on_the_same_folder_is_refused_naming_the_holder(prefect_api: str, tmp_path: Path) -> None:
    args = ["--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10", "--artifacts-dir", str(tmp_path), "--run-name", "l"]
    run_dir = tmp_path / "nonlinear" / "l"
    with hold(run_dir):
        t0 = time.monotonic()
        refused = run_cli(args, prefect_api)
        assert refused.returncode == 2
        assert "is in use by another process (pid " in refused.stderr and refused.stderr.strip().count("\n") == 0
        waited = run_cli([*args, "--wait-lock", "2"], prefect_api)
        assert waited.returncode == 2 and time.monotonic() - t0 >= 2
    # A holder killed with SIGKILL leaves no stale lock: the kernel drops it.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tasks.run import hold\n"
                               f"h = hold({str(run_dir)!r}).__enter__(); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ok = run_cli(args, prefect_api)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_wait_lock_waits_for_the_holder(prefect_api: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "nonlinear" / "w"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from tasks.run import hold\n"
                               f"with hold({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(3)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    ok = run_cli(["--job", "nonlinear", "--epochs", "20", "--chunk-epochs", "10", "--artifacts-dir", str(tmp_path),
                  "--run-name", "w", "--wait-lock", "60"], prefect_api)
    holder.wait()
    assert ok.returncode == 0, ok.stderr[-2000:]


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

