"""Predict with a finished run: ``python flows/predict_flow.py --run artifacts/nonlinear/<run> --x 1 5 11``.

Generic over jobs: the run's ``config.json`` names the job, the job registry builds its model,
``model_state_dict.pt`` is loaded with ``weights_only=True`` (plain tensors, never a pickle of
code), and the job's ``predict`` hook (:class:`tasks.jobs.spec.Predictor`) supplies the input
options (``--x`` for nonlinear, ``--index`` for fashion_mnist, ...) and the output lines.
``--run`` may also be a job's ``latest`` pointer, e.g. ``artifacts/nonlinear/latest``, or a run on
a store: ``s3://bucket/prefix/nonlinear/latest``.

The command runs without Prefect (no server to start for a few predictions); ``--prefect``
runs the same thing as the Prefect flow ``predict``, which is also what a deployment would call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger

from flows.options import OneLineParser
from tasks.jobs.registry import JOBS, get_job
from tasks.jobs.spec import JobSpec
from tasks.kernel import TrainConfig, UserError, read_json
from tasks.reporting import resolve_run
from tasks.storage.remote import fetch_run, is_url
from tasks.storage.run import CONFIG_FILE

STATE_DICT = "model_state_dict.pt"


def load_run(run: str | Path) -> tuple[Path, TrainConfig, JobSpec, torch.nn.Module]:
    """``(run_dir, config, job, model)`` of a finished run (a folder, or a run's URL on a store),
    the model on CPU in eval mode."""
    run_dir = fetch_run(str(run)) if is_url(run) else resolve_run(Path(run))
    shown = str(run).rstrip("/") if is_url(run) else run_dir
    record = read_json(run_dir / CONFIG_FILE)
    if record is None:
        raise UserError(f"{shown} is not a run folder (no readable {CONFIG_FILE}); pass --run artifacts/<job>/<run>")
    spec = get_job(record["job"])
    cfg = TrainConfig.model_validate(record["config"])
    weights = run_dir / STATE_DICT
    if not weights.is_file():
        raise UserError(f"{shown}/{STATE_DICT} does not exist: the run has not finished; rerun its training command "
                        f"to resume it")
    model = spec.build_model(cfg)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return run_dir, cfg, spec, model.eval()


@torch.no_grad()
def predict(run: str | Path, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Predictions of ``run``'s model for the job's ``inputs`` (the job's option names, e.g.
    ``{"x": [1, 5, 11]}``): one ``{"input", "output", "text"}`` per row."""
    _, cfg, spec, model = load_run(run)
    if spec.predict is None:
        raise UserError(f"job {spec.name!r} has no prediction command")
    x, labels = spec.predict.inputs(argparse.Namespace(**inputs), cfg)
    out = model(spec.prepare(x))
    lines = spec.predict.format(labels, out)
    fields = spec.predict.fields(out) if spec.predict.fields else [{} for _ in lines]
    return [{"input": label, **f, "output": o.tolist(), "text": line}
            for label, o, line, f in zip(labels, out, lines, fields)]


@flow(name="predict")
def predict_flow(run: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Prefect flow: :func:`predict`, with the results in the flow run's log."""
    rows = predict(run, inputs)
    logger = get_run_logger()
    for row in rows:
        logger.info(row["text"])
    return rows


# --- command line ----------------------------------------------------------------------------


def base_parser(add_help: bool) -> argparse.ArgumentParser:
    usage = "\n".join(f"  {name}: {job_usage(spec)}" for name, spec in JOBS.items() if spec.predict is not None)
    p = OneLineParser(
        prog="python flows/predict_flow.py", add_help=add_help,
        description="Load a finished run's model_state_dict.pt (weights_only=True) and predict.",
        epilog=f"job options (the job is read from the run's config.json):\n{usage}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run folder artifacts/<job>/<run>, or artifacts/<job>/latest; or its URL on a store")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text lines")
    p.add_argument("--prefect", action="store_true", help="run as the Prefect flow 'predict' (starts/uses a server)")
    return p


def job_usage(spec: JobSpec) -> str:
    """The job's own options, as argparse would print them."""
    p = argparse.ArgumentParser(add_help=False, prog="")
    spec.predict.add_arguments(p)
    return p.format_usage().replace("usage:", "").strip()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        base_parser(add_help=True).print_help()
        return 0
    known, _ = base_parser(add_help=False).parse_known_args(argv)
    try:
        _, _, spec, _ = load_run(known.run)
        if spec.predict is None:
            raise UserError(f"job {spec.name!r} has no prediction command")
        p = base_parser(add_help=False)
        spec.predict.add_arguments(p)
        args = vars(p.parse_args(argv))
        run, as_json, use_prefect = args.pop("run"), args.pop("json"), args.pop("prefect")
        rows = predict_flow(run, args) if use_prefect else predict(run, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "text"} for r in rows]))
    else:
        for row in rows:
            print(row["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
