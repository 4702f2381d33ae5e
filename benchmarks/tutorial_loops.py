"""Ours against the nonlinear tutorial's own script: whole run against whole run, interleaved.

    python benchmarks/tutorial_loops.py [--rounds N] [--quick] [--prefect-api-url URL]

Runs ``python flows/train_flow.py --job nonlinear`` (a new process; with no PREFECT_API_URL it
starts its own temporary Prefect server) and benchmarks/tutorial_nonlinear.py (the tutorial as
written) in turn, the first alternating (ABBA). Prints, medians over rounds:
- ours' whole command / the tutorial's whole script (wall and CPU time);
- ours' whole command / the tutorial's training loop alone (what the tutorial script times
  itself, without its process start and imports): the goal, <= 0.6, was set on this measure
  and must not regress.
Only whole commands are run, so nothing here depends on ours' internals.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import Launch, become_subreaper

TARGET = 0.6  # ours' whole flow / the tutorial's training loop
QUICK = ["--epochs", "1000", "--chunk-epochs", "100"]
LOOP_LINE = re.compile(r"tutorial: training loop ([\d.]+) s")  # printed by tutorial_nonlinear.py


def run(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, float]:
    """One whole command: wall and CPU seconds, and the tutorial's own loop time if it printed one."""
    launch = Launch(cmd, log, env).start()
    wall, cpu, rc = launch.finish(3600)
    if rc != 0:
        sys.exit(f"{cmd[1]} failed (exit {rc}); output in {log}:\n{launch.text()[-3000:]}")
    m = LOOP_LINE.search(launch.text())
    return {"wall": wall, "cpu": cpu, "loop": float(m.group(1)) if m else float("nan")}


def line(name: str, ours: list[float], theirs: list[float], target: float | None = None) -> None:
    mo, mt = statistics.median(ours), statistics.median(theirs)
    verdict = "" if target is None else f" (target <= {target}) {'OK' if mo / mt <= target else 'MISSED'}"
    rounds = " ".join(f"{a / b:.3f}" for a, b in zip(ours, theirs))
    print(f"  {name}: ours {mo:.1f} s / tutorial {mt:.1f} s = {mo / mt:.3f}{verdict} (rounds: {rounds})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 000 epochs instead of 10 000 (a smoke run)")
    p.add_argument("--prefect-api-url", help="run ours against this running Prefect server")
    a = p.parse_args()
    become_subreaper()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if a.prefect_api_url:
        env["PREFECT_API_URL"] = a.prefect_api_url
    extra = QUICK if a.quick else []
    tmp = Path(tempfile.mkdtemp(prefix="bench-tutorial-"))
    print(f"nonlinear, whole runs{' (--quick: 1 000 epochs)' if a.quick else ''}, {a.rounds} round(s) interleaved; "
          f"logs in {tmp}")
    ours, tut = [], []
    for r in range(1, a.rounds + 1):
        sides = [("ours", [sys.executable, "flows/train_flow.py", "--job", "nonlinear", "--artifacts-dir",
                           str(tmp / f"ours-{r}"), "--run-name", "bench", *extra], ours),
                 ("tutorial", [sys.executable, "benchmarks/tutorial_nonlinear.py", "--out", str(tmp / f"tutorial-{r}"),
                               *extra], tut)]
        for name, cmd, out in sides if r % 2 else sides[::-1]:
            out.append(run(cmd, tmp / f"{name}-{r}.log", env))
        print(f"round {r}: ours {ours[-1]['wall']:.1f} s, tutorial {tut[-1]['wall']:.1f} s "
              f"(its loop {tut[-1]['loop']:.1f} s)", flush=True)
    print(f"ratios (median of {a.rounds} round(s)):")
    line("whole command / tutorial's whole script, wall", [o["wall"] for o in ours], [t["wall"] for t in tut])
    line("whole command / tutorial's whole script, CPU", [o["cpu"] for o in ours], [t["cpu"] for t in tut])
    line("whole command / tutorial's training loop alone, wall", [o["wall"] for o in ours],
         [t["loop"] for t in tut], None if a.quick else TARGET)  # the goal is for the full 10 000 epochs


if __name__ == "__main__":
    main()
