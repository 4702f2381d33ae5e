"""MLflow: where ``MLFLOW_TRACKING_URI`` is set or ``--mlflow URI`` is given, every run logs there.

One MLflow run per trainflow run, in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (else the job's
name): the options that identify the run as parameters, every epoch of ``history.csv`` as
metrics (step = epoch), the final metrics, and at the end ``summary.md``, ``metrics.json``,
``history.csv``, the plots and the model files as artifacts. A resumed run continues the same
MLflow run: it is found again by its tag (``trainflow.run``: a digest of the run folder and
when it began; its id is also kept in run.json), and what it already holds is read back first,
so no step is logged twice or missed (a resume from an older checkpoint retrains those epochs to the same
values). A sweep is a parent run: its trials' runs are its children (the sweep names itself to
its trial processes in ``$TRAINFLOW_MLFLOW_PARENT``).

Like the Prefect artifacts, MLflow never breaks training: a call that fails is one warning, and
the run goes on without MLflow; the run folder keeps the whole record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from tasks.kernel import UserError

log = logging.getLogger("trainflow.tracking")

#: The parent MLflow run of a sweep's trials (set by the sweep for its trial processes).
PARENT_ENV = "TRAINFLOW_MLFLOW_PARENT"
#: Tag that finds a run's MLflow run again, whatever became of run.json (a digest of its key).
RUN_TAG = "trainflow.run"
INSTALL = "pip install -e '.[mlflow]'"
#: Per log_batch request: MLflow's own limit.
BATCH = 1000
#: The outputs of a completed run logged as artifacts (besides its PNGs).
OUTPUTS = ("summary.md", "metrics.json", "history.csv", "model_state_dict.pt", "model.pt")


def tracking_uri(option: str | None) -> str | None:
    """Where to log: ``--mlflow``, else ``$MLFLOW_TRACKING_URI``, else nowhere (None)."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_installed(option: str | None) -> None:
    """``--mlflow`` without the extra is refused in one line (UserError); a tracking URI set in
    the environment only is warned about when the run starts (:meth:`Tracker.open`)."""
    if option:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError(f"--mlflow needs MLflow: {INSTALL}") from None


def client(uri: str) -> Any:
    """An MLflow client of ``uri`` that gives up on a dead server in seconds, not minutes
    (MLflow's documented retry settings, unless the user set them)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id(mlflow: Any, name: str) -> str:
    """The experiment named ``name``, created if missing (by this process or, racing it, another)."""
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow.create_experiment(name)
        except Exception:  # noqa: BLE001 - created meanwhile by another run (parallel trials)
            found = mlflow.get_experiment_by_name(name)
            if found is None:
                raise
    return found.experiment_id


def find_or_create(mlflow: Any, experiment: str, key: str, name: str, tags: dict[str, str],
                   params: dict[str, Any]) -> tuple[str, bool]:
    """The id of the MLflow run tagged ``key`` (created with ``tags`` and ``params`` if none
    is), and whether it was created now."""
    from mlflow.entities import Param

    exp = experiment_id(mlflow, experiment)
    key = hashlib.sha256(key.encode()).hexdigest()[:32]  # any path or URL, safe in a filter string
    found = mlflow.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id, False
    if parent := os.environ.get(PARENT_ENV):
        tags = {**tags, "mlflow.parentRunId": parent}
    run_id = mlflow.create_run(exp, run_name=name, tags={**tags, RUN_TAG: key}).info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per request
        mlflow.log_batch(run_id, params=items[i : i + 100])
    return run_id, True


class Tracker:
    """The MLflow run of one trainflow run (or of a sweep): opened once per attempt, then told
    each chunk's history, and how the attempt ended."""

    def __init__(self, mlflow: Any, run_id: str, logger: Any = log):
        self.mlflow, self.run_id, self.log = mlflow, run_id, logger
        #: metric -> last step the MLflow run holds
        self.logged: dict[str, int] = {}
        self.broken = False

    @classmethod
    def open(cls, uri: str | None, experiment: str, key: str, name: str, tags: dict[str, str],
             params: dict[str, Any], logger: Any = log) -> Tracker | None:
        """The MLflow run tagged ``key``, found or created, marked running; None (after one
        warning) when there is no URI, no MLflow, or no answer."""
        if uri is None:
            return None
        try:
            mlflow = client(uri)
        except ImportError:
            logger.warning("MLFLOW_TRACKING_URI is set but MLflow is not installed (%s); not logging to MLflow",
                           INSTALL)
            return None
        try:
            run_id, created = find_or_create(mlflow, experiment, key, name, tags, params)
            self = cls(mlflow, run_id, logger)
            if not created:
                mlflow.update_run(run_id, status="RUNNING")
                self.logged = self.steps()
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            logger.warning("could not open the MLflow run at %s (%s: %s); training goes on without MLflow", uri,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        logger.info("MLflow: run %s in experiment %r at %s", run_id, experiment, uri)
        return self

    def steps(self) -> dict[str, int]:
        """The last step of each metric the MLflow run holds."""
        keys = self.mlflow.get_run(self.run_id).data.metrics
        return {k: max((m.step for m in self.mlflow.get_metric_history(self.run_id, k)), default=-1) for k in keys}

    def call(self, what: str, fn: Any, *args: Any) -> None:
        """``fn(*args)``; after a failure, one warning and nothing more is sent."""
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            self.broken = True
            self.log.warning("could not %s in MLflow (%s: %s); the rest of this run is not logged there", what,
                             type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def history(self, history: dict[str, list[float]]) -> None:
        """Every epoch of ``history`` the MLflow run does not hold yet (step = epoch)."""
        self.call("log the epochs' metrics", self.log_rows, history)

    def log_rows(self, history: dict[str, list[float]]) -> None:
        from mlflow.entities import Metric

        now, epochs = int(time.time() * 1000), [int(e) for e in history.get("epoch", [])]
        rows = [Metric(k, float(v), now, e) for k, values in history.items() if k != "epoch"
                for e, v in zip(epochs, values) if e > self.logged.get(k, -1)]
        for i in range(0, len(rows), BATCH):  # in step order per metric: a cut batch resumes exactly
            self.mlflow.log_batch(self.run_id, metrics=rows[i : i + BATCH])
            for m in rows[i : i + BATCH]:
                self.logged[m.key] = max(self.logged.get(m.key, -1), m.step)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Final figures, each logged once (a rerun after a kill at the end logs only the rest)."""
        self.call("log the final metrics", self.log_once, values, step)

    def log_once(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        held, now = self.mlflow.get_run(self.run_id).data.metrics, int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in sorted(values.items()) if k not in held]
        if rows:
            self.mlflow.log_batch(self.run_id, metrics=rows)

    def files(self, paths: list[Path]) -> None:
        """Artifacts, at the root of the run's artifacts (written again, same name, on a rerun)."""
        for path in paths:
            if path.is_file():
                self.call(f"log {path.name}", self.mlflow.log_artifact, self.run_id, str(path))

    def end(self, status: str) -> None:
        """``FINISHED``, ``FAILED`` or ``KILLED`` (a stop on request)."""
        self.call("end the run", self.mlflow.set_terminated, self.run_id, status)


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A run's final figures as flat MLflow metrics: ``test_loss``, ``final_val_loss``, and the
    job's own top-level numbers (``test_accuracy``)."""
    out = {f"{'final_val' if part == 'val' else part}_{k}": v for part in ("val", "test")
           for k, v in (metrics.get(part) or {}).items() if k != "rows" and isinstance(v, (int, float))}
    out |= {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
