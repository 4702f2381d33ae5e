"""Does ``--compile`` (torch.compile) pay off for a whole run? Wall time of the real command,
with and without it, interleaved, compile time included.

    python benchmarks/compile.py                 # every model, one round (~15 min on 2 cores)
    python benchmarks/compile.py --rounds 2 small_cnn lenet

"cold": a fresh TorchInductor cache (a user's first run); "warm": the cache of the previous
compiled run of the same model (a rerun on the same machine). The command starts its own Prefect
server unless PREFECT_API_URL is set; the same for both sides.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What each case trains: short runs of the real jobs (compile cost is paid once per process).
CASES = {
    "nonlinear": ["--job", "nonlinear", "--epochs", "1000", "--chunk-epochs", "500"],
    "small_cnn": ["--job", "fashion_mnist", "--model", "small_cnn", "--epochs", "2", "--chunk-epochs", "1"],
    "lenet": ["--job", "fashion_mnist", "--model", "lenet", "--epochs", "2", "--chunk-epochs", "1"],
    "cnn": ["--job", "fashion_mnist", "--model", "cnn", "--epochs", "1", "--chunk-epochs", "1"],
}


def run(args: list[str], cache: str | None) -> tuple[float, float]:
    """Wall seconds of one whole run into a fresh artifacts folder, and the training speed of
    its last chunk (samples/s, from its log line): the pace once compiled."""
    env = dict(os.environ)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # PyTorch's documented cache location
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "flows" / "train_flow.py"), *args, "--artifacts-dir", out],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    speeds = re.findall(r"chunk \d+: epochs .* ([0-9.]+) samples/s", proc.stdout + proc.stderr)
    return seconds, float(speeds[-1]) if speeds else float("nan")


def bench(name: str, rounds: int) -> None:
    """Eager, compiled (cold cache), compiled (warm cache), interleaved; prints the medians."""
    args = CASES[name]
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            times["eager"].append(run(args, None))
            times["cold"].append(run([*args, "--compile"], cache))
            times["warm"].append(run([*args, "--compile"], cache))
    wall = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    pace = {k: statistics.median(s for _, s in v) for k, v in times.items()}
    parts = [f"eager {wall['eager']:.1f}s ({pace['eager']:.0f} samples/s in its last chunk)"]
    parts += [f"--compile {k} {wall[k]:.1f}s ({wall[k] / wall['eager']:.2f}x; {pace[k]:.0f} samples/s)"
              for k in ("cold", "warm")]
    print(f"{name} ({' '.join(args[1:])}): " + ", ".join(parts), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all)")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    if unknown := set(args.cases) - set(CASES):
        p.error(f"unknown case {sorted(unknown)[0]}; choose from {', '.join(CASES)}")
    for name in args.cases or CASES:
        bench(name, args.rounds)


if __name__ == "__main__":
    main()
