"""One run on two processes (issue 20): --nproc-per-node 2 trains each chunk with DDP over gloo,
and every fault below ends bit-identical to an uninterrupted two-process run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.train_flow import main, train_flow
from tasks.engine.distributed import ChunkJob, shard
from tasks.engine.rows import epoch_order
from tasks.jobs.registry import JOBS
from tasks.kernel import TrainConfig
from tasks.orchestration.server import reserve_port
from tasks.storage.checkpoint import list_checkpoints
from tests.helpers import (
    ROOT,
    Command,
    assert_same_run,
    assert_same_tensors,
    cli_env,
    run_cli,
    state_dict,
    train_cli,
    wait_until,
    write_tiny_fashion_mnist,
)

pytestmark = pytest.mark.slow


def chunk_job(cfg: TrainConfig, name: str, fingerprint: str, data_fingerprint: str, chunk: int) -> str:
    """What every rank of a chunk reads (spec.json), as the launching process writes it."""
    from tasks.storage.records import DataInfo
    from tasks.storage.run import RunSpec

    run = RunSpec(config=cfg.model_dump(mode="json"), fingerprint=fingerprint, name=name,
                  data=DataInfo(fingerprint=data_fingerprint, source=str(cfg.data), pool_rows=200))
    return ChunkJob(run=run, chunk=chunk, resumed=True).model_dump_json()

# 2 chunks of 100 epochs, each launched as 2 processes (a launch costs more than its training).
ARGS = ["--job", "nonlinear", "--epochs", "200", "--chunk-epochs", "100", "--seed", "5", "--nproc-per-node", "2"]

#: The nonlinear job, its model (and so its weights) unchanged, but rank 1 raises once, in its
#: 500th forward pass of a chunk after $FLAKY_AFTER exists (chunk 1's commit), while $FLAKY_MARK
#: does not: loaded by import path in every rank.
FLAKY_JOB = '''
import os
from dataclasses import replace
from pathlib import Path

from tasks.jobs.registry import JOBS
from tasks.jobs.nonlinear import CustomModel


class Flaky(CustomModel):
    calls = 0

    def forward(self, x):
        self.calls += 1
        mark = Path(os.environ["FLAKY_MARK"])
        after = Path(os.environ["FLAKY_AFTER"]).exists()
        if os.environ.get("RANK") == "1" and self.calls == 500 and after and not mark.exists():
            mark.touch()
            raise RuntimeError("injected fault on rank 1")
        return super().forward(x)


JOB = replace(JOBS["nonlinear"], name="flaky", build_model=lambda cfg: Flaky(), report=None, predict=None)
'''


@pytest.fixture(scope="module")
def reference(prefect_api: str, tmp_path_factory) -> Path:
    """The uninterrupted two-process run that every faulted run must reproduce exactly. Another
    program listens on 29500, torchrun's default port, meanwhile: the chunks launch all the same."""
    import socket

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # else another program holds it already: just as good
            taken.bind(("0.0.0.0", 29500))
            taken.listen()
        return train_cli(ARGS, prefect_api, tmp_path_factory.mktemp("ddp-ref"), "ref")


def test_each_rank_takes_its_contiguous_share_of_every_global_batch() -> None:
    order = epoch_order(5, 3, 70)  # 4 full batches of 16, 6 rows dropped
    ranks = [shard(order, 16, r, 2) for r in range(2)]
    batches = order[:64].view(4, 16)
    for b in range(4):  # rank 0 the first 8 rows of each batch, rank 1 the next 8
        assert torch.equal(ranks[0][b * 8:(b + 1) * 8], batches[b, :8])
        assert torch.equal(ranks[1][b * 8:(b + 1) * 8], batches[b, 8:])


def test_two_processes_train_what_one_does_up_to_rounding(reference: Path, prefect_api: str, tmp_path: Path,
                                                         capsys) -> None:
    """Same samples, same global batches, averaged gradients: the weights of one process,
    up to the order of float additions; and another N is another run (its own folder)."""
    single = train_flow(job="nonlinear", epochs=200, chunk_epochs=100, seed=5, artifacts_dir=str(tmp_path))
    a = state_dict(reference / "model_state_dict.pt")
    b = state_dict(Path(single["nonlinear"]["run_dir"]) / "model_state_dict.pt")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), (a, b)
    assert main([*ARGS[:-1], "1", "--artifacts-dir", str(reference.parents[1]), "--run-name", "ref"]) == 2
    err = capsys.readouterr().err
    assert "nproc_per_node" in err, err[-2000:]


def ranks_of(pid: int) -> list[int]:
    """The rank processes (``-m tasks.engine.distributed``) below ``pid``."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            rank = b"tasks.engine.distributed" in argv and b"torch.distributed.run" not in argv  # not torchrun itself
            if rank and is_below(int(cmdline.parent.name), pid):
                out.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return out


def is_below(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def rank_of(pid: int) -> str | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


def info(prefect_api: str, **env: str) -> dict[str, str]:
    """The command's environment, with the INFO lines that say where a run is."""
    return cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO", **env)


def rank_processes(command: Command, n: int = 2) -> list[int]:
    """The ``n`` rank processes of the command's current chunk (empty until they all run)."""
    ranks = ranks_of(command.pid)
    return ranks if len(ranks) == n else []


@pytest.fixture(scope="module")
def cnn_reference(prefect_api: str, tmp_path_factory) -> tuple[list[str], Path]:
    """fashion_mnist's cnn adds BatchNorm (buffers averaged per epoch) and dropout (a random
    stream per rank, each saved): its arguments (tiny data, 2 chunks of 2 epochs) and the folder
    of its uninterrupted two-process run."""
    root = tmp_path_factory.mktemp("ddp-cnn")
    data = write_tiny_fashion_mnist(root / "data")
    args = ["--job", "fashion_mnist", "--data", str(data), "--epochs", "4", "--chunk-epochs", "2", "--batch-size", "32",
            "--model", "cnn", "--nproc-per-node", "2"]
    return args, train_cli(args, prefect_api, root / "ref", "ref")


def test_sigkill_of_a_rank_then_sigterm_of_the_command_resumes_bit_exact(cnn_reference: tuple[list[str], Path],
                                                                        prefect_api: str, tmp_path: Path) -> None:
    """Rank 1 SIGKILLed in chunk 2: torchrun stops the group and the task retries the chunk. Then
    SIGTERM to the command in that retry: all ranks agree to stop at the end of the current epoch,
    rank 0 saves (every rank's random stream with it), exit 143, and the ranks leave with it. The
    same command resumes; the end is bit-identical to an uninterrupted two-process run. (SIGKILL
    of the whole group: test_datasets and test_streaming.)"""
    base, reference = cnn_reference
    args = [*base, "--artifacts-dir", str(tmp_path), "--run-name", "r"]
    run = Command.train(args, info(prefect_api), start_new_session=True)
    run.wait_line("chunk 2: 2 processes")
    victim = wait_until(lambda: [p for p in ranks_of(run.pid) if rank_of(p) == "1"], what="rank 1 of chunk 2", proc=run)
    os.kill(victim[0], signal.SIGKILL)
    run.wait_line("a process of the group failed")
    ranks = wait_until(lambda: [p for p in rank_processes(run) if p not in victim], what="the ranks of the retry",
                       proc=run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.output[-3000:]
    # Inside chunk 2 (epochs 3-4), at an epoch's end; 4 if the signal came during its last epoch.
    assert re.search(r"SIGTERM: saved checkpoint-2\.pt at epoch [34]/4", run.output), run.output[-3000:]
    wait_until(lambda: not any(is_rank(p) for p in ranks), what="the ranks to exit with the command")
    again = run_cli(args, prefect_api)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(tmp_path / "fashion_mnist" / "r", reference)
    assert not (tmp_path / "fashion_mnist" / "r" / ".ranks").exists(), "the stopped chunk's rank files stay behind"


def is_rank(pid: int) -> bool:
    try:
        return b"tasks.engine.distributed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_whose_torchrun_died_while_starting_it_exits_instead_of_waiting(tmp_path: Path) -> None:
    """torchrun stopped while it starts the ranks does not know them all (CI hit this once): a
    rank whose launcher is gone before it could ask to die with it leaves at once, rather than
    wait for a rendezvous that never comes (here: a port nobody listens on)."""
    (tmp_path / "spec.json").write_text(chunk_job(JOBS["nonlinear"].config(), "r", "f", "f", 1))
    with reserve_port() as nobody:
        env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(nobody.getsockname()[1]), "TRAINFLOW_LAUNCHER_PID": "0"}  # no parent
        rank = subprocess.run([sys.executable, "-m", "tasks.engine.distributed", str(tmp_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=100)  # else 120 s: the rendezvous timeout
    assert rank.returncode == 1 and rank.stderr == "", rank.stderr[-2000:]


def test_a_rank_that_raises_stops_the_group_and_the_retry_resumes(reference: Path, prefect_api: str,
                                                                  tmp_path: Path) -> None:
    """No hang: rank 0 is stopped at once, the task fails and its retry resumes, bit-exact
    against the same model trained without the fault."""
    (tmp_path / "flaky_job.py").write_text(FLAKY_JOB)
    after = tmp_path / "arts" / "flaky_job.JOB" / "faulted" / "checkpoints" / "checkpoint-1.json"
    env = {"PYTHONPATH": str(tmp_path), "FLAKY_MARK": str(tmp_path / "raised"), "FLAKY_AFTER": str(after)}
    args = ["--job", "flaky_job:JOB", *ARGS[2:], "--artifacts-dir", str(tmp_path / "arts")]
    faulted = Command.train([*args, "--run-name", "faulted"], info(prefect_api, **env))
    assert faulted.wait() == 0 and (tmp_path / "raised").exists(), faulted.output[-3000:]
    assert "injected fault on rank 1" in faulted.output and "a process of the group failed" in faulted.output
    run_dir = tmp_path / "arts" / "flaky_job.JOB" / "faulted"
    assert_same_tensors(state_dict(run_dir / "model_state_dict.pt"), state_dict(reference / "model_state_dict.pt"))
    for name in ("history.csv", "split.json"):  # metrics.json names the job
        assert (run_dir / name).read_text() == (reference / name).read_text(), name


def test_two_launchers_over_loopback_train_as_one_launcher_with_two_processes(reference: Path, tmp_path: Path) -> None:
    """Several machines, rehearsed on one (docs/distributed.md): chunk 2 of the reference
    run, trained by two torchrun launchers (--nnodes 2, one process each, c10d rendezvous on
    127.0.0.1, each with its own copy of the chunk's spec, as two machines would have), end
    bit-identical to one launcher with --nproc-per-node 2. Whichever launcher the rendezvous
    makes rank 0 writes the checkpoint."""
    import shutil

    run_dir = tmp_path / "nonlinear" / "run"
    shutil.copytree(reference, run_dir)
    for path in (run_dir / "checkpoints").glob("checkpoint-2.*"):
        path.unlink()  # back to the end of chunk 1
    record = json.loads((run_dir / "config.json").read_text())
    cfg = TrainConfig.model_validate({**record["config"], "threads": record["threads"], "artifacts_dir": str(tmp_path)})
    chunk = 2
    spec = chunk_job(cfg, "run", record["fingerprint"], record["data_fingerprint"], chunk)
    with reserve_port() as sock:
        port = sock.getsockname()[1]
    launchers = []
    for node in (0, 1):
        folder = tmp_path / f"chunk{chunk}-node{node}"
        folder.mkdir()
        (folder / "spec.json").write_text(spec)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"chunk{chunk}",
               "-m", "tasks.engine.distributed", str(folder)]
        launchers.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in launchers:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    results = [tmp_path / f"chunk{chunk}-node{n}" / "result.json" for n in (0, 1)]
    assert sum(r.exists() for r in results) == 1  # one rank 0, on either launcher
    ours, ref = (dict(list_checkpoints(d / "checkpoints"))[2] for d in (run_dir, reference))
    ours, ref = torch.load(ours, weights_only=True), torch.load(ref, weights_only=True)
    assert_same_tensors(ours["model_state_dict"], ref["model_state_dict"])
    assert ours["epoch"] == ref["epoch"] and ours["cost"] == ref["cost"] and ours["world_size"] == 2
