"""The job registry: built-in jobs by short name, and the user's own jobs by import path
(``--job mypkg.jobs:JOB``, see docs/jobs.md). Adding a built-in job is one new module and one
line here."""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from dataclasses import replace
from types import ModuleType

from tasks.jobs import fashion_mnist, linear, multi_linear, nonlinear
from tasks.jobs.spec import JobSpec
from tasks.kernel import TrainConfig, UserError, saved_traceback

JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (
    nonlinear.JOB,
    fashion_mnist.JOB,
    linear.JOB,
    multi_linear.JOB,
)}

#: ``module.path:NAME`` or ``module.path.NAME``, ASCII identifiers. The dotted form is the job's
#: name in the run (``cfg.job``, ``config.json``): one string that loads the job again anywhere
#: (predict, a deployment's worker) and is a safe folder name (``<artifacts>/mypkg.jobs.JOB/``).
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*[.:][A-Za-z_]\w*", re.ASCII)


def get_job(name: str) -> JobSpec:
    """The built-in job ``name``, or the JobSpec at import path ``name`` (loaded once per
    process); a UserError naming the problem and the fix otherwise."""
    if name in JOBS:
        return JOBS[name]
    if not {".", ":", "/"} & set(name):  # built-in names have none of these
        raise UserError(f"unknown job {name!r}; choose one of: {', '.join(JOBS)}, "
                        "or your own JobSpec as --job module.path:NAME (docs/jobs.md)")
    return import_job(canonical_path(name))


def canonical_path(name: str) -> str:
    """``mypkg.jobs:JOB`` -> ``mypkg.jobs.JOB``, or a UserError for what is not an import path."""
    if name.endswith(".py") or ".py:" in name or "/" in name or "\\" in name:
        file, _, attr = name.rpartition(":") if ":" in name else (name, "", "JOB")
        stem = re.split(r"[/\\]", file)[-1].removesuffix(".py")
        raise UserError(f"--job {name!r} is a file path; give a module path instead: --job {stem}:{attr}, "
                        "run from the file's folder or with that folder on PYTHONPATH (docs/jobs.md)")
    if not IMPORT_PATH.fullmatch(name):
        raise UserError(f"--job {name!r} is not an import path; use module.path:NAME (ASCII letters, digits, "
                        f"'_' and dots), or a built-in job: {', '.join(JOBS)}")
    return name.replace(":", ".")


@functools.cache  # one spec object per job and process: every get_job(cfg.job) finds it again
def import_job(path: str) -> JobSpec:
    """The JobSpec at the dotted ``path``, renamed to ``path`` (so ``cfg.job`` is ``path``)."""
    module_name, _, attr = path.rpartition(".")
    module = import_module(module_name, path)
    if not hasattr(module, attr):
        found = [k for k, v in vars(module).items() if isinstance(v, JobSpec)]
        has = f"its JobSpecs: {', '.join(found)}" if found else "it defines no JobSpec"
        raise UserError(f"module {module_name!r} ({getattr(module, '__file__', None)}) has no {attr!r} ({has}); "
                        f"define {attr} = JobSpec(...) there or fix the name after ':' in --job")
    spec = getattr(module, attr)
    if not isinstance(spec, JobSpec):
        raise UserError(f"{module_name}:{attr} is a {type(spec).__name__}, not a JobSpec; point --job at "
                        "a tasks.jobs.spec.JobSpec object (docs/jobs.md)")
    return replace(spec, name=path)


def import_module(module_name: str, job: str) -> ModuleType:
    """Import the user's module; whatever fails (a missing module, an error in the module's own
    code) is a UserError in one line, naming a file that keeps the traceback."""
    # Like `python -m` and uvicorn, the current directory is importable; last, so that it never
    # shadows an installed module. PYTHONPATH works as usual (and from any folder).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise UserError(f"job {job}: no module named {exc.name!r}; run from the folder that holds it, put that "
                            "folder on PYTHONPATH, or check the spelling") from None
        raise UserError(f"job {job}: module {module_name!r} imports {exc.name!r}, which is not installed here "
                        f"({sys.executable}); install it, or put its folder on PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001 - an error in the module's own code: the same on every retry
        raise UserError(f"job {job}: importing module {module_name!r} failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); fix the module (traceback in "
                        f"{saved_traceback(exc)})") from None


def default_jobs() -> list[str]:
    """Jobs that run when no ``--job`` is given."""
    return [name for name, spec in JOBS.items() if spec.in_default_set]


__all__ = ["JOBS", "JobSpec", "TrainConfig", "UserError", "get_job", "default_jobs"]
