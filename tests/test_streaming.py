"""Streaming shards (tasks/jobs/shards.py): the FashionMNIST shards job on tiny data (8 training
shards of 40 images, 2 test shards), from the test S3 server or a local folder. Killed and
stopped inside an epoch with loader workers, it ends bit-identical to an uninterrupted run without
workers, and the resumed epoch fetches only what it had not trained on; on two processes it
resumes bit-exact after a rank is SIGKILLed; a missing or damaged shard is one line, exit 2,
nothing lost."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from flows.train_flow import train_flow
from tasks.engine.rows import sample_seed
from tasks.jobs import fashion_shards
from tests.helpers import (
    Command,
    assert_same_run,
    cli_env,
    history,
    run_cli,
    stopped_run,
    wait_until,
    write_tiny_fashion_mnist,
)

pytestmark = pytest.mark.slow

JOB, NAME = "tests.user_job.logged_shards:JOB", "tests.user_job.logged_shards.JOB"
#: 320 training images (288 train, 32 validation: 9 batches an epoch), 80 test images.
SETTINGS = dict(job=JOB, epochs=2, chunk_epochs=1, batch_size=32, seed=3)
OPTIONS = [arg for k, v in SETTINGS.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
BATCHES, BATCH = 9, 32


def write_shards(location: str, tmp_path: Path) -> str:
    """Tiny FashionMNIST-format images as shards of 40 at ``location``."""
    fashion_shards.write(location, data=write_tiny_fashion_mnist(tmp_path / "images", train=320, test=80), per_shard=40)
    return location


def fetched(log: Path, epoch: int) -> list[tuple[str, str, int]]:
    """(key, rank, process) of the training shards' samples fetched for training in ``epoch``
    (0-based), as ``$SHARD_LOG`` tells them (an item's seed is a function of its epoch)."""
    text = log.read_text() if log.exists() else ""
    lines = [line.split() for line in text.split("\n")[:-1]]  # whole lines: a reader may see one half-written
    return [(key, rank, int(pid)) for url, key, seed, rank, pid in (f for f in lines if len(f) == 5)
            if "/train/" in url and int(seed) == sample_seed(3, epoch, int(key))]


def test_sharded_run_on_s3_killed_and_stopped_inside_epochs_resumes_bit_exact_fetching_only_the_rest(
        prefect_api: str, s3_server, tmp_path: Path, monkeypatch) -> None:
    """With 2 loader workers: SIGKILLed inside epoch 2, rerun (on another machine: an empty
    cache), stopped by SIGTERM inside epoch 2, rerun again: the same floats as an uninterrupted
    run without workers, and the last rerun fetched exactly the training rows left in its epoch."""
    data = write_shards(f"{s3_server.bucket()}/fashion", tmp_path)
    with monkeypatch.context() as patch:  # the reference, in this process (no launch to pay)
        patch.setenv("TRAINFLOW_CACHE", str(tmp_path / "ref-cache"))
        reference = train_flow(**SETTINGS, data=data, num_workers=0, artifacts_dir=str(tmp_path / "ref"), run_name="r")
    assert reference[NAME]["status"] == "completed", reference
    args = [*OPTIONS, "--data", data, "--artifacts-dir", str(tmp_path / "arts"), "--run-name", "r"]
    folder = tmp_path / "arts" / NAME / "r"

    def start(name: str, **env: str) -> tuple[Command, Path]:
        log = tmp_path / f"{name}.log"
        env = cli_env(prefect_api, **{"PREFECT_LOGGING_LEVEL": "INFO", "SHARD_LOG": str(log), "SHARD_DELAY": "0.01",
                                      "TRAINFLOW_CACHE": str(tmp_path / f"{name}-cache"), **env})
        return Command.train([*args, "--num-workers", "2"], env, start_new_session=True), log

    killed, log = start("killed")
    wait_until(lambda: len(fetched(log, 1)) >= 3 * BATCH, what="3 batches of epoch 2", proc=killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (folder / "checkpoints" / "checkpoint-1.json").exists() and not (folder / "model_state_dict.pt").exists()
    stopped, log = start("stopped")  # from the end of epoch 1: stopped 2-4 batches into epoch 2
    wait_until(lambda: len(fetched(log, 1)) >= 6 * BATCH, what="6 batches of epoch 2", proc=stopped)
    stopped.proc.send_signal(signal.SIGTERM)
    assert stopped.wait() == 128 + signal.SIGTERM, stopped.output[-3000:]
    done = json.loads(max((folder / "checkpoints").glob("checkpoint-*.json"), key=os.path.getmtime).read_text())
    assert done["epoch"] == 0 and 0 < done["batch"] < BATCHES, done
    last, log = start("last", SHARD_DELAY="0")
    assert last.wait() == 0, last.output[-3000:]
    rest = [key for key, _, _ in fetched(log, 1)]
    assert len(rest) == len(set(rest)) == (BATCHES - done["batch"]) * BATCH, (done["batch"], len(rest))
    assert_same_run(folder, tmp_path / "ref" / NAME / "r")


def test_sharded_run_on_two_processes_resumes_bit_exact_after_a_rank_is_killed(
        prefect_api: str, tmp_path: Path) -> None:
    """Each rank takes its share of every batch of the shard-grouped order (the shards in a local
    folder). Rank 1 SIGKILLed inside epoch 2 (with a loader worker each): torchrun stops the
    group, the task's retry resumes from checkpoint 1, and the run ends bit-identical to an
    uninterrupted two-process run without workers."""
    data = write_shards(str(tmp_path / "shards"), tmp_path)
    reference = train_flow(**SETTINGS, data=data, nproc_per_node=2, artifacts_dir=str(tmp_path / "ref"), run_name="r")
    assert reference[NAME]["status"] == "completed", reference
    log = tmp_path / "fetched.log"
    args = [*OPTIONS, "--data", data, "--nproc-per-node", "2", "--num-workers", "1", "--artifacts-dir",
            str(tmp_path / "arts"), "--run-name", "r"]
    run = Command.train(args, cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO", SHARD_LOG=str(log), SHARD_DELAY="0.01"))
    worker = wait_until(lambda: [pid for _, rank, pid in fetched(log, 1) if rank == "1"], what="rank 1 in epoch 2",
                        proc=run)[0]
    os.kill(int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)  # its rank
    assert run.wait() == 0, run.output[-3000:]
    assert re.search(r"Task run 'train_chunk-2' - .* - Retry 1/", run.output), run.output[-3000:]
    assert "chunk 2: resumed from checkpoint-1.pt" in run.output, run.output[-3000:]
    assert_same_run(tmp_path / "arts" / NAME / "r", tmp_path / "ref" / NAME / "r")


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_a_missing_or_damaged_shard_is_one_line_exit_2_and_the_rerun_resumes(
        damage: str, prefect_api: str, s3_server, tmp_path: Path, monkeypatch) -> None:
    """A shard of the store deleted, or changed in its middle, after the first chunk: the rerun
    on another machine (nothing cached) stops in one line naming the shard and the fix, exit 2,
    checkpoint 1 untouched; with the shard restored, the run resumes from it and completes."""
    import s3fs

    data = write_shards(f"{s3_server.bucket()}/fashion", tmp_path)
    monkeypatch.setenv("TRAINFLOW_CACHE", str(tmp_path / "machine-1"))
    stopped_run(monkeypatch, 1, **SETTINGS, data=data, artifacts_dir=str(tmp_path / "arts"), run_name="r")
    folder = tmp_path / "arts" / NAME / "r"
    checkpoint = (folder / "checkpoints" / "checkpoint-1.pt").read_bytes()
    shard, store = f"{data}/train/train-000003.tar", s3fs.S3FileSystem(skip_instance_cache=True)
    good = store.cat_file(shard)
    if damage == "missing":
        store.rm_file(shard)
    else:
        store.pipe_file(shard, good[:5000] + bytes(b ^ 0xFF for b in good[5000:5100]) + good[5100:])
    args = [*OPTIONS, "--data", data, "--artifacts-dir", str(tmp_path / "arts"), "--run-name", "r"]
    failed = run_cli(args, prefect_api, TRAINFLOW_CACHE=str(tmp_path / "machine-2"))
    err = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and err.startswith(f"error: shard {shard} is "
                                                                                          f"{damage}"), failed.stderr
    assert "upload it again" in err and (damage == "damaged" or failed.stderr.strip() == err), failed.stderr
    assert (folder / "checkpoints" / "checkpoint-1.pt").read_bytes() == checkpoint
    store.pipe_file(shard, good)
    result = train_flow(**SETTINGS, data=data, artifacts_dir=str(tmp_path / "arts"), run_name="r")
    assert result[NAME]["status"] == "completed" and history(folder)["epoch"] == [1.0, 2.0], result
