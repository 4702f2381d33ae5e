"""The sweep's overhead, side by side: ``python benchmarks/sweep_overhead.py [--rounds 2] [--trials 4]``.

1. Per trial: a sweep of N trials (``flows/sweep_flow.py``, one at a time) against the same N
   trials run one by one with ``flows/train_flow.py --config <sweep>/trials/trial-NNN.json``
   (each trial's own options, as the sweep wrote them), the command a user's shell loop runs.
   Both use one running Prefect server (started here), so the figure is the sweep's own cost:
   its process, the study, the watching, the outputs. Goal: the sweep / the trials <= 1.05.
2. Work lost to a kill: the same sweep SIGKILLed inside a trial, after that trial's first
   checkpoint and a random share of its next chunk, then rerun; its total wall time (killed part
   + rerun) against the uninterrupted sweep's, and the epoch the cut trial resumed from.

Rounds alternate the order of the two sides. Nothing here is a test: the figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.kernel import read_json  # noqa: E402
from tasks.orchestration.server import launch  # noqa: E402

SWEEP = ["--job", "nonlinear", "--epochs", "2000", "--chunk-epochs", "500", "--seed", "3",
         "--space", "lr=log:1e-5:3e-4", "--sweep-name", "bench"]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def sweep_cmd(trials: int, folder: Path) -> list[str]:
    return [sys.executable, "flows/sweep_flow.py", *SWEEP, "--trials", str(trials), "--artifacts-dir", str(folder)]


def one_by_one(sweep: Path, folder: Path, env: dict[str, str]) -> float:
    """The sweep's trials, each as its own train command, one after the other: total wall."""
    configs = sorted((sweep / "trials").glob("trial-*.json"))
    return sum(timed([sys.executable, "flows/train_flow.py", "--config", str(c), "--artifacts-dir", str(folder)], env)
               for c in configs)


def killed_and_rerun(trials: int, folder: Path, env: dict[str, str], rng: random.Random) -> tuple[float, int]:
    """The sweep SIGKILLed inside trial 1's second chunk, then rerun: total wall, and the epoch
    the trial resumed from (its checkpoint)."""
    cmd, began = sweep_cmd(trials, folder), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run = folder / "sweeps" / "bench" / "nonlinear" / "trial-001"
    while not (read_json(run / "run.json") or {}).get("chunks"):
        time.sleep(0.01)
    first = time.perf_counter()
    time.sleep(rng.uniform(0.1, 0.9) * (first - began) / 4)  # into the next chunk (a trial: ~4 chunks' time)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    timed(cmd, env)
    return time.perf_counter() - began, read_json(run / "run.json")["resumes"][-1]["epochs_saved"]


def one_round(r: int, trials: int, tmp: Path, env: dict[str, str], rng: random.Random) -> dict[str, float]:
    """The sweep and its trials one by one (the first side alternates), then the killed sweep."""
    sides = {}
    for side in (("sweep", "trials") if r % 2 == 0 else ("trials", "sweep")):
        if side == "sweep":
            sides["sweep"] = timed(sweep_cmd(trials, tmp / f"s{r}"), env)
        else:  # the trials of the reference sweep (made first if needed)
            ref = tmp / "ref"
            if not (ref / "sweeps" / "bench" / "trials").exists():
                timed(sweep_cmd(trials, ref), env)
            sides["trials"] = one_by_one(ref / "sweeps" / "bench", tmp / f"t{r}", env)
    sides["killed"], sides["resumed_at"] = killed_and_rerun(trials, tmp / f"k{r}", env, rng)
    return sides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trials", type=int, default=4)
    args = p.parse_args()
    if args.trials < 2:
        p.error("--trials: at least 2 (the kill is aimed at trial 1)")
    tmp = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    # One server for both sides: the configured one, else a temporary one that dies with this
    # process (the command's own, tasks/orchestration/server.py); it sets PREFECT_API_URL.
    if (srv := launch()) is not None:
        srv.wait_ready()
    env, rng = dict(os.environ), random.Random(0)
    rows = []
    for r in range(args.rounds):
        rows.append(one_round(r, args.trials, tmp, env, rng))
        print(json.dumps({"round": r, **{k: round(v, 2) for k, v in rows[-1].items()}}), flush=True)
    s, t, k = (sum(row[key] for row in rows) for key in ("sweep", "trials", "killed"))
    per_round = ", ".join(f"{row['sweep'] / row['trials']:.3f}" for row in rows)
    print(f"{args.trials} trials of nonlinear ({' '.join(SWEEP[2:6])}), {args.rounds} rounds, one Prefect server")
    print(f"sweep {s / len(rows):.1f} s; the same trials one by one {t / len(rows):.1f} s: ratio {s / t:.3f} "
          f"(goal <= 1.05); overhead per trial {(s - t) / len(rows) / args.trials:+.2f} s "
          f"(rounds: {per_round})")
    print(f"SIGKILL inside a trial, then the rerun: {k / len(rows):.1f} s against {s / len(rows):.1f} s uninterrupted "
          f"(ratio {k / s:.3f}); the cut trial resumed at epoch {[row['resumed_at'] for row in rows]} "
          "(its checkpoint; the kill came inside the next chunk of 500)")


if __name__ == "__main__":
    main()
