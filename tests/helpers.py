"""Helpers shared by the test modules (fixtures live in conftest.py). Tests make their own data
here rather than through product hooks."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "flows" / "train_flow.py"
PREDICT = ROOT / "flows" / "predict_flow.py"

#: A fingerprint for hand-made checkpoints.
FP = "f" * 64

# --- waiting on events ---------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 300, what: str = "the condition",
               proc: Any = None, every: float | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that. Fails naming ``what``
    when ``timeout`` seconds pass (a ceiling for busy machines, not an expectation), or at once
    when a process in ``proc`` (a Popen, a Command, or a list of them) ends first. Polls every
    ``every`` seconds; by default every 20 ms, or 10 times the check's own time if that is longer:
    a check that asks a server (S3, Prefect) then takes at most a tenth of a core, here and in the
    server, on a suite that is CPU-bound. Give ``every`` where the moment matters (a kill)."""
    procs = [] if proc is None else list(proc) if isinstance(proc, Sequence) else [proc]
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        value = predicate()
        if value:
            return value
        cost = time.monotonic() - began
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: the process ended first ({p.returncode}):\n{output_of(p)}")
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every if every is not None else max(0.02, 10 * cost))


def output_of(proc: Any, n: int = 3000) -> str:
    """The tail of what a finished process printed, wherever it went."""
    if isinstance(proc, Command):
        return proc.output[-n:]
    if getattr(proc, "log_path", None):
        return Path(proc.log_path).read_text(errors="replace")[-n:]
    if proc.stderr is not None and not proc.stderr.closed:
        return proc.stderr.read()[-n:]
    return ""


def parents() -> dict[int, int]:
    """Every process's parent (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return found


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    parent = parents()
    out, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid]
        out += kids
        todo += kids
    return out


# --- the command ---------------------------------------------------------------------------------


def cli_env(prefect_api: str, **env: str) -> dict[str, str]:
    """Environment for a CLI subprocess that talks to the session's server."""
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONUNBUFFERED": "1", **env}


def own_server_env(home: Path, **env: str) -> dict[str, str]:
    """A user's shell: no PREFECT_API_URL, so the command starts its own temporary server (with
    an isolated PREFECT_HOME); INFO logs, which name that server's port."""
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    return {**base, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **env}


def run_cli(args: list[str], prefect_api: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `python flows/train_flow.py ARGS` to completion."""
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=ROOT, env=cli_env(prefect_api, **env),
                          capture_output=True, text=True, timeout=timeout)


def train_cli(args: list[str], prefect_api: str, root: Path, run_name: str) -> Path:
    """The command's uninterrupted run into ``root`` (the reference a faulted run must end as);
    returns the run folder. In this process, through the command's own ``main`` on the session's
    server: what these references prove is the floats, not the process (tests that kill or stop
    a command start it as a process), and a process start is the suite's largest cost."""
    from flows.train_flow import main

    assert prefect_api  # the session's server: main() reports to it
    assert main([*args, "--artifacts-dir", str(root), "--run-name", run_name]) == 0
    from tasks.jobs.registry import get_job

    return root / get_job(args[args.index("--job") + 1]).name / run_name  # my_job:JOB -> my_job.JOB


def start(args: list[str], prefect_api: str, **env: str) -> subprocess.Popen:
    """Start the command (its output kept for the test and for a failure message)."""
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env=cli_env(prefect_api, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Command:
    """A process whose merged output is collected as it comes, so a test can wait for a line."""

    def __init__(self, argv: list[str], env: dict[str, str], **popen: Any):
        self.proc = subprocess.Popen(argv, cwd=popen.pop("cwd", ROOT), env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, **popen)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @classmethod
    def train(cls, args: list[str], env: dict[str, str], **popen: Any) -> Command:
        return cls([sys.executable, str(TRAIN), *args], env, **popen)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def poll(self) -> int | None:
        return self.proc.poll()

    def seen(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_line(self, text: str, timeout: float = 300) -> None:
        wait_until(lambda: self.seen(text), timeout, f"the line {text!r}", proc=self)

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=60)
        return code


# --- comparing runs ------------------------------------------------------------------------------


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A saved state_dict, loaded the safe way."""
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of two state_dicts (not allclose)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs: {a[k]} vs {b[k]}"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same final tensors, same metrics, same per-epoch history and split as the uninterrupted run."""
    assert_same_tensors(state_dict(run_dir / "model_state_dict.pt"), state_dict(reference / "model_state_dict.pt"))
    metrics, ref_metrics = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert metrics == ref_metrics
    for name in ("history.csv", "split.json"):
        assert (run_dir / name).read_text() == (reference / name).read_text(), f"{name} differs"


def history(run_dir: Path) -> dict[str, list[float]]:
    lines = (run_dir / "history.csv").read_text().splitlines()
    cols = lines[0].split(",")
    return {c: [float(line.split(",")[i]) for line in lines[1:]] for i, c in enumerate(cols)}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's TensorBoard folder, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_matches_history(run_dir: Path, epochs: int) -> None:
    """TensorBoard shows every epoch once, with the values of history.csv."""
    found, hist = scalars(run_dir), history(run_dir)
    assert {"Loss/train", "Loss/val", "LearningRate"} <= found.keys(), found.keys()
    for tag, column in (("Loss/train", "train_loss"), ("Loss/val", "val_loss"), ("LearningRate", "lr")):
        steps = [s for s, _ in found[tag]]
        assert steps == list(range(1, epochs + 1)), f"{tag}: duplicate or missing steps {steps[:20]}..."
        assert np.allclose([v for _, v in found[tag]], hist[column], rtol=1e-6), tag


# --- faults --------------------------------------------------------------------------------------


def fail_once_at(monkeypatch, epoch: int, message: str = "injected fault inside chunk 2") -> list[int]:
    """Make ``Trainer.run_epoch`` raise (a retried error) the first time it reaches ``epoch``;
    returns the list of every epoch it is called with, in order."""
    from tasks.engine.training import Trainer

    real = Trainer.run_epoch
    calls: list[int] = []

    def flaky(self, e: int, *args):
        calls.append(e)
        if e == epoch and calls.count(epoch) == 1:
            raise RuntimeError(message)
        return real(self, e, *args)

    monkeypatch.setattr(Trainer, "run_epoch", flaky)
    return calls


def fail_at(monkeypatch, epoch: int) -> None:
    """Make every attempt end at ``epoch`` with an error that Prefect does not retry (a stopped
    attempt, as a kill leaves it, but in this process)."""
    from tasks.engine.training import Trainer
    from tasks.kernel import UserError

    real = Trainer.run_epoch

    def failing(self, e: int, *args):
        if e == epoch:
            raise UserError(f"injected failure at epoch {e + 1}")
        return real(self, e, *args)

    monkeypatch.setattr(Trainer, "run_epoch", failing)


def stopped_run(monkeypatch, epoch: int, **flow_kwargs: Any) -> Path:
    """A run of ``train_flow(**flow_kwargs)`` stopped at ``epoch`` (its checkpoints up to then
    kept); returns its run folder."""
    import pytest

    from flows.train_flow import train_flow
    from tasks.kernel import UserError

    with monkeypatch.context() as patch:
        fail_at(patch, epoch)
        with pytest.raises(UserError):
            train_flow(**flow_kwargs)
    return Path(flow_kwargs["artifacts_dir"]) / flow_kwargs["job"] / flow_kwargs["run_name"]


def flip_a_bit(path: Path) -> None:
    """Damage a file in its middle, keeping its size."""
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def checkpoint_payload(chunk: int, epoch: int | None = None, fingerprint: str = FP) -> dict:
    """A hand-made checkpoint in the product's format."""
    from tasks.storage.checkpoint import capture_rng

    return {
        "model": "CustomModel", "epoch": chunk * 10 - 1 if epoch is None else epoch,
        "model_state_dict": {"w": torch.full((2,), float(chunk))}, "optimizer_state_dict": {"state": {}, "param_groups": []},
        "cost": 0.5, "description": f"c{chunk}", "chunk": chunk, "fingerprint": fingerprint, "rng": capture_rng(),
        "history": {"epoch": torch.arange(3.0)}, "format": 1,
    }


# --- an S3 server ---------------------------------------------------------------------------------


class S3Server:
    """A moto S3 server of the test session's own, on a loopback port."""

    def __init__(self, endpoint: str, proc: subprocess.Popen):
        self.endpoint, self.proc, self.count = endpoint, proc, 0

    def bucket(self) -> str:
        """A new, empty bucket: ``s3://<name>``."""
        import s3fs

        self.count += 1
        name = f"trainflow-test-{os.getpid()}-{self.count}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"


def answers(url: str) -> bool:
    """Whether the server at ``url`` says it is healthy (``/health``: Prefect's, MLflow's)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def start_moto(**env: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port (``env``: moto's settings); returns it and its URL."""
    from tasks.orchestration.server import reserve_port

    with reserve_port() as sock:
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=5).close()
            return True
        except OSError as exc:  # an HTTP error is an answer (one that checks credentials refuses)
            return bool(getattr(exc, "code", None))

    wait_until(answers, 300, "moto_server to answer", proc=proc, every=0.2)
    return proc, endpoint


def machine(tmp_path: Path, name: str, prefect_api: str) -> dict[str, str]:
    """The environment of a fresh "machine": its own empty local cache, the session's server and store."""
    return cli_env(prefect_api, TRAINFLOW_CACHE=str(tmp_path / name))


# --- test data (written by the tests, not by product hooks) ---------------------------------------

#: The salary tutorial's data (``linear``): years and salaries.
SALARY_X = [1, 2, 3, 4, 5, 6, 7]
SALARY_Y = [25000, 55000, 75000, 110000, 128000, 155000, 180000]
#: The datasets tutorial's 2 -> 2 example (``multi_linear``).
MULTI_X = [[1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]]
MULTI_Y = [[0.1, 1.5], [1, 2.8], [1.9, 4.1], [2.8, 5.4], [3.7, 6.7], [4.6, 8]]


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """A uint8 tensor as a gzipped IDX file (FashionMNIST's format)."""
    header = struct.pack(">HBB", 0, 0x08, tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    path.write_bytes(gzip.compress(header + tensor.contiguous().numpy().tobytes(), mtime=0))


def write_tiny_fashion_mnist(folder: Path, train: int = 600, test: int = 200, seed: int = 0) -> Path:
    """Tiny, learnable FashionMNIST-format data (class k = a bright band at row 2k) in
    ``folder/FashionMNIST/raw``; returns ``folder`` (the ``--data`` value)."""
    g = torch.Generator().manual_seed(seed)
    raw = Path(folder) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            images[i, 2 * k + 4 : 2 * k + 6, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return Path(folder)


#: Jobs whose default data is not available offline: the test data each gets instead.
TEST_DATA: dict[str, Callable[[Path], Path]] = {"fashion_mnist": write_tiny_fashion_mnist}


def run_of(folder: Path):
    """The Run of a local run folder, as its config.json describes it (for reporting on copies)."""
    from tasks.kernel import TrainConfig
    from tasks.storage.records import DataInfo
    from tasks.storage.run import Run
    from tasks.storage.store import LocalStore

    record = json.loads((Path(folder) / "config.json").read_text())
    data = DataInfo(fingerprint=record["data_fingerprint"], source=record["config"]["data"], pool_rows=0)
    return Run(TrainConfig.model_validate(record["config"]), data, record["fingerprint"], LocalStore(Path(folder)))
