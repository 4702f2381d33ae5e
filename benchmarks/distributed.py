"""Does ``--nproc-per-node 2`` pay off on 2 CPU cores? The real command with 1 process and with
2 (1 thread each), interleaved (the first side alternates each round).

    python benchmarks/distributed.py                      # small_cnn and lenet, 2 rounds (~10 min)
    python benchmarks/distributed.py --rounds 3 lenet
    python benchmarks/distributed.py goal                 # the default run to its 91 % goal (~6 min)

Prints, per case, the training pace (samples/s over the run's chunks, from their log lines:
the launch of each chunk's processes is not in it) and the whole command's wall time, 2
processes / 1; ``goal``: the default FashionMNIST run's wall time and test accuracy. The command
starts its own Prefect server unless PREFECT_API_URL is set; the same for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "small_cnn": ["--job", "fashion_mnist", "--model", "small_cnn", "--epochs", "2", "--chunk-epochs", "1"],
    "lenet": ["--job", "fashion_mnist", "--model", "lenet", "--epochs", "4", "--chunk-epochs", "2"],
    "goal": ["--job", "fashion_mnist"],  # the default run: small_cnn, 10 epochs, >= 91 % test accuracy
}


def run(args: list[str], procs: int) -> dict[str, float]:
    """One whole run into a fresh folder: wall seconds, mean samples/s of its chunks, test accuracy."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "flows" / "train_flow.py"), *args, "--threads", "1",
               "--nproc-per-node", str(procs), "--artifacts-dir", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"},
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        metrics = json.loads(next(Path(out).glob("*/*/metrics.json")).read_text())
    speeds = [float(s) for s in re.findall(r"chunk \d+: epochs .* ([0-9.]+) samples/s", proc.stdout + proc.stderr)]
    return {"wall": wall, "pace": statistics.mean(speeds), "accuracy": metrics.get("test", {}).get("accuracy", float("nan"))}


def bench(name: str, rounds: int) -> None:
    args = CASES[name]
    got: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for r in range(rounds):
        for procs in ((1, 2) if r % 2 == 0 else (2, 1)):
            got[procs].append(run(args, procs))
    med = {p: {k: statistics.median(x[k] for x in v) for k in v[0]} for p, v in got.items()}
    pace = [b["pace"] / a["pace"] for a, b in zip(got[1], got[2])]
    wall = [b["wall"] / a["wall"] for a, b in zip(got[1], got[2])]
    print(f"{name} ({' '.join(args[1:])}, {rounds} rounds): samples/s 1 process {med[1]['pace']:.0f}, "
          f"2 processes {med[2]['pace']:.0f}: {statistics.median(pace):.2f}x (rounds {', '.join(f'{x:.2f}' for x in pace)}); "
          f"wall {med[1]['wall']:.1f}s vs {med[2]['wall']:.1f}s: 2/1 = {statistics.median(wall):.2f}; "
          f"test accuracy {med[1]['accuracy']:.4f} vs {med[2]['accuracy']:.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: small_cnn lenet)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if unknown := set(args.cases) - set(CASES):
        p.error(f"unknown case {sorted(unknown)[0]}; choose from {', '.join(CASES)}")
    for name in args.cases or ["small_cnn", "lenet"]:
        bench(name, args.rounds)


if __name__ == "__main__":
    main()
