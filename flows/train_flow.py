"""The training flow and its command line: ``python flows/train_flow.py --help``."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

#: Set by the command line once main() returned; see _skip_teardown.
EXIT_STATUS: int | None = None


def _skip_teardown() -> None:
    """Registered first, so it runs last: once Prefect's exit handlers have run (log and event
    flush, server stop), every file is on disk and the interpreter's teardown of torch and
    Prefect would only add ~2 s to the run."""
    if EXIT_STATUS is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STATUS)


SERVER_BOOT = None
if __name__ == "__main__":
    atexit.register(_skip_teardown)
    if not {"-h", "--help"} & set(sys.argv[1:]):
        # Before Prefect and torch are imported: a temporary Prefect server boots meanwhile.
        from tasks.server import boot_temporary_server

        SERVER_BOOT = boot_temporary_server()

from prefect import flow, get_run_logger
from pydantic import ValidationError

from tasks.data import load_data, load_job_data, make_split, split_data
from tasks.evaluation import METRICS_FILE, evaluate
from tasks.export import save_model
from tasks.jobs import JOBS, default_jobs, get_job
from tasks.jobs.spec import TrainConfig, UserError
from tasks.reporting import RunReport
from tasks.run import (check_compatible, check_writable, hold, is_complete, prepare_run_dir, read_json,
                       run_dir_for)
from tasks.training import StopRequested, chunk_ends, train_chunk

#: CLI option -> TrainConfig field; the flow takes the same names as parameters.
OPTIONS = ("data", "epochs", "chunk_epochs", "lr", "batch_size", "eval_batch_size", "seed", "run_name",
           "artifacts_dir", "fresh", "model", "optimizer", "momentum", "weight_decay", "schedule",
           "label_smoothing", "shards", "threads", "device", "early_stopping_patience", "keep_last", "save_best", "wait_lock")


def build_configs(job: str | None, overrides: dict[str, Any]) -> list[TrainConfig]:
    """One validated config per requested job (all default jobs when ``job`` is None)."""
    names = [job] if job else default_jobs()
    return [get_job(name).config(**overrides) for name in names]


def run_job(cfg: TrainConfig) -> dict[str, Any]:
    """The pipeline for one job: load -> split -> train_chunk x N -> evaluate -> save_model."""
    logger = get_run_logger()
    info = load_data(cfg)
    fingerprint = cfg.fingerprint(info["fingerprint"])
    run_dir, archived = prepare_run_dir(cfg, info["fingerprint"])
    if archived is not None:
        logger.info("--fresh: moved the previous run to %s", archived)
    with hold(run_dir, wait=cfg.wait_lock):
        if is_complete(run_dir):
            metrics = read_json(run_dir / METRICS_FILE)
            logger.info("%s is already complete; not retraining (use --fresh to start over)", run_dir)
            return {"job": cfg.job, "run_dir": str(run_dir), "status": "already complete", "metrics": metrics}
        report = RunReport.start(cfg, run_dir, info["fingerprint"], fingerprint, logger)  # run.json, progress
        try:
            split_data(cfg, run_dir)
            for chunk in range(1, len(chunk_ends(cfg)) + 1):
                result = train_chunk(cfg, run_dir, fingerprint, chunk)
                report.chunk_done(result)  # TensorBoard, progress artifact, run.json
            metrics = evaluate(cfg, run_dir, fingerprint)
            save_model(cfg, run_dir, fingerprint)
        except BaseException as exc:
            report.interrupted(exc)
            raise
        report.finish(metrics)  # plots, summary.md + artifacts, run.json "completed" with file hashes
    logger.info("%s: done, test loss %.6g, outputs in %s", cfg.job, metrics["test"].get("loss", float("nan")), run_dir)
    return {"job": cfg.job, "run_dir": str(run_dir), "status": "completed", "metrics": metrics}


@flow(name="train", retries=0)
def train_flow(
    job: str | None = None,
    data: str | None = None,
    epochs: int | None = None,
    chunk_epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    seed: int | None = None,
    run_name: str | None = None,
    artifacts_dir: str | None = None,
    fresh: bool = False,
    model: str | None = None,
    optimizer: Literal["sgd", "adam", "adamw"] | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    schedule: Literal["constant", "onecycle", "cosine"] | None = None,
    label_smoothing: float | None = None,
    shards: int | None = None,
    threads: int | None = None,
    device: Literal["auto", "cpu", "cuda"] | None = None,
    early_stopping_patience: int | None = None,
    keep_last: int | None = None,
    save_best: bool = False,
    wait_lock: float | None = None,
) -> dict[str, Any]:
    """Train ``job`` (or every default job) resumably; parameters left None take the job's defaults."""
    overrides = {k: v for k, v in locals().items() if k in OPTIONS}
    overrides.update(fresh=fresh or None, save_best=save_best or None)
    return {cfg.job: run_job(cfg) for cfg in build_configs(job, overrides)}


# --- command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    """The CLI; every option is also a flow parameter of the same name."""
    jobs = "\n".join(f"  {n:<14}{s.description}{' (default)' if s.in_default_set else ''}" for n, s in JOBS.items())
    p = _Parser(
        prog="python flows/train_flow.py",
        description="Train a job resumably: chunks of epochs, each ending with a checkpoint. Rerunning the "
        "same command resumes from the latest valid checkpoint, or reports the result if the run is complete.",
        epilog=f"jobs:\n{jobs}\n\nOptions left out take the job's defaults. Outputs go to "
        "<artifacts-dir>/<job>/<run-name>/ (see artifacts/README.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--job", help=f"job to train (default: {', '.join(default_jobs())})")
    p.add_argument("--data", help="the job's input: a CSV for regression jobs, a folder for fashion_mnist (default under data/)")
    p.add_argument("--epochs", type=int, help="total epochs (nonlinear: 10000)")
    p.add_argument("--chunk-epochs", type=int, help="epochs per checkpointed chunk (nonlinear: 1000)")
    p.add_argument("--lr", type=float, help="learning rate (nonlinear: 1e-4)")
    p.add_argument("--batch-size", type=int, help="training batch size (nonlinear: 16)")
    p.add_argument("--eval-batch-size", type=int, help="validation/test batch size (nonlinear: 4)")
    p.add_argument("--seed", type=int, help="seed for split, init and shuffling (default 0)")
    p.add_argument("--run-name", help="run folder name (default: derived from config and data, so a rerun resumes)")
    p.add_argument("--artifacts-dir", help="root of run folders (default: artifacts/)")
    p.add_argument("--fresh", action="store_true", help="start over; an existing run folder is moved aside, not deleted")
    p.add_argument("--model", help="model variant of the job (e.g. fashion_mnist: lenet, cnn)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["constant", "onecycle", "cosine"], help="per-batch learning-rate schedule")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--shards", type=int, help="compute each training batch in this many equal parts, on parallel "
                   "CPU threads, gradients summed in order (fashion_mnist lenet: 2; models with BatchNorm or dropout: 1)")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads per shard (default 1: fastest on a shared "
                   "2-core machine)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when available")
    p.add_argument("--early-stopping-patience", type=int, metavar="EPOCHS",
                   help="stop after this many epochs without a better validation metric (default off)")
    p.add_argument("--keep-last", type=int, metavar="K",
                   help="keep only the newest K checkpoints plus the best (default: keep all)")
    p.add_argument("--save-best", action="store_true", help="also write model_best_state_dict.pt (best validation epoch)")
    p.add_argument("--wait-lock", type=float, metavar="SECONDS",
                   help="wait this long for a run folder another process holds (default: refuse at once)")
    return p


def one_line(exc: ValidationError) -> str:
    """First pydantic error as ``--option: message (got value)``."""
    err = exc.errors()[0]
    field = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
    return f"invalid {field}: {err['msg']} (got {err.get('input')!r})"


def preflight(configs: list[TrainConfig]) -> None:
    """Check everything checkable before Prefect starts, so bad input fails in one line and
    touches nothing: data, split size, artifacts folder, run-folder conflicts."""
    for cfg in configs:
        data = load_job_data(cfg)
        make_split(data, cfg)
        check_writable(Path(cfg.artifacts_dir) / cfg.job)
        run_dir = run_dir_for(cfg, cfg.fingerprint(data.fingerprint))
        if not cfg.fresh:
            check_compatible(run_dir, cfg, data.fingerprint)
        if run_dir.exists():
            with hold(run_dir, wait=cfg.wait_lock):
                pass


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs every task failure with a traceback; for bad input that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = vars(parser().parse_args(argv))
    job = args.pop("job")
    try:
        preflight(build_configs(job, args))
    except ValidationError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = contextlib.nullcontext()
    if SERVER_BOOT is not None:
        from tasks.server import preimport, temporary_server_settings

        preimport()
        try:
            SERVER_BOOT.wait_ready()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        settings = temporary_server_settings()
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_HideUserErrorTracebacks())
    try:
        with settings:
            results = train_flow(job=job, **args)
    except StopRequested as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("stopped at once (second signal); rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Prefect already logged the details
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0] + "; rerun the same command to resume", file=sys.stderr)
        return 1
    for name, result in results.items():
        metrics = result["metrics"] or {}
        shown = ", ".join(f"{part} {k} {v:.6g}" for part in ("test", "train") for k, v in metrics.get(part, {}).items()
                          if k != "rows" and isinstance(v, float))
        print(f"{name}: {result['status']}: {shown} -> {result['run_dir']}")
    return 0


if __name__ == "__main__":
    EXIT_STATUS = main()
    sys.exit(EXIT_STATUS)
