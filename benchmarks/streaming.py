"""Streaming shards, measured with the real command (docs/performance.md, "Streaming shards"):

- peak memory of one epoch over synthetic shards (benchmarks/streaming_job.py: 16 KiB samples,
  shards of 4 000) at 1x (1.5 GB) and 4x (6 GB), sampled every 0.2 s over the process tree: the
  proportional set size (PSS: a page shared by the forked loader workers counts once overall),
  of the command with its loader workers, and of the whole tree (with the command's temporary
  Prefect server); the resident sizes (RSS) summed, for comparison;
- the time from launch to the first trained batch: a fresh run, and runs resumed from a stop at
  10 % and at 90 % of an epoch.

    python benchmarks/streaming.py [--folder /tmp/trainflow-streaming] [--workers 2]

The shards are written once into ``--folder`` (7.5 GB) and kept for the next run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.streaming_job import SAMPLE_BYTES  # noqa: E402
from tasks.jobs.shards import write_shards  # noqa: E402

PER_SHARD, BATCH = 4_000, 256
JOB = "benchmarks.streaming_job:JOB"


def make(folder: Path, gigabytes: float) -> int:
    """Synthetic shards of ``gigabytes`` at ``folder`` (kept from an earlier run); their samples."""
    n = int(gigabytes * 1e9 / SAMPLE_BYTES) // PER_SHARD * PER_SHARD
    if not (folder / "index.json").exists():
        rng = np.random.default_rng(int(gigabytes * 10))
        samples = ({"__key__": f"{i:08d}", "bin": rng.bytes(SAMPLE_BYTES), "cls": str(i % 10).encode()}
                   for i in range(n))
        write_shards(samples, folder, PER_SHARD)
    return n


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, q in parent.items() if q == p]
    return found


def sizes(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        return int(fields["Pss"].split()[0]) * 1024, int(fields["Rss"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def launch(data: Path, artifacts: Path, run: str, workers: int, **env: str) -> subprocess.Popen:
    argv = [sys.executable, "flows/train_flow.py", "--job", JOB, "--data", str(data), "--artifacts-dir",
            str(artifacts), "--run-name", run, "--num-workers", str(workers), "--batch-size", str(BATCH)]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def epoch(data: Path, artifacts: Path, run: str, workers: int) -> dict[str, float]:
    """One whole epoch: its wall time and the peaks of memory (module docstring)."""
    t0, proc = time.perf_counter(), launch(data, artifacts, run, workers)
    peak = {"pss_command": 0, "pss_tree": 0, "rss_tree": 0}
    while proc.poll() is None:
        pids, own = tree(proc.pid), cmdline(proc.pid)
        measured = {p: sizes(p) for p in pids}
        command = [p for p in pids if cmdline(p) == own]  # the command and its forks, the loader workers
        now = {"pss_command": sum(measured[p][0] for p in command), "pss_tree": sum(m[0] for m in measured.values()),
               "rss_tree": sum(m[1] for m in measured.values())}
        peak = {k: max(v, now[k]) for k, v in peak.items()}
        time.sleep(0.2)
    assert proc.returncode == 0, f"the epoch over {data} failed ({proc.returncode})"
    return {**{k: v / 1e9 for k, v in peak.items()}, "seconds": time.perf_counter() - t0}


def first_step(data: Path, artifacts: Path, run: str, workers: int) -> float:
    """Seconds from launch to the first trained batch of the command (then it is killed)."""
    mark = artifacts / f"{run}.first"
    mark.unlink(missing_ok=True)
    t0 = time.time()
    proc = launch(data, artifacts, run, workers, STREAM_FIRST_STEP=str(mark))
    while not mark.exists() or not mark.read_text():
        assert proc.poll() is None, f"the run {run} ended ({proc.returncode}) before its first step"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return float(mark.read_text()) - t0


def resumed(data: Path, artifacts: Path, fraction: float, steps: int, workers: int) -> float:
    """Stop a run at ``fraction`` of its epoch (a checkpoint there), then time its resume."""
    run = f"resume-{round(fraction * 100)}"
    proc = launch(data, artifacts, run, workers, STREAM_STOP_AT=str(int(fraction * steps)))
    assert proc.wait() == 128 + signal.SIGTERM, f"the stop at {fraction:.0%} failed ({proc.returncode})"
    return first_step(data, artifacts, run, workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "trainflow-streaming")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    counts = {scale: make(args.folder / scale, gb) for scale, gb in (("1x", 1.5), ("4x", 6.0))}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp)
        for scale, n in counts.items():
            m = epoch(args.folder / scale, artifacts, f"epoch-{scale}", args.workers)
            print(f"{scale}: {n} samples ({n * SAMPLE_BYTES / 1e9:.2f} GB), one epoch {m['seconds']:.1f} s "
                  f"({n / m['seconds']:.0f} samples/s); peak PSS command + workers {m['pss_command']:.3f} GB, "
                  f"whole tree {m['pss_tree']:.3f} GB; peak RSS summed {m['rss_tree']:.3f} GB", flush=True)
        steps = counts["1x"] // BATCH
        print(f"fresh start -> first step: {first_step(args.folder / '1x', artifacts, 'fresh', args.workers):.1f} s")
        for fraction in (0.1, 0.9):
            seconds = resumed(args.folder / "1x", artifacts, fraction, steps, args.workers)
            print(f"resumed at {fraction:.0%} of the epoch -> first step: {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
