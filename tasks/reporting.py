"""What a run is doing and what it produced, in the Prefect UI and in the run folder.

Called from the flow body (``flows/train_flow.py`` ``run_job``), never with tensors:

- :meth:`RunReport.start` once per attempt: ``run.json`` (:class:`tasks.storage.records.RunRecord`), the job's
  ``latest`` pointer, a Prefect progress artifact.
- :meth:`RunReport.chunk_done` after every chunk: TensorBoard events for the new epochs, the
  chunk's row (and the attempt's resume) in ``run.json``, the progress artifact.
- :meth:`RunReport.finish` at the end: ``loss.png``, ``summary.md``, Prefect markdown and
  table artifacts, and ``run.json`` with status ``completed`` and the sha256 of every file.

Everything is derived from what is on disk (``history.csv``, checkpoint manifests,
``run.json``), so a resumed or retried run reports exactly as an uninterrupted one would.
Observability never breaks training: a failing Prefect call, TensorBoard write or plot is a warning.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tasks.kernel import atomic_write_text, fsync_dir, sha256_file, utc_now
from tasks.storage.history import duration, eta_seconds, read_history
from tasks.storage.records import RUN_FILE, ChunkResult, RunRecord
from tasks.storage.remote import LeaseLost
from tasks.storage.run import Run
from tasks.storage.store import LATEST, LOCK_FILE, OWNER_FILE
from tasks.tracking import OUTPUTS, Tracker, final_metrics, tracking_uri

log = logging.getLogger("trainflow.reporting")

SUMMARY_FILE = "summary.md"
LOSS_PNG = "loss.png"
TB_DIR = "tensorboard"
#: Not hashed into run.json: run.json itself and the lock files of whoever holds the folder.
UNHASHED = frozenset({RUN_FILE, LOCK_FILE, OWNER_FILE})
PROGRESS = "create the progress artifact"
#: history column -> TensorBoard tag (other ``val_<m>`` columns become ``<M>/val``).
TB_TAGS = {"train_loss": "Loss/train", "val_loss": "Loss/val", "val_accuracy": "Accuracy/val", "lr": "LearningRate"}


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes only (Prefect's rule for artifact keys)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def artifact_key(job: str, run_name: str, kind: str) -> str:
    """``<job>-<run>-<kind>``, e.g. ``nonlinear-run-8f957a76e2-progress``, ``fashion-mnist-r-summary``."""
    return slug(f"{job}-{run_name}-{kind}")


# --- TensorBoard -----------------------------------------------------------------------------


def tb_tag(column: str) -> str | None:
    """TensorBoard tag for a history column (None for ``epoch``)."""
    if column in TB_TAGS:
        return TB_TAGS[column]
    return f"{column[4:].capitalize()}/val" if column.startswith("val_") else None


def summary_writer(tb_dir: Path, purge_step: int) -> tuple[Any, Path]:
    """A SummaryWriter whose new events file sorts after every file already in ``tb_dir``.

    Readers load a folder's files in name order and a purge hides steps of the files read before
    it, so the new file must come last. SummaryWriter names it ``...tfevents.<second>.<host>.<pid>.<n>``,
    ``n`` counting writers in this process without zero padding (``.10`` sorts before ``.9``):
    in that rare clash within one second, drop the file and wait for the next second."""
    from torch.utils.tensorboard import SummaryWriter

    while True:
        before = sorted(p.name for p in tb_dir.glob("*tfevents*"))
        # A long queue: its writer thread then writes in big batches instead of waking for every
        # 10 scalars; close() writes the rest.
        writer = SummaryWriter(str(tb_dir), purge_step=purge_step, max_queue=1 << 16)  # creates its file
        new = sorted({p.name for p in tb_dir.glob("*tfevents*")} - set(before))
        if not before or new[-1] > before[-1]:
            return writer, tb_dir / new[-1]
        writer.close()
        (tb_dir / new[-1]).unlink()
        time.sleep(1.0 - time.time() % 1.0)


def write_tensorboard(run_dir: Path, history: dict[str, list[float]], first: int) -> int:
    """Write epochs ``first``.. of ``history`` to ``<run>/tensorboard`` (step = 1-based epoch);
    return the history's last epoch.

    ``purge_step=first`` makes TensorBoard drop steps >= ``first`` from the files before this
    one, so epochs written again (after a kill between a checkpoint and its events, or a resume
    from an older checkpoint) show once, with the history's values."""
    epochs = [int(e) for e in history.get("epoch", [])]
    rows = [i for i, e in enumerate(epochs) if e >= first]
    if rows:
        tb_dir = Path(run_dir) / TB_DIR
        tb_dir.mkdir(exist_ok=True)
        tags = {c: tb_tag(c) for c in history if tb_tag(c)}
        writer, path = summary_writer(tb_dir, first)
        try:
            for i in rows:
                for column, tag in tags.items():
                    writer.add_scalar(tag, history[column][i], epochs[i])
        finally:
            writer.close()
        with open(path, "rb") as f:  # on disk before run.json says these epochs are written
            os.fsync(f.fileno())
        fsync_dir(tb_dir)
    return epochs[-1] if epochs else 0


# --- the run's files ------------------------------------------------------------------------


def hash_files(run: Run) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of the run, except run.json, the lock files and hidden
    temp files; committed checkpoints are listed from their manifests (on a store they are not
    in the local folder)."""
    out = {f"checkpoints/{m.file}": {"sha256": m.sha256, "bytes": m.bytes} for m in run.store.checkpoints.manifests()}
    for path in sorted(run.dir.rglob("*")):
        rel = path.relative_to(run.dir)
        if path.is_file() and rel.as_posix() not in UNHASHED and not any(p.startswith(".") for p in rel.parts):
            out[rel.as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def verify_hashes(run_dir: Path) -> list[str]:
    """Files whose sha256 differs from run.json's record (empty when all match)."""
    record = RunRecord.parse((Path(run_dir) / RUN_FILE).read_bytes()) if (Path(run_dir) / RUN_FILE).exists() else None
    return [rel for rel, info in ((record.files or {}) if record else {}).items()
            if not (Path(run_dir) / rel).is_file() or sha256_file(Path(run_dir) / rel) != info["sha256"]]


def resolve_run(path: Path) -> Path:
    """A run folder from a path that may be a ``latest`` pointer (a file; a symlink before)."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return path.parent / path.read_text().strip()
    return path.resolve() if path.is_symlink() else path


# --- markdown --------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    """A value for a markdown cell: floats to 6 significant digits, dicts as ``key value, ...``."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return json.dumps(v, default=str)
    return str(v)


def is_matrix(value: Any) -> bool:
    """A confusion matrix as jobs report it: ``{"labels": [...], "rows_true_cols_predicted": [[...]]}``."""
    return isinstance(value, dict) and {"labels", "rows_true_cols_predicted"} <= value.keys()


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def resume_text(resumes: list[dict[str, Any]]) -> str:
    """One line on whether and from where the run resumed."""
    if not resumes:
        return "no (one uninterrupted attempt)"
    return "; ".join(one_resume(r) for r in resumes)


def one_resume(r: dict[str, Any]) -> str:
    """``attempt 2 from `checkpoint-2.pt` (500 of 1500 epochs kept, 1 checkpoint skipped: ...)``."""
    skipped = r.get("skipped_checkpoints") or []
    note = f", {len(skipped)} skipped: " + "; ".join(skipped) if skipped else ""
    if r["from_checkpoint"] is None:
        return f"attempt {r['attempt']} started over from epoch 1 (no valid checkpoint{note})"
    return f"attempt {r['attempt']} from `{r['from_checkpoint']}` ({r['epochs_saved']} of {r['epochs']} epochs kept{note})"


def chunk_table(chunks: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-chunk history."""
    acc = ["val_accuracy"] if any("val_accuracy" in c for c in chunks) else []
    header = ["chunk", "epochs", "epoch", "train_loss", "val_loss", *acc, "seconds", "checkpoint"]
    return header, [["" if c.get(h) is None else c[h] for h in header] for c in chunks]


def overview(record: dict[str, Any], metrics: dict[str, Any], chunks: list[dict[str, Any]]) -> list[list[Any]]:
    """The summary's first table: what ran, where, how long, whether it resumed."""
    cfg, env = record.get("config", {}), record.get("environment") or {}
    timed = [c["seconds"] for c in chunks if c.get("seconds") is not None]
    per_chunk = (f"{duration(sum(timed))} for {len(timed)} timed chunks, {duration(sum(timed) / len(timed))} per chunk"
                 if timed else "?")
    epochs = f"{metrics.get('epochs_trained', cfg.get('epochs'))} of {cfg.get('epochs')}"
    return [
        ["job", record["job"]],
        ["run folder", f"`{record['run_dir']}`"],
        ["status", record.get("status")],
        ["started / finished", f"{record.get('started_at')} / {record.get('finished_at', '-')}"],
        ["attempts", record.get("attempts")],
        ["resumed", resume_text(record.get("resumes", []))],
        ["epochs", epochs + (" (stopped early)" if metrics.get("stopped_early") else "")],
        ["training time", per_chunk],
        ["device", env.get("device", {}).get("type")],
        ["git commit", (env.get("git") or {}).get("commit", "-")],
        *([["job code", f"`{env['job_code']['file']}` at {(env['job_code'].get('git') or {}).get('commit', '-')}"]]
          if env.get("job_code") else []),
    ]


def summary_markdown(record: dict[str, Any], metrics: dict[str, Any], chunks: list[dict[str, Any]],
                     plots: list[str], images: bool) -> str:
    """The run summary (``summary.md`` and the Prefect markdown artifact). ``images`` embeds
    the PNGs by relative path (works in an editor or on a git host, not in the Prefect UI)."""
    lines = [f"# {record['job']} · {record['run_name']}", "", *_table(["", ""], overview(record, metrics, chunks))]
    parts = [p for p in ("val", "test") if isinstance(metrics.get(p), dict)]
    if parts:
        keys = sorted({k for p in parts for k in metrics[p]} - {"rows"})
        rows = [[p, metrics[p].get("rows"), *(metrics[p].get(k, "") for k in keys)] for p in parts]
        lines += ["", "## Final metrics", "", *_table(["split", "rows", *keys], rows)]
    matrices = {k: v for k, v in metrics.items() if is_matrix(v)}
    other = [f"- **{k}**: {_fmt(v)}" for k, v in metrics.items() if k not in ("val", "test", "job", *matrices)]
    lines += ["", *other] if other else []
    for name, m in matrices.items():  # whole, as a table: a long JSON line would be cut
        lines += ["", f"## {name} (rows: true, columns: predicted)", "",
                  *_table(["", *m["labels"]], [[label, *row] for label, row in zip(m["labels"], m["rows_true_cols_predicted"])])]
    lines += ["", "## Chunks", "", *_table(*chunk_table(chunks))]
    lines += ["", "## Config", "", *_table(["option", "value"], list(record.get("config", {}).items()))]
    if plots:
        lines += ["", "## Plots", "", *(f"![{p}]({p})" if images else f"- `{p}`" for p in plots)]
    lines += ["", f"TensorBoard: `tensorboard --logdir {record['run_dir']}/{TB_DIR}`", ""]
    return "\n".join(lines)


# --- Prefect ---------------------------------------------------------------------------------


def FLUSHED(done: threading.Event) -> None:  # noqa: N802 - a marker, compared by identity
    """The artifact queue's marker: everything queued before it has been sent or dropped."""
    done.set()


class Artifacts:
    """The run's Prefect artifacts (``<job>-<run>-progress``, ``-summary``, ``-history``).

    Training never waits on them: calls run in order on one daemon thread. Prefect's client
    retries a dead API for about a minute per call, so after the first failure the run logs once
    that the UI can't be reached and sends nothing more; the run folder keeps the whole record."""

    def __init__(self, job: str, run_name: str, logger: Any = log):
        self.job, self.run_name, self.log = job, run_name, logger
        self.progress_id = None
        self.latest: tuple[float, str] | None = None  # figures of the queued progress update
        self.lock = threading.Lock()
        self.unreachable = False
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self.sender, name="trainflow-artifacts", daemon=True).start()

    def key(self, kind: str) -> str:
        return artifact_key(self.job, self.run_name, kind)

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        """Queue ``fn(**kwargs)``, to run in this flow run's context (Prefect links artifacts through it)."""
        if not self.unreachable:
            self.queue.put((contextvars.copy_context(), what, fn, kwargs))

    def sender(self) -> None:
        while True:
            ctx, what, fn, kwargs = self.queue.get()
            if self.unreachable and fn is not FLUSHED:
                continue
            try:
                result = ctx.run(fn, **kwargs)
            except Exception as exc:  # noqa: BLE001
                self.unreachable = True
                self.log.warning("could not %s (%s: %s); the Prefect UI won't show the rest of this run; training "
                                 "goes on, and the run folder keeps the whole record", what, type(exc).__name__, exc)
            else:
                if what == PROGRESS:
                    self.progress_id = result

    def flush(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for what was queued; True when it was all sent."""
        done = threading.Event()
        self.queue.put((contextvars.copy_context(), "flush", FLUSHED, {"done": done}))
        return done.wait(timeout) and not self.unreachable

    def create_progress(self, percent: float, text: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.call(PROGRESS, create_progress_artifact, progress=percent, key=self.key("progress"), description=text)

    def update_progress(self, percent: float, text: str) -> None:
        """Queue an update, unless one is queued: that one sends the latest figures when it runs."""
        from prefect.artifacts import update_progress_artifact

        with self.lock:
            queued, self.latest = self.latest is not None, (percent, text)
        if queued:
            return

        def update() -> None:  # runs after the create, on the same thread
            with self.lock:
                (progress, description), self.latest = self.latest, None
            if self.progress_id is not None:
                update_progress_artifact(artifact_id=self.progress_id, progress=progress, description=description)

        self.call("update the progress artifact", update)

    def summary(self, markdown: str, chunks: list[dict[str, Any]]) -> None:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        what = f"{self.job} run {self.run_name}"
        self.call("create the summary artifact", create_markdown_artifact, markdown=markdown,
                  key=self.key("summary"), description=f"{what}: summary")
        header, rows = chunk_table(chunks)
        self.call("create the history table artifact", create_table_artifact, key=self.key("history"),
                  table=[{h: float(f"{c:.6g}") if isinstance(c, float) else c for h, c in zip(header, row)}
                         for row in rows], description=f"{what}: per-chunk history")


# --- the report of one attempt ---------------------------------------------------------------


class RunReport:
    """Reporting of one attempt at one run (see the module docstring); the one writer of run.json."""

    def __init__(self, run: Run, logger: Any = log, flow_run_id: str | None = None):
        self.run, self.cfg, self.run_dir, self.log = run, run.cfg, run.dir, logger
        self.artifacts = Artifacts(run.cfg.job, run.name, logger)
        self.flow_run_id = flow_run_id
        self.record = RunRecord()
        self.t0 = time.monotonic()
        self.trained_epochs, self.trained_seconds = 0, 0.0  # this attempt's, for the ETA
        self.resume_known = False  # the attempt's first chunk tells whether and whence it resumed
        self.mlflow: Tracker | None = None

    @classmethod
    def start(cls, run: Run, logger: Any = log, flow_run_id: str | None = None) -> RunReport:
        """Begin an attempt: run.json, latest pointer, progress artifact."""
        self = cls(run, logger, flow_run_id)
        self.record = run.record() or RunRecord()
        self.record.begin_attempt(run.cfg, run.data, run.fingerprint, run.name, run.where, flow_run_id)
        self.save()
        run.store.point_latest()
        self.artifacts.create_progress(*self.progress(read_history(run)))
        self.open_mlflow()
        return self

    def open_mlflow(self) -> None:
        """The run's MLflow run (tasks/tracking.py), when one is asked for; its id in run.json."""
        run, record = self.run, self.record
        self.mlflow = Tracker.open(
            tracking_uri(run.cfg.mlflow), os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.cfg.job,
            key=f"{run.where}@{record.started_at}", name=run.name, logger=self.log,
            tags={"trainflow.run_dir": run.where, "trainflow.fingerprint": run.fingerprint,
                  **({"prefect.flow_run_id": str(self.flow_run_id)} if self.flow_run_id else {})},
            params={"run_name": run.name, "data": str(run.cfg.data), **run.cfg.identity()})
        if self.mlflow is not None and record.mlflow_run_id != self.mlflow.run_id:
            record.mlflow_run_id = self.mlflow.run_id
            self.save()

    def save(self, strict: bool = False) -> None:
        """run.json; for a run on a store, then every staged file that changed (run.json last).
        Only the final save must reach the store (``strict``): the checkpoints are committed by
        the chunks themselves, and a later save pushes whatever an earlier one could not. A lost
        lease is never a warning: the run must stop."""
        atomic_write_text(self.run_dir / RUN_FILE, self.record.json_text())
        try:
            self.run.store.push()
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - see above
            if strict:
                raise
            self.log.warning("could not copy the run's files to its store (%s: %s); the next save tries again",
                             type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def progress(self, history: dict[str, list[float]], finished: bool = False) -> tuple[float, str]:
        """Percent done and e.g. ``epoch 4000/10000, train loss 0.078, val loss 0.081, ETA 1m 05s``."""
        if not history.get("epoch"):
            return 0.0, f"epoch 0/{self.cfg.epochs}, starting"
        done = int(history["epoch"][-1])
        parts = [f"epoch {done}/{self.cfg.epochs}", f"train loss {history['train_loss'][-1]:.4g}"]
        if history.get("val_loss"):
            parts.append(f"val loss {history['val_loss'][-1]:.4g}")
        if history.get("val_accuracy"):
            parts.append(f"val accuracy {history['val_accuracy'][-1]:.4f}")
        eta = eta_seconds(self.trained_epochs, self.trained_seconds, self.cfg.epochs - done)
        if finished or eta is not None:
            parts.append("done" if finished else f"ETA {duration(eta)}")
        return (100.0 if finished else round(100.0 * done / self.cfg.epochs, 2)), ", ".join(parts)

    def chunk_done(self, result: ChunkResult) -> None:
        """After each chunk: the resume and the chunk's row in run.json, TensorBoard events for
        the new epochs, the progress artifact."""
        history = read_history(self.run)
        self.note_resume(result)
        if result.trained:
            self.trained_epochs += result.end_epoch - result.start_epoch
            self.trained_seconds += result.seconds
            self.record.add_chunk(result)
        self.tensorboard(history, result.start_epoch)
        self.save()
        if self.mlflow is not None:
            self.mlflow.history(history)
        self.artifacts.update_progress(*self.progress(history))

    @property
    def later_attempt(self) -> bool:
        """This attempt follows another on the same run (a rerun, a flow retry)."""
        return self.record.attempts > 1

    def note_resume(self, result: ChunkResult) -> None:
        """Record how this attempt began, from its first chunk: a resume from the checkpoint it
        loaded, or (a later attempt that found no valid checkpoint) a start from scratch."""
        if self.resume_known:
            return
        self.resume_known = True
        if result.loaded or self.later_attempt:
            self.record.resumes.append(self.record.resume_event(result, self.flow_run_id))

    def tensorboard(self, history: dict[str, list[float]], start: int | None = None) -> None:
        """Events from the first epoch not known to be written: run.json records the last one
        written, and ``start`` (epochs the checkpoint held) goes back further after a resume from
        an older checkpoint. A kill before run.json is saved only means a rewrite, which purges."""
        written = self.record.tensorboard_epochs
        first = (written if start is None else min(written, start)) + 1
        try:
            self.record.tensorboard_epochs = write_tensorboard(self.run_dir, history, first)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not write TensorBoard events: %s: %s", type(exc).__name__, exc)

    def plot(self, history: dict[str, list[float]]) -> list[str]:
        """``loss.png``; the names of all PNGs in the run folder (jobs add their own)."""
        from tasks.jobs.plots import plot_losses

        try:
            plot_losses(history, self.run_dir / LOSS_PNG, f"{self.cfg.job} · {self.run.name}: loss per epoch")
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not plot %s: %s: %s", LOSS_PNG, type(exc).__name__, exc)
        return sorted(p.name for p in self.run_dir.glob("*.png"))

    def finish(self, metrics: dict[str, Any]) -> RunRecord:
        """End of a completed run: loss.png, summary.md, Prefect summary + table artifacts,
        and run.json (status completed, sha256 of every file) written last."""
        history = read_history(self.run)
        self.tensorboard(history)  # catches up if a chunk's write failed
        plots = self.plot(history)
        chunks = self.record.chunk_rows(self.run.store.checkpoints.manifests(), history)
        record = self.record
        record.status, record.finished_at, record.duration_s = "completed", utc_now(), round(time.monotonic() - self.t0, 3)
        as_dict = record.model_dump(mode="json")
        atomic_write_text(self.run_dir / SUMMARY_FILE, summary_markdown(as_dict, metrics, chunks, plots, images=True))
        self.artifacts.summary(summary_markdown(as_dict, metrics, chunks, plots, images=False), chunks)
        self.artifacts.update_progress(*self.progress(history, finished=True))
        if self.mlflow is not None:  # before run.json says completed: a kill before that finishes again
            self.mlflow.history(history)
            self.mlflow.metrics(final_metrics(metrics), int(history["epoch"][-1]) if history.get("epoch") else 0)
            self.mlflow.files([self.run_dir / name for name in (*OUTPUTS, *plots)])
            self.mlflow.end("FINISHED")
        record.files = hash_files(self.run)
        self.save(strict=True)  # last: "completed" means every output is in place, on the store too
        self.settle()
        self.log.info("%s: summary in %s/%s; TensorBoard: tensorboard --logdir %s/%s", self.cfg.job,
                      self.run.where, SUMMARY_FILE, self.run.where, TB_DIR)
        return record

    def interrupted(self, exc: BaseException) -> None:
        """The attempt ended without finishing: record why (a rerun resumes)."""
        self.record.interrupted(exc)
        try:
            self.save()
        except Exception as err:  # noqa: BLE001 - the failure being recorded is the one to report
            self.log.warning("could not record the failure in %s (%s); it still says %r", RUN_FILE, err, "running")
        if self.mlflow is not None:
            self.mlflow.end("KILLED" if self.record.status == "stopped" else "FAILED")
        self.settle()

    def settle(self, timeout: float = 10.0) -> None:
        """Give the Prefect artifacts a moment to reach the API as the attempt ends."""
        if not self.artifacts.flush(timeout) and not self.artifacts.unreachable:
            self.log.warning("the Prefect API took over %.0f s: its artifacts for this run may be incomplete", timeout)
