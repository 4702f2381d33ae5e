"""Hyperparameter sweeps: the search space, the sweep's folder and its Optuna study. No Prefect
here: flows/sweep_flow.py runs each trial as an ordinary training run and tells the study its
result.

- The space: ``--space NAME=KIND:ARGS``, KIND one of ``log:LOW:HIGH``, ``float:LOW:HIGH``,
  ``int:LOW:HIGH``, ``choice:A,B,...``; NAME is a training option (``lr``, ``batch_size``, ...).
- The folder ``<artifacts>/sweeps/<name>/`` holds ``sweep.json`` (what the sweep is), the study
  (``study.db``: Optuna's RDB storage on SQLite), one run folder per trial
  (``<job>/trial-NNN/``), ``trials.csv``, ``best_config.json`` and ``summary.md``. One sweep
  command at a time holds it (an OS lock), so a trial found RUNNING is one whose command died.
- Trials: each is an ordinary training run in its own process (tasks/orchestration/trials.py),
  ``--parallel K`` at a time. With ``--pruner``, each chunk's validation metric is reported to
  the study and a trial the pruner gives up on stops at a checkpoint (PRUNED).
- Resume: a trial found RUNNING is taken up again with its own parameters: its run folder
  resumes from its latest checkpoint (or only reports, if it had finished). The sampler is built
  for each new trial, seeded with the sweep's seed plus the number of trials asked so far, so
  with one trial at a time a resumed sweep asks for exactly the trials an uninterrupted one does,
  and the pruner judges each trial on the same reports.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.kernel import (
    TrainConfig,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from tasks.orchestration.trials import TrialOutcome
from tasks.storage.remote import Lease, Remote, is_url
from tasks.storage.store import staging_dir
from tasks.tracking import Tracker, check_installed, tracking_uri

#: Options that say where or how a run executes, not what it learns: a sweep does not vary them.
NOT_SWEPT = frozenset({"job", "data", "artifacts_dir", "run_name", "fresh", "wait_lock", "device", "keep_last",
                       "save_best", "num_workers", "threads", "nproc_per_node", "dist_backend", "oversubscribe",
                       "chunk_epochs", "eval_batch_size", "mlflow"})
SAMPLERS = ("tpe", "random", "grid")
#: The study's database when ``--study-db`` is not given (else ``study.db`` in the sweep's folder).
STUDY_DB_ENV = "TRAINFLOW_STUDY_DB"
PRUNERS = ("none", "median", "hyperband")
SPACE_HELP = ("NAME=KIND:ARGS, KIND one of log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, choice:A,B,...; "
              "e.g. --space lr=log:1e-4:1e-2 --space batch_size=choice:64,128,256")


def sweepable() -> list[str]:
    """The training options a sweep may vary."""
    return [name for name in TrainConfig.model_fields if name not in NOT_SWEPT]


def number(text: str) -> int | float:
    """``"64"`` -> 64, ``"1e-3"`` -> 0.001; ValueError otherwise."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def choice(text: str) -> int | float | str:
    """A choice as the option takes it: a number when it reads as one, else the text."""
    try:
        return number(text.strip())
    except ValueError:
        return text.strip()


def parse_dimension(text: str) -> tuple[str, Any]:
    """``NAME=KIND:ARGS`` -> (option name, Optuna distribution); UserError in one line."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    name, sep, rest = text.partition("=")
    kind, _, args = rest.partition(":")
    name = name.strip().replace("-", "_")
    if not sep or not args:
        raise UserError(f"--space {text!r}: write {SPACE_HELP}")
    if name not in sweepable():
        raise UserError(f"--space {text!r}: {name!r} is not an option a sweep can vary; choose from: "
                        f"{', '.join(sweepable())}")
    if kind == "choice":
        values = [choice(v) for v in args.split(",")]
        if len(set(values)) != len(values):
            raise UserError(f"--space {text!r}: a choice is listed twice")
        return name, CategoricalDistribution(values)
    if kind not in ("log", "float", "int"):
        raise UserError(f"--space {text!r}: unknown kind {kind!r}; use log, float, int or choice")
    try:
        low, high = (number(v) for v in args.split(":"))
    except ValueError:
        raise UserError(f"--space {text!r}: {kind} needs LOW:HIGH, two numbers") from None
    if not low < high:
        raise UserError(f"--space {text!r}: the low end must be below the high end")
    if kind == "log" and low <= 0:
        raise UserError(f"--space {text!r}: a log range needs a positive low end")
    if kind == "int":
        return name, IntDistribution(int(low), int(high))
    return name, FloatDistribution(float(low), float(high), log=kind == "log")


def ends(distribution: Any) -> list[Any]:
    """The values to check a dimension with: its choices, or the ends of its range."""
    return list(getattr(distribution, "choices", None) or (distribution.low, distribution.high))


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep is: the job's fixed options, the space, the budget, the sampler and its seed
    (the runs' ``--seed``); and where it lives. Built from the command's input: bad input is
    refused in one line before anything is written."""

    job: str
    fixed: dict[str, Any]
    space: dict[str, Any]
    trials: int
    sampler: str
    seed: int
    folder: Path
    direction: str
    metric: str
    pruner: str = "none"
    parallel: int = 1
    #: Where the sweep lives: ``folder`` itself, or a store URL (then ``folder`` is its local copy).
    where: str = ""
    #: The study's database (SQLAlchemy URL), None for ``study.db`` in the sweep's folder.
    study_db: str | None = None

    @property
    def url(self) -> str | None:
        """The sweep's store URL, None for a sweep in a local folder."""
        return self.where if is_url(self.where) else None

    @classmethod
    def of(cls, job: str, trials: int, space: list[str], sampler: str, name: str | None,
           options: dict[str, Any], pruner: str = "none", parallel: int = 1, study_db: str | None = None) -> SweepPlan:
        from tasks.jobs.registry import get_job

        spec = get_job(job)
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(f"--sweep-name {name!r}: use letters, digits, '.', '_' and '-'")
        if trials < 1:
            raise UserError(f"--trials {trials}: a sweep needs at least 1 trial")
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if pruner not in PRUNERS:
            raise UserError(f"unknown pruner {pruner!r}; choose one of: {', '.join(PRUNERS)}")
        check_installed(options.get("mlflow"))
        if parallel < 1:
            raise UserError(f"--parallel {parallel}: run at least 1 trial at a time")
        fixed = {k: v for k, v in options.items() if v is not None}
        dims = dict(parse_dimension(text) for text in space)
        if len(dims) < len(space):
            raise UserError("--space names an option twice; give each option one range")
        cfg = spec.config(**fixed)  # the fixed options alone first: their own errors name them
        check_space(spec, fixed, dims, sampler)
        if sampler == "grid" and trials > (points := math.prod(len(v) for v in grid_of(dims).values())):
            raise UserError(f"--trials {trials}: the grid has {points} points; ask for at most that many")
        what = describe(spec.name, fixed, dims, sampler, pruner)
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        where = f"{str(cfg.artifacts_dir).rstrip('/')}/sweeps/{name or f'sweep-{digest[:10]}'}"
        folder = staging_dir(where) if is_url(where) else Path(where)
        return cls(spec.name, fixed, dims, trials, sampler, cfg.seed, folder,
                   "maximize" if spec.monitor[1] else "minimize", spec.monitor[0], pruner, parallel, where,
                   database_url(study_db or os.environ.get(STUDY_DB_ENV)))

    def describe(self) -> dict[str, Any]:
        """sweep.json's content: what must stay the same for a rerun to continue this sweep
        (not the budget, nor how many trials run at a time)."""
        return describe(self.job, self.fixed, self.space, self.sampler, self.pruner)

    def config(self, params: dict[str, Any], number: int) -> TrainConfig:
        """The training config of trial ``number``."""
        from tasks.jobs.registry import get_job

        return get_job(self.job).config(**{**self.fixed, **params, "artifacts_dir": self.where,
                                           "run_name": f"trial-{number:03d}"})


def database_url(url: str | None) -> str | None:
    """``--study-db`` as SQLAlchemy takes it (``postgresql://`` through psycopg 3); UserError in one
    line for a scheme Optuna's storage cannot use here, or a missing driver."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres", "sqlite"):
        raise UserError(f"--study-db {url!r}: give a database URL, e.g. postgresql://user:pw@host:5432/optuna "
                        "(a database of its own, not the Prefect server's: both keep an alembic_version table)")
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    if scheme == "postgresql+psycopg":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UserError(f"--study-db {scheme}: needs psycopg: pip install -e '.[postgres]'") from None
    return f"{scheme}://{rest}"


def describe(job: str, fixed: dict[str, Any], space: dict[str, Any], sampler: str, pruner: str) -> dict[str, Any]:
    # Where the runs are logged is not what the sweep is: --mlflow does not rename it.
    what = {"job": job, "fixed": {k: str(v) for k, v in sorted(fixed.items()) if k != "mlflow"},
            "space": {k: repr(v) for k, v in sorted(space.items())}, "sampler": sampler}
    return what | ({"pruner": pruner} if pruner != "none" else {})  # sweeps made before pruners keep their name


def check_space(spec: Any, fixed: dict[str, Any], dims: dict[str, Any], sampler: str) -> None:
    """Each dimension is not also fixed, each of its values makes a valid config, and a grid
    has only choices and integers."""
    for name, dist in dims.items():
        if name in fixed:
            raise UserError(f"--{name.replace('_', '-')} is both fixed and in --space; give one")
        for value in ends(dist):
            try:
                spec.config(**{**fixed, name: value})
            except (ValidationError, UserError) as exc:
                why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                raise UserError(f"--space {name}: {value!r} is not a valid --{name.replace('_', '-')}: {why}") from None
        if sampler == "grid" and not hasattr(dist, "choices") and type(dist).__name__ != "IntDistribution":
            raise UserError(f"--sampler grid needs choices or int ranges; --space {name} is a float range")


def grid_of(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value of each dimension (choices and int ranges), for the grid sampler."""
    return {k: list(getattr(d, "choices", None) or range(d.low, d.high + 1)) for k, d in space.items()}


class Sweep:
    """The sweep's folder and study, held by this process: an OS lock on a local folder, the
    store's lease on a sweep on a store (whose files this process keeps in a local copy)."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self.lock: Any = None
        self.store = SweepStore(plan.url, plan.folder, with_study=plan.study_db is None) if plan.url else None
        # A database of its own holds one study per sweep, named by where the sweep lives.
        self.study_name = f"trainflow:{plan.where}" if plan.study_db else "sweep"

    def __enter__(self) -> Sweep:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.plan.folder.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.plan.folder / ".lock", "a+")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise UserError(f"another sweep command holds {self.plan.where}; wait for it, or stop it") from None
        if self.store is not None:
            self.store.hold()  # the lease, then the store's copy of the sweep's files
        self.check_same_sweep()
        # One storage object for the sweep: its SQLAlchemy sessions are thread-safe, and trial
        # threads report through it (Optuna's own n_jobs threads share one the same way).
        self.storage = optuna.storages.RDBStorage(self.plan.study_db or f"sqlite:///{self.plan.folder / 'study.db'}")
        optuna.create_study(storage=self.storage, study_name=self.study_name, direction=self.plan.direction,
                            load_if_exists=True)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.store is not None:
                self.store.release()
        finally:
            with contextlib.suppress(OSError):
                self.lock.close()

    def sync(self) -> None:
        """A sweep on a store: its files as they are now, there (after each trial is told)."""
        if self.store is not None:
            self.store.push()

    def check_same_sweep(self) -> None:
        """sweep.json: written once; a rerun with another space or other options is refused."""
        path, now = self.plan.folder / "sweep.json", {**self.plan.describe(), "seed": self.plan.seed}
        saved = read_json(path)
        if saved is None:
            atomic_write_json(path, now)
        elif saved != now:
            raise UserError(f"{self.plan.where} holds a sweep with other options or another space; "
                            "give this one another --sweep-name")

    def study(self, sampler: Any = None) -> Any:
        import optuna

        return optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                 pruner=self.pruner())

    def pruner(self) -> Any:
        """The plan's pruner, judging from the third trial on (median) or by Hyperband's brackets
        over the run's epochs; the steps are the epochs at which chunks end."""
        from optuna import pruners

        if self.plan.pruner == "median":
            return pruners.MedianPruner(n_startup_trials=2)
        if self.plan.pruner == "hyperband":  # epochs in the space: the longest finished trial's
            cfg = self.plan.config({}, 0)
            return pruners.HyperbandPruner(min_resource=min(cfg.chunk_epochs, cfg.epochs),
                                           max_resource="auto" if "epochs" in self.plan.space else cfg.epochs)
        return pruners.NopPruner()

    def trials(self, *states: str) -> list[Any]:
        """The study's trials (in number order), of the given states (names, e.g. COMPLETE)."""
        from optuna.trial import TrialState

        return self.study().get_trials(deepcopy=False, states=tuple(TrialState[s] for s in states) or None)

    def next_trial(self, running: set[int] = frozenset()) -> tuple[int, dict[str, Any]]:
        """A trial whose command died (RUNNING, not one of ``running``, this command's own),
        taken up again; else a new one from the sampler."""
        from optuna.trial import TrialState

        for trial in self.trials("RUNNING"):
            if trial.number in running:
                continue
            if set(trial.params) == set(self.plan.space):
                return trial.number, trial.params
            self.study().tell(trial.number, state=TrialState.FAIL)  # killed inside ask: no run, not counted
        trial = self.study(self.sampler(self.plan.seed + self.asked())).ask(fixed_distributions=self.plan.space)
        return trial.number, trial.params

    def sampler(self, seed: int) -> Any:
        from optuna import samplers

        if self.plan.sampler == "grid":
            return samplers.GridSampler(grid_of(self.plan.space), seed=self.plan.seed)
        if self.plan.sampler == "random":
            return samplers.RandomSampler(seed=seed)
        # The constant liar keeps trials running side by side apart (no effect one at a time).
        return samplers.TPESampler(seed=seed, constant_liar=True)

    def judge(self, number: int, values: dict[int, float]) -> bool:
        """Report trial ``number``'s chunk values ({epoch: value}) not yet in the study, in order;
        True as soon as the pruner gives the trial up (then nothing later is reported). A trial
        taken up again is first judged on what it had reported: the same decision as before."""
        import optuna

        trial_id = self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(self.study_name), number)
        trial, known = optuna.trial.Trial(self.study(), trial_id), self.storage.get_trial(trial_id).intermediate_values
        if known and trial.should_prune():
            return True
        for epoch in sorted(set(values) - set(known)):
            trial.report(values[epoch], epoch)
            if trial.should_prune():
                return True
        return False

    def tell(self, outcome: TrialOutcome) -> None:
        """What the trial came to: its value, pruned (at its last report), or failed."""
        from optuna.trial import TrialState

        if outcome.state == "COMPLETE" and outcome.value is not None and math.isfinite(outcome.value):
            self.study().tell(outcome.number, outcome.value)
        else:
            self.study().tell(outcome.number, state=TrialState.PRUNED if outcome.state == "PRUNED" else TrialState.FAIL)

    def asked(self) -> int:
        """Trials the sampler gave parameters to (a trial cut inside the study's ask had none)."""
        return sum(set(t.params) == set(self.plan.space) for t in self.trials())

    def done(self) -> int:
        """Trials finished by their run: a trial cut inside the study's ask had none."""
        return sum(set(t.params) == set(self.plan.space) for t in self.trials("COMPLETE", "PRUNED", "FAIL"))

    def best(self) -> Any | None:
        complete = self.trials("COMPLETE")
        if not complete:
            return None
        pick = max if self.plan.direction == "maximize" else min
        return pick(complete, key=lambda t: t.value)


def trial_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, parameters, run folder, seconds."""
    rows = []
    for t in sweep.trials():
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"trial": t.number, "state": t.state.name, sweep.plan.metric: t.value,
                     **{k: t.params.get(k) for k in sweep.plan.space},
                     "run_folder": f"{sweep.plan.job}/trial-{t.number:03d}", "seconds": seconds})
    return rows


def write_outputs(sweep: Sweep) -> dict[str, Any] | None:
    """trials.csv, best_config.json and summary.md in the sweep's folder; the best trial's row."""
    rows, folder = trial_rows(sweep), sweep.plan.folder
    if not rows:
        return None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "trials.csv", buf.getvalue())
    best = sweep.best()
    if best is not None:
        cfg = sweep.plan.config(best.params, best.number).model_dump(mode="json", exclude={"run_name", "fresh", "wait_lock"})
        atomic_write_json(folder / "best_config.json", {k: v for k, v in cfg.items() if k != "artifacts_dir"})
    atomic_write_text(folder / "summary.md", summary_markdown(sweep, rows, best))
    plot_study(sweep.plan, [r for r in rows if r["state"] == "COMPLETE"])
    return None if best is None else next(r for r in rows if r["trial"] == best.number)


def summary_markdown(sweep: Sweep, rows: list[dict[str, Any]], best: Any) -> str:
    """The sweep at a glance: the best trial, the command that trains it, every trial."""
    plan = sweep.plan
    lines = [f"# Sweep of {plan.job}: {plan.direction} validation {plan.metric}", ""]
    if best is not None:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in {**plan.fixed, **best.params}.items()
                         if k not in ("artifacts_dir", "mlflow"))
        lines += [f"Best: trial {best.number}, {plan.metric} {best.value:.6g}.", "",
                  f"    python flows/train_flow.py --job {plan.job} {flags}", ""]
    lines += [*(f"![{name}]({name})" for name in PLOTS), ""]
    names = list(rows[0])
    lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join("" if r[n] is None else f"{r[n]:.6g}" if isinstance(r[n], float) else str(r[n])
                                for n in names) + " |" for r in rows]
    return "\n".join(lines) + "\n"


#: The study's plots, in the sweep's folder (and linked from summary.md).
PLOTS = ("history.png", "parameters.png")
#: What a sweep writes for its user (write_outputs), beside sweep.json and its study.
OUTPUTS = ("trials.csv", "best_config.json", "summary.md", *PLOTS)


def plot_study(plan: SweepPlan, done: list[dict[str, Any]]) -> None:
    """history.png: each finished trial's value and the best so far; parameters.png: the
    metric against each parameter of the space (log axes for log ranges)."""
    from tasks.jobs.plots import new_figure, save_png

    values = [r[plan.metric] for r in done]
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    ax.plot([r["trial"] for r in done], values, "o", label="trial")
    pick = max if plan.direction == "maximize" else min
    ax.step([r["trial"] for r in done], [pick(values[: i + 1]) for i in range(len(values))], where="post",
            label="best so far")
    ax.set(xlabel="trial", ylabel=f"validation {plan.metric}", title=f"Sweep of {plan.job}")
    ax.legend()
    save_png(fig, plan.folder / PLOTS[0])
    fig = new_figure(4 * len(plan.space), 4)
    for i, (name, dist) in enumerate(plan.space.items()):
        ax = fig.add_subplot(1, len(plan.space), i + 1)
        ax.plot([str(r[name]) if hasattr(dist, "choices") else r[name] for r in done], values, "o")
        ax.set(xlabel=name, ylabel=f"validation {plan.metric}" if i == 0 else None)
        if getattr(dist, "log", False):
            ax.set_xscale("log")
    save_png(fig, plan.folder / PLOTS[1])


def open_tracker(plan: SweepPlan, logger: Any) -> Tracker | None:
    """The sweep's MLflow run, parent of its trials' runs (tasks/tracking.py), when one is asked for."""
    return Tracker.open(
        tracking_uri(plan.fixed.get("mlflow")), os.environ.get("MLFLOW_EXPERIMENT_NAME") or plan.job,
        key=plan.url or str(plan.folder.resolve()), name=f"sweep {plan.folder.name}", logger=logger,
        tags={"trainflow.sweep_dir": plan.url or str(plan.folder.resolve())},
        params={"trials": plan.trials, "sampler": plan.sampler, "pruner": plan.pruner, "parallel": plan.parallel,
                "seed": plan.seed, **{f"space.{k}": repr(v) for k, v in plan.space.items()},
                **{k: v for k, v in plan.fixed.items() if k != "mlflow"}})


def end_tracker(tracker: Tracker | None, plan: SweepPlan, best: dict[str, Any] | None) -> None:
    """A finished sweep's figures and files in its MLflow run."""
    if tracker is None:
        return
    if best is not None:
        tracker.metrics({f"best_val_{plan.metric}": best[plan.metric], "best_trial": best["trial"]}, plan.trials)
    tracker.files([plan.folder / name for name in OUTPUTS])
    tracker.end("FINISHED")


class SweepStore:
    """A sweep on a store: its lease (one sweep command at a time, across machines: a RUNNING
    trial found at the start is one whose command died) and its own files (sweep.json, the study,
    the outputs), kept in a local folder, fetched at the start and sent after each told trial.
    The trials' runs are ordinary runs on the store, under the sweep's URL."""

    #: The sweep's own files on the store (its trials' runs sit beside them, in their folders).
    FILES = ("sweep.json", "study.db", *OUTPUTS)

    def __init__(self, url: str, folder: Path, with_study: bool = True):
        self.remote, self.folder = Remote(url), folder
        self.files = self.FILES if with_study else tuple(f for f in self.FILES if f != "study.db")
        self.lease: Lease | None = None

    def hold(self) -> None:
        """Take the lease (refused in one line while another command holds it), then fetch."""
        try:
            self.lease = Lease(self.remote).acquire()
        except UserError:
            held, _ = Lease(self.remote).holder()
            raise UserError(f"another sweep command holds {self.remote.url} (pid {held.get('pid', '?')} on "
                            f"{held.get('host', '?')}, lease until {held.get('expires_utc', '?')}); wait for it, "
                            "or stop it (a killed one's lease runs out by then)") from None
        for name in self.files:  # each by name: a listing would walk every trial's checkpoints
            (self.folder / name).unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                atomic_write_bytes(self.folder / name, self.remote.get(name))

    def push(self) -> None:
        """Each file, the study as a consistent copy (SQLite's backup: trials report meanwhile)."""
        import sqlite3

        snapshot = self.folder / ".study.db.snapshot"
        if "study.db" in self.files:
            with contextlib.closing(sqlite3.connect(self.folder / "study.db")) as db, \
                    contextlib.closing(sqlite3.connect(snapshot)) as copy:
                db.backup(copy)
        for name in self.files:
            path = snapshot if name == "study.db" else self.folder / name
            if path.exists():
                self.lease.check()  # fenced: a command that lost the sweep writes nothing more
                self.remote.put(name, path.read_bytes())
        snapshot.unlink(missing_ok=True)

    def release(self) -> None:
        if self.lease is None:
            return
        try:
            if self.lease.lost is None and (self.folder / "sweep.json").exists():
                self.push()
        finally:
            self.lease.release()
