"""Every option of a run, defined once (``TrainConfig``'s fields), as command-line flags and as
the parameters of a Prefect flow: type, choices and description all come from the field."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from flows import HELP_FILE
from tasks.jobs.registry import JOBS, default_jobs
from tasks.kernel import ROOT, TrainConfig, UserError

#: Field name -> field, in TrainConfig's order.
FIELDS: dict[str, FieldInfo] = dict(TrainConfig.model_fields)


def base_type(field: FieldInfo) -> Any:
    """The field's type without ``| None`` (``int | None`` -> ``int``; ``int | Literal["auto"]`` stays)."""
    if typing.get_origin(field.annotation) not in (typing.Union, type(int | None)):
        return field.annotation
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else typing.Union[tuple(args)]


def job_defaults(name: str) -> str:
    """``' (nonlinear: 10000, fashion_mnist: 10)'``: the jobs' own defaults for a field."""
    values = [f"{job}: {shown(spec.defaults[name])}" for job, spec in JOBS.items() if name in spec.defaults]
    return f" ({', '.join(values)})" if values else ""


def shown(value: Any) -> str:
    """A default as help text: paths relative to the repository, like the commands."""
    return str(value.relative_to(ROOT) if isinstance(value, Path) and value.is_relative_to(ROOT) else value)


def add_arguments(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> None:
    """One ``--flag`` per field (``chunk_epochs`` -> ``--chunk-epochs``), default None: a flag
    left out takes the job's default. Booleans get ``--x`` / ``--no-x``."""
    for name, field in FIELDS.items():
        if name in exclude:
            continue
        kind = base_type(field)
        flag = "--" + name.replace("_", "-")
        text = (field.description or "") + job_defaults(name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), default=None, help=text)
        else:
            cast = kind if kind in (int, float) else str
            parser.add_argument(flag, type=cast, default=None, metavar=name.upper(), help=text)


def parameter(name: str, default: Any = None, required: bool = False) -> inspect.Parameter:
    """A flow parameter for field ``name``: its type (``| None`` unless required) and a default."""
    kind = base_type(FIELDS[name])
    kind = str if kind is Path else kind  # a deployment parameter is JSON: a path is a string
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind if required else kind | None,
                             **({} if required else {"default": default}))


def with_parameters(fn: Callable[..., Any], parameters: list[inspect.Parameter]) -> Callable[..., Any]:
    """Give ``fn(**options)`` the signature and docstring ``Args`` that Prefect reads for a
    flow's parameters (their types and descriptions in the UI, and their validation)."""
    fn.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])
    lines = [f"    {p.name}: {(FIELDS[p.name].description if p.name in FIELDS else '') or p.name}" for p in parameters]
    fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join(lines)
    return fn


def config_parameters(exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One optional parameter per field (default None: the job's default), in field order."""
    return [parameter(name) for name in FIELDS if name not in exclude]


# --- the command line of flows/train_flow.py ---------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2."""

    def error(self, message: str) -> None:  # one line, not usage + error
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def train_parser() -> argparse.ArgumentParser:
    """The CLI; every option is also a flow parameter of the same name."""
    jobs = "\n".join(f"  {n:<14}{s.description}{' (default)' if s.in_default_set else ''}" for n, s in JOBS.items())
    p = OneLineParser(
        prog="python flows/train_flow.py",
        description="Train a job resumably: chunks of epochs, each ending with a checkpoint. Rerunning the "
        "same command resumes from the latest valid checkpoint, or reports the result if the run is complete.",
        epilog=f"jobs:\n{jobs}\n  {'module:NAME':<14}your own JobSpec, importable from the current folder or "
        f"PYTHONPATH (docs/jobs.md)\n\nWith no --job: {', '.join(default_jobs())}. Options left out take the job's "
        "defaults. Outputs go to "
        "<artifacts-dir>/<job>/<run-name>/ (see artifacts/README.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)  # one flag per TrainConfig field
    p.add_argument("--config", metavar="FILE", help="a JSON file of these options, such as a sweep's "
                   "best_config.json (flows/sweep_flow.py); options given on the command line win")
    return p


def with_config_file(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` (the parsed flags, ``config`` among them) with the options of the ``--config``
    file filled in where no flag gave one; UserError in one line for a file that can't be used."""
    path = args.pop("config", None)
    if path is None:
        return args
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--config {path}: {exc.strerror if isinstance(exc, OSError) else 'not JSON'}") from None
    unknown = sorted(set(values) - set(FIELDS)) if isinstance(values, dict) else ["(not an object)"]
    if unknown:
        raise UserError(f"--config {path}: unknown option {unknown[0]!r}; a config file holds training options")
    return {**args, **{k: v for k, v in values.items() if args.get(k) is None}}


def rendered_help(columns: int = 100) -> str:
    """The CLI's help as :data:`flows.HELP_FILE` holds it, at a fixed width."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        return train_parser().format_help()
    finally:
        os.environ.pop("COLUMNS") if saved is None else os.environ.update(COLUMNS=saved)


if __name__ == "__main__":
    HELP_FILE.write_text(rendered_help())
    print(f"wrote {HELP_FILE}")
