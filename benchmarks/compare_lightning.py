"""Ours against a competent PyTorch Lightning script of the same job, side by side, interleaved.

    pip install -e '.[bench]'                     # Lightning: a benchmark-only dependency
    python benchmarks/compare_lightning.py [nonlinear|fashion_mnist|fashion_png] [--rounds N] [--quick]
                                           [--prefect-api-url URL] [--data D --num-workers N] [--epochs N]
                                           [--no-resume]

Ours runs as a user runs it: ``python flows/train_flow.py --job JOB --artifacts-dir DIR
--run-name NAME`` (with no PREFECT_API_URL it starts its own temporary Prefect server). The
baseline is benchmarks/lightning_job.py (its docstring lists its settings). Each round runs both
sides in turn, the first side alternating (ABBA), so load from other processes hits both.

Printed, as ours / Lightning (medians over rounds):
- whole run: wall time, and CPU time of the command and every process it started;
- launch -> first checkpoint: both observed (a complete checkpoint file on disk);
- launch -> first epoch: Lightning observed (a line printed by a callback); ours does not log
  single epochs, so its first epoch is estimated from its chunk-1 log line (chunk end minus the
  chunk's other epochs at the chunk's own rate); where that line cannot be read, chunk 1's end;
- kill -> first resumed epoch / checkpoint: a run is SIGKILLed (its whole process group) as
  soon as its first checkpoint is complete; the same command is then run again and timed from
  its start to its first newly finished epoch (estimated for ours, as above) and checkpoint.
And both runs' final test metric (ours: its metrics.json; Lightning: trainer.test).

The floor: each round also runs benchmarks/plain_job.py, the same job's arithmetic in a plain
PyTorch loop with nothing around it (no checkpoints), and prints its whole run against both
sides: a ratio to Lightning below the plain loop's is out of reach for any tool that runs the
same arithmetic on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.measure import ROOT, Launch, become_subreaper, files, first_line_time, new_files
from tasks.jobs.registry import get_job
from tasks.kernel import TrainConfig

#: --quick: a smoke run of each job, a few chunks long.
QUICK = {"nonlinear": {"epochs": 300, "chunk_epochs": 100}, "fashion_mnist": {"epochs": 2, "chunk_epochs": 1},
         "fashion_png": {"epochs": 2, "chunk_epochs": 1}}
#: Jobs named by import path (the Dataset path's FashionMNIST recipe, tasks/jobs/fashion_png.py).
JOB_PATHS = {"fashion_png": "tasks.jobs.fashion_png.JOB"}
RUN_TIMEOUT_S = 3600.0
#: ours' chunk log line: "chunk 1: epochs 1-1000/10000, ..., 123456 samples/s, ..."
CHUNK_LINE = re.compile(r"chunk (\d+): epochs (\d+)-(\d+)/\d+,.*?([\d.]+) samples/s")
FIRST_EPOCH_MARK = "lightning: first epoch of this process done"  # printed by lightning_job.py
OURS_CKPT, LIGHTNING_CKPT = "checkpoint-*.json", "epoch=*.ckpt"  # ours: the manifest completes one


class Side:
    """How to run one side and where its observable events are."""

    def __init__(self, name: str, cfg: TrainConfig, tmp: Path, overrides: dict, env: dict):
        self.name, self.cfg, self.tmp, self.overrides, self.env = name, cfg, tmp, overrides, env

    def command(self, folder: Path) -> list[str]:
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in self.overrides.items()]
        if self.name == "ours":
            return [sys.executable, "flows/train_flow.py", "--job", self.cfg.job, "--artifacts-dir",
                    str(folder), "--run-name", "bench", *extra]
        return [sys.executable, f"benchmarks/{self.name}_job.py", "--job", self.cfg.job, "--out", str(folder),
                "--split", str(self.tmp / "split.pt"), *extra]

    @property
    def checkpoints(self) -> bool:
        """Whether it writes checkpoints (the plain loop writes none: a whole run is all it has)."""
        return self.name != "plain"

    def ckpt_dir(self, folder: Path) -> Path:
        return folder / self.cfg.job / "bench" / "checkpoints" if self.name == "ours" else folder / "checkpoints"

    def ckpt_pattern(self) -> str:
        return OURS_CKPT if self.name == "ours" else LIGHTNING_CKPT

    def resumable(self, folder: Path) -> bool:
        """A complete checkpoint a rerun resumes from is on disk."""
        if self.name == "ours":
            return bool(files(self.ckpt_dir(folder), OURS_CKPT))
        return (self.ckpt_dir(folder) / "last.ckpt").exists()  # written after the epoch's checkpoint

    def launch(self, folder: Path, tag: str) -> Launch:
        return Launch(self.command(folder), self.tmp / f"{tag}.log", self.env).start()

    def test_metric(self, folder: Path) -> dict:
        path = folder / self.cfg.job / "bench" / "metrics.json" if self.name == "ours" else folder / "metrics.json"
        test = json.loads(path.read_text())["test"]
        return {k.removeprefix("test_"): v for k, v in test.items() if k != "rows"}


def chunk_line(run: Launch, chunk: int) -> re.Match | None:
    """Ours' log line for chunk ``chunk``, once printed."""
    return next((m for _, line in run.lines if (m := CHUNK_LINE.search(line)) and int(m.group(1)) == chunk), None)


def first_epoch(side: Side, run: Launch, ckpt_at: float | None, chunk: int,
                steps_samples: int) -> tuple[float | None, str]:
    """Seconds from launch to the end of the first epoch this process trained, and how it was
    found; ``chunk`` is the first chunk it finished (ours)."""
    if side.name == "lightning":
        return first_line_time(run, FIRST_EPOCH_MARK), "observed"
    m = chunk_line(run, chunk)
    if m and ckpt_at is not None:
        epochs, rate = int(m.group(3)) - int(m.group(2)) + 1, float(m.group(4))
        # The chunk's epochs take equal time at its mean rate: the first ended (epochs - 1)
        # epochs before the chunk's checkpoint.
        return ckpt_at - (epochs - 1) * steps_samples / rate, "estimated from its chunk's log line"
    return ckpt_at, "its chunk's end (no chunk log line found)"


def check_ok(side: Side, run: Launch, rc: int | None) -> None:
    """Stop the benchmark, with the tail of the log, when a command failed."""
    if rc not in (None, 0):
        sys.exit(f"{side.name} failed (exit {rc}); its output is in {run.log_path}:\n{run.text()[-3000:]}")


def whole_run(side: Side, tag: str, steps_samples: int) -> dict:
    """One full run: wall, CPU, first checkpoint, first epoch, test metric (the plain loop,
    which has no checkpoints: wall, CPU and test metric)."""
    folder = side.tmp / tag
    run = side.launch(folder, tag)
    if not side.checkpoints:
        wall, cpu, rc = run.finish(RUN_TIMEOUT_S)
        check_ok(side, run, rc)
        return {"wall": wall, "cpu": cpu, "test": side.test_metric(folder)}
    ckpt_at = run.wait_for(new_files(side.ckpt_dir(folder), side.ckpt_pattern(), set()), RUN_TIMEOUT_S)
    wall, cpu, rc = run.finish(RUN_TIMEOUT_S)
    check_ok(side, run, rc)
    epoch_at, how = first_epoch(side, run, ckpt_at, 1, steps_samples)
    return {"wall": wall, "cpu": cpu, "ckpt": ckpt_at, "epoch": epoch_at, "epoch_how": how,
            "test": side.test_metric(folder), "log": run.text()}


def kill_and_resume(side: Side, tag: str, steps_samples: int) -> dict:
    """SIGKILL a run once its first checkpoint is complete, rerun the same command, and time the
    rerun to its first newly finished epoch and checkpoint (then stop it: the rest is not timed)."""
    folder = side.tmp / tag
    first = side.launch(folder, f"{tag}-killed")
    if first.wait_for(lambda: side.resumable(folder), RUN_TIMEOUT_S) is None:
        check_ok(side, first, first.proc.poll())
        sys.exit(f"{side.name}: no checkpoint before the run ended; see {first.log_path}")
    first.kill()
    first.finish(60)
    before = files(side.ckpt_dir(folder), side.ckpt_pattern())
    rerun = side.launch(folder, f"{tag}-rerun")
    ckpt_at = rerun.wait_for(new_files(side.ckpt_dir(folder), side.ckpt_pattern(), before), RUN_TIMEOUT_S)
    if ckpt_at is None:
        check_ok(side, rerun, rerun.proc.poll())
    chunk = len(before) + 1  # ours: the chunk whose checkpoint is the new one
    if side.name == "ours":
        rerun.wait_for(lambda: chunk_line(rerun, chunk) is not None, 10)  # logged after the checkpoint
    rerun.kill()
    rerun.finish(60)
    epoch_at, how = first_epoch(side, rerun, ckpt_at, chunk, steps_samples)
    return {"ckpt": ckpt_at, "epoch": epoch_at, "epoch_how": how}


def save_split(cfg: TrainConfig, path: Path) -> int:
    """Our run's split, made by our own code, for the Lightning script; returns the training
    rows. (Imported here: tasks.storage.data imports Prefect, which the Lightning side must not pay for.)"""
    from tasks.storage.data import load_job_data, make_split

    data = load_job_data(cfg)
    split = make_split(data, cfg)
    torch.save(split, path)
    return len(split["train"])


def ours_env(api_url: str | None) -> dict[str, str]:
    """The environment a user's shell would give: a server URL only if one was asked for."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def prefect_mode(log: str, api_url: str | None) -> str:
    """Which Prefect server ours used, as its own output says."""
    m = re.search(r"Starting temporary server on (\S+)", log)
    if m:
        return f"temporary server started by the command itself ({m.group(1)}; PREFECT_API_URL unset)"
    if api_url:
        return f"the running server at {api_url} (PREFECT_API_URL)"
    return "unknown: no temporary-server line in its output and no --prefect-api-url (a profile may name a server)"


def one_round(sides: list[Side], r: int, steps_samples: int, resume: bool = True) -> dict[str, dict]:
    """Round ``r``: a whole run of each side (and of the plain loop), then (``resume``) a kill ->
    resume of each side; the order alternates."""
    order = sides if r % 2 else sides[::-1]
    out = {s.name: {} for s in sides}
    for s in order:
        out[s.name].update(whole_run(s, f"{s.name}-r{r}", steps_samples))
    for s in order[::-1] if resume else []:
        if s.checkpoints:
            out[s.name]["resume"] = kill_and_resume(s, f"{s.name}-kill-r{r}", steps_samples)
    return out


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} s"


def ratio_line(name: str, ours: list, theirs: list, note: str = "",
               names: tuple[str, str] = ("ours", "Lightning")) -> None:
    """One measure, medians over rounds, and the per-round ratios (``names``: the two sides)."""
    a_name, b_name = names
    o = [x for x in ours if x is not None]
    t = [x for x in theirs if x is not None]
    if not o or not t:
        print(f"  {name}: {a_name} {o}, {b_name} {t}: not measured")
        return
    mo, mt = statistics.median(o), statistics.median(t)
    per = " ".join(f"{a / b:.3f}" for a, b in zip(ours, theirs) if a is not None and b is not None)
    print(f"  {name}: {a_name} {fmt(mo)} / {b_name} {fmt(mt)} = {mo / mt:.3f} (rounds: {per}){note}")


def report(results: list[dict[str, dict]], mode: str) -> None:
    """The ratios (ours / Lightning, and against the plain loop) and every run's test metrics."""
    ours, light, plain = ([r[k] for r in results] for k in ("ours", "lightning", "plain"))

    def col(rows: list[dict], *keys: str) -> list:
        return [r[keys[0]] if len(keys) == 1 else r[keys[0]][keys[1]] for r in rows]

    print(f"\nours: Prefect mode: {mode}")
    print(f"ratios, ours / Lightning (medians of {len(results)} round(s)):")
    ratio_line("whole run, wall time", col(ours, "wall"), col(light, "wall"))
    ratio_line("whole run, CPU time (the command and every process it started)", col(ours, "cpu"), col(light, "cpu"))
    ratio_line("launch -> first epoch", col(ours, "epoch"), col(light, "epoch"),
               f"; ours' first epoch: {ours[0]['epoch_how']}")
    ratio_line("launch -> first checkpoint (both observed)", col(ours, "ckpt"), col(light, "ckpt"))
    if "resume" in ours[0]:
        resumes(ours, light, col)
    print("the floor, the same job in a plain PyTorch loop with nothing around it (whole run, wall time):")
    ratio_line("plain loop / Lightning", col(plain, "wall"), col(light, "wall"), names=("plain", "Lightning"))
    ratio_line("ours / plain loop", col(ours, "wall"), col(plain, "wall"), names=("ours", "plain"))
    print("final test metrics (the trained model on the test set):")
    for name, rows in (("ours (metrics.json)", ours), ("Lightning (trainer.test)", light),
                       ("plain loop", plain)):
        shown = "; ".join(", ".join(f"{k} {v:.6g}" for k, v in sorted(r["test"].items())) for r in rows)
        print(f"  {name}: {shown}")


def resumes(ours: list[dict], light: list[dict], col) -> None:
    """The kill -> resume rows."""
    ratio_line("kill -> first resumed epoch", col(ours, "resume", "epoch"), col(light, "resume", "epoch"),
               f"; ours: {ours[0]['resume']['epoch_how']}")
    ratio_line("kill -> first new checkpoint (both observed)", col(ours, "resume", "ckpt"),
               col(light, "resume", "ckpt"))


def header(cfg: TrainConfig, rounds: int, quick: bool) -> None:
    """What is measured, on what code and machine."""
    import subprocess
    import time

    import lightning

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, HEAD {head or '?'}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, lightning {lightning.__version__}")
    print(f"{cfg.job}: {cfg.epochs} epochs, a checkpoint every {cfg.chunk_epochs}, model {cfg.model}, "
          f"{cfg.optimizer} lr {cfg.lr}, schedule {cfg.schedule}, batch {cfg.batch_size}; {rounds} round(s), "
          f"interleaved{' (--quick)' if quick else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?", default="nonlinear", choices=sorted(QUICK))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=f"a smoke run: a few epochs ({QUICK})")
    p.add_argument("--prefect-api-url", help="run ours against this running Prefect server")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders and logs")
    p.add_argument("--data", help="the job's --data, on every side (fashion_png: the exported images)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers of a Dataset job, on every side")
    p.add_argument("--epochs", type=int, help="the run's epochs, on every side (default: the job's)")
    p.add_argument("--no-resume", action="store_true", help="whole runs only, no kill -> resume runs")
    a = p.parse_args()
    become_subreaper()
    given = {k: v for k, v in (("data", a.data), ("num_workers", a.num_workers), ("epochs", a.epochs)) if v is not None}
    overrides = {**(QUICK[a.job] if a.quick else {}), **given}
    cfg = get_job(JOB_PATHS.get(a.job, a.job)).config(**overrides)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{a.job}-"))
    header(cfg, a.rounds, a.quick)
    n_train = save_split(cfg, tmp / "split.pt")
    steps_samples = n_train // cfg.batch_size * cfg.batch_size  # samples per epoch (drop_last)
    sides = [Side("ours", cfg, tmp, overrides, ours_env(a.prefect_api_url)),
             Side("lightning", cfg, tmp, overrides, None), Side("plain", cfg, tmp, overrides, None)]
    results = []
    for r in range(1, a.rounds + 1):
        res = one_round(sides, r, steps_samples, resume=not a.no_resume)
        results.append(res)
        print(f"round {r}: " + " | ".join(
            f"{n}: wall {fmt(x['wall'])}, CPU {fmt(x['cpu'])}" + ("" if n == "plain" else
            f", first epoch {fmt(x['epoch'])}, first checkpoint {fmt(x['ckpt'])}" +
            (f", resumed epoch {fmt(x['resume']['epoch'])}" if "resume" in x else "")) for n, x in res.items()),
            flush=True)
    report(results, prefect_mode(results[0]["ours"]["log"], a.prefect_api_url))
    if a.keep:
        print(f"runs and logs kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
