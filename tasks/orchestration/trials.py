"""A sweep's trial as its own process: ``python flows/train_flow.py --config <trial>.json``, the
command a user runs, watched by the sweep (flows/sweep_flow.py).

- The process dies with the sweep's, even on SIGKILL (Linux: it asks the kernel for SIGKILL when
  its parent dies, ``prctl(PR_SET_PDEATHSIG)``, first thing, as a torchrun rank does): a rerun of
  the sweep never finds a trial still training from the killed one. It runs in its own session,
  so a Ctrl-C in the terminal reaches the sweep alone, which passes it on once.
- After each chunk the run writes its ``run.json``: the trial reads its validation metric from
  there, reports it to the study and asks the pruner; a trial to prune gets SIGTERM and stops at
  a checkpoint after its current batch, like any run stopped on request.
- Its output goes to ``<sweep>/trials/trial-NNN.log`` (appended by each attempt).
- Trials side by side share the cores: with ``--threads auto`` (and no ``$OMP_NUM_THREADS``),
  each gets its share (:func:`share_of_cores`), resolved when its run folder is made and kept
  with the run, as ``auto`` always is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import runpy
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.kernel import ROOT, atomic_write_json, auto_threads
from tasks.orchestration.server import die_with_parent
from tasks.storage.remote import is_url
from tasks.storage.store import LocalStore, ObjectStore

#: Exit statuses of a run stopped on request (SIGINT, SIGTERM): it stopped at a checkpoint.
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
#: The train command's status for a run its options made fail (bad input, a diverged lr).
OPTIONS_FAILED = 2


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial's process ended: ``COMPLETE`` (with its value), ``PRUNED``, ``FAIL`` (its
    options made the run fail), or ``STOPPED`` (the sweep itself was asked to stop)."""

    number: int
    state: str
    value: float | None = None
    message: str = ""


class TrialProcess:
    """One attempt of trial ``number``: its command, started at once, and what the sweep reads."""

    def __init__(self, folder: Path, config: dict[str, Any], number: int, metric: str, env: dict[str, str]):
        self.number, self.metric = number, metric
        self.record = record_reader(f"{str(config['artifacts_dir']).rstrip('/')}/{config['job']}/{config['run_name']}")
        trials = folder / "trials"
        self.config_file, self.log_file = trials / f"trial-{number:03d}.json", trials / f"trial-{number:03d}.log"
        trials.mkdir(exist_ok=True)
        atomic_write_json(self.config_file, config)
        with open(self.log_file, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tasks.orchestration.trials", str(os.getpid()), "flows/train_flow.py",
                 "--config", str(self.config_file)],
                cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.signalled: int | None = None

    def chunk_values(self) -> dict[int, float]:
        """The validation metric at the end of each chunk the run recorded: {epoch: value}."""
        chunks = (self.record("run.json") or {}).get("chunks", {})
        key = f"val_{self.metric}"
        return {int(row["epoch"]): float(row[key]) for row in chunks.values()
                if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])}

    def signal(self, signum: int) -> None:
        """Ask the run to stop at its next checkpoint (once: a second signal stops it at once)."""
        if self.signalled is None and self.process.poll() is None:
            self.signalled = signum
            self.process.send_signal(signum)

    def outcome(self, pruned: bool) -> TrialOutcome:
        """Once the process has ended: what the trial came to."""
        status, last = self.process.returncode, self.last_line()
        if status == 0 and not pruned:
            val = ((self.record("metrics.json") or {}).get("val") or {}).get(self.metric)
            if isinstance(val, (int, float)):
                return TrialOutcome(self.number, "COMPLETE", float(val))
            return TrialOutcome(self.number, "FAIL", message=f"no validation {self.metric} in its metrics.json")
        # Given up on: PRUNED, whether it stopped, ended (the stop came after its end) or diverged.
        if pruned and status in (0, OPTIONS_FAILED, *STOPPED):
            stopped = last.removeprefix("stopped: ").split("; rerun")[0]
            return TrialOutcome(self.number, "PRUNED", message=f"its run stopped: {stopped}" if status in STOPPED else last)
        if status in STOPPED and self.signalled is not None:
            return TrialOutcome(self.number, "STOPPED", message=last)
        if status == OPTIONS_FAILED:
            return TrialOutcome(self.number, "FAIL", message=last)
        raise RuntimeError(f"trial {self.number} ended with exit status {status}: {last} (its output: {self.log_file})")

    def last_line(self) -> str:
        """The last line the trial's command printed in this attempt."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line for line in reversed(lines) if line.strip()), "")


def record_reader(run: str) -> Any:
    """``read(name) -> dict | None``: a JSON file of the run at ``run`` (a folder, or a URL: read
    from the store, where the run's files are once its chunk or its end is recorded), through the
    run's own store."""
    store = ObjectStore(run) if is_url(run) else LocalStore(Path(run))

    def read(name: str) -> dict[str, Any] | None:
        try:
            return json.loads(store.read(name) or b"null")
        except ValueError:  # not JSON: no record to read
            return None

    return read


def share_of_cores(threads: int | str, processes: int) -> dict[str, str]:
    """The environment that gives each of ``processes`` trial processes (ranks included) its
    share of the cores, where the trials' ``threads`` is ``auto`` and the user set no
    $OMP_NUM_THREADS (which ``auto`` reads, per process); else nothing."""
    if threads != "auto" or os.environ.get("OMP_NUM_THREADS") or processes < 2:
        return {}
    return {"OMP_NUM_THREADS": str(auto_threads(processes))}


def watch(trial: TrialProcess, judge: Any, stop_requested: Any, every: float = 0.5) -> TrialOutcome:
    """Wait for the trial's process. Whenever its record holds new chunk values, ``judge({epoch:
    value}) -> prune?`` sees them all (None: no pruner, the record is not read); a trial to
    prune, or every trial once ``stop_requested()`` returns a signal, is asked to stop at its next
    checkpoint."""
    seen: dict[int, float] = {}
    pruned = False
    while trial.process.poll() is None:
        if (signum := stop_requested()) is not None:
            trial.signal(signum)
        if judge is not None and not pruned and (values := trial.chunk_values()) != seen:
            seen = values
            if judge(values):
                pruned = True
                trial.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            trial.process.wait(every)  # back at once when the trial ends
    return trial.outcome(pruned)


def child(argv: list[str]) -> None:
    """The trial's process (``python -m tasks.orchestration.trials <sweep pid> <script> <args>``):
    SIGKILLed when the sweep dies (gone at once if it is gone already); then ``python <script> <args>``."""
    die_with_parent(int(argv[0]), signal.SIGKILL)
    sys.argv = argv[1:]
    runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    child(sys.argv[1:])
