"""The job registry: adding a job is one new module and one line here."""

from tasks.jobs import fashion_mnist, linear, multi_linear, nonlinear
from tasks.jobs.spec import JobSpec, TrainConfig, UserError

JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (
    nonlinear.JOB,
    fashion_mnist.JOB,
    linear.JOB,
    multi_linear.JOB,
)}


def get_job(name: str) -> JobSpec:
    """The registered job called ``name``, or a UserError listing the known ones."""
    try:
        return JOBS[name]
    except KeyError:
        raise UserError(f"unknown job {name!r}; choose one of: {', '.join(JOBS)}") from None


def default_jobs() -> list[str]:
    """Jobs that run when no ``--job`` is given."""
    return [name for name, spec in JOBS.items() if spec.in_default_set]


__all__ = ["JOBS", "JobSpec", "TrainConfig", "UserError", "get_job", "default_jobs"]
