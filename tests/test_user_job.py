"""A job from outside the repository, named by import path (docs/jobs.md): the documented example
trains with the real command from a folder of its own, resumes bit-exact after an exception in
chunk 2, runs as the deployments' flow and predicts; a wrong ``--job`` is one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.train_flow import main, train_flow
from tasks.jobs.registry import get_job
from tests.helpers import PREDICT, ROOT, TRAIN, assert_same_run, cli_env, fail_once_at, state_dict

EXAMPLE = Path(__file__).parent / "user_job" / "my_job.py"
JOB, FOLDER = "my_job:JOB", "my_job.JOB"  # what the user types; the job's name in the run
#: 4 chunks of 10 epochs; the fault comes in the fourth epoch of chunk 2 (0-based epochs 10-19).
SMALL = {"epochs": 40, "chunk_epochs": 10, "seed": 3}
FAULT_EPOCH = 13


def test_the_docs_show_the_tested_example() -> None:
    doc = (ROOT / "docs" / "jobs.md").read_text()
    assert f"```python\n{EXAMPLE.read_text()}```" in doc, "docs/jobs.md's example differs from tests/user_job/my_job.py"
    assert "(docs/jobs.md)" in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """The user's own folder, outside the repository: the example job and a CSV beside it."""
    folder = tmp_path_factory.mktemp("my-project")
    assert not folder.resolve().is_relative_to(ROOT)
    shutil.copy(EXAMPLE, folder / "my_job.py")
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (200, 2))
    np.savetxt(folder / "points.csv", np.c_[x, 2 * x[:, 0] - 3 * x[:, 1] + 1 + rng.normal(0, 0.1, 200)],
               delimiter=",", header="x1,x2,y", comments="")
    (folder / "broken_jobs.py").write_text(BROKEN_JOBS)
    (folder / "unimportable.py").write_text('raise RuntimeError("a bug at import")\n')
    return folder


#: Jobs whose every chunk and every retry would fail the same way.
BROKEN_JOBS = """
from dataclasses import replace

from torch import nn

from my_job import JOB

WIDE = replace(JOB, build_model=lambda cfg: nn.Linear(2, 3))  # [B, 3] outputs for [B, 1] targets


def fail(path):
    raise ValueError("cannot parse this file")


LOADS = replace(JOB, load=fail)
"""


@pytest.fixture
def importable(user_dir: Path, monkeypatch) -> Path:
    """The user's folder on sys.path of this process (for in-process flow runs)."""
    monkeypatch.syspath_prepend(str(user_dir))
    return user_dir


def command(script: Path, args: list[str], cwd: Path, prefect_api: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env={**cli_env(prefect_api), **env},
                          capture_output=True, text=True, timeout=600)


def flags(options: dict[str, int]) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def reference(user_dir: Path, prefect_api: str) -> Path:
    """An uninterrupted run by the real command, run from the user's folder (the module is
    found there, the data is the job's default beside it)."""
    proc = command(TRAIN, ["--job", JOB, *flags(SMALL), "--artifacts-dir", "artifacts", "--run-name", "ref"],
                   user_dir, prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{FOLDER}: completed" in proc.stdout
    return user_dir / "artifacts" / FOLDER / "ref"


def test_trains_from_its_own_folder_and_predicts(reference: Path, importable: Path, prefect_api: str) -> None:
    record = json.loads((reference / "config.json").read_text())
    assert record["job"] == FOLDER and json.loads((reference / "metrics.json").read_text())["job"] == FOLDER
    code = json.loads((reference / "run.json").read_text())["environment"]["job_code"]  # the job's code, not ours
    assert code["module"] == "my_job" and code["file"] == str((importable / "my_job.py").resolve())
    for name in ("model_state_dict.pt", "model.pt", "history.csv", "summary.md", "checkpoints/checkpoint-4.pt"):
        assert (reference / name).is_file(), name
    # Predict from elsewhere (the repository root), the module found through PYTHONPATH.
    args = ["--run", str(reference.parent / "latest"), "--x", "1", "2", "--x", "0", "0", "--json"]
    proc = command(PREDICT, args, ROOT, prefect_api, PYTHONPATH=str(importable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = get_job(JOB)
    model = spec.build_model(spec.config())
    model.load_state_dict(state_dict(reference / "model_state_dict.pt"))
    with torch.no_grad():
        expected = model(torch.tensor([[1.0, 2.0], [0.0, 0.0]])).tolist()
    assert json.loads(proc.stdout) == [{"input": "x1=1 x2=2", "output": expected[0]},
                                       {"input": "x1=0 x2=0", "output": expected[1]}]
    # Without it: the one-line error names the missing module and the fix.
    proc = command(PREDICT, args, ROOT, prefect_api)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: job my_job.JOB: no module named 'my_job'; ") and "PYTHONPATH" in proc.stderr


def test_exception_in_chunk_2_resumes_bit_exact(reference: Path, importable: Path, prefect_api: str,
                                                tmp_path: Path, monkeypatch) -> None:
    calls = fail_once_at(monkeypatch, FAULT_EPOCH)
    result = train_flow(job=JOB, artifacts_dir=str(tmp_path), run_name="fault", **SMALL)[FOLDER]
    assert Path(result["run_dir"]) == tmp_path / FOLDER / "fault"
    # Prefect retried chunk 2, which resumed from checkpoint-1: only chunk 2's epochs are redone.
    assert calls.count(FAULT_EPOCH) == 2 and calls.count(10) == 2 and calls.count(9) == 1, calls
    assert_same_run(Path(result["run_dir"]), reference)


def test_the_deployments_flow_takes_it_as_its_job_parameter(importable: Path, prefect_api: str, tmp_path: Path) -> None:
    from deployments.flow import scheduled_train
    from deployments.registry import deployments

    [deployment] = deployments(jobs=[JOB])
    assert deployment["name"] == FOLDER and deployment["parameters"]["job"] == FOLDER
    assert deployment["parameters"]["epochs"] == 40 and deployment["parameters"]["optimizer"] == "adam"
    result = scheduled_train(job=JOB, run_name="{job}-nightly", epochs=20, chunk_epochs=10, artifacts_dir=str(tmp_path))
    assert result[FOLDER]["status"] == "completed"
    assert (tmp_path / FOLDER / f"{FOLDER}-nightly" / "model_state_dict.pt").is_file()


@pytest.mark.parametrize("job, expected", [
    ("nopkg_for_trainflow.jobs:JOB", "job nopkg_for_trainflow.jobs.JOB: no module named 'nopkg_for_trainflow'; "),
    ("my_job:JBO", "has no 'JBO' (its JobSpecs: JOB); define JBO = JobSpec(...) there"),
    ("my_job:load", "my_job:load is a function, not a JobSpec; point --job at a tasks.jobs.spec.JobSpec"),
    ("my_job.py:JOB", "is a file path; give a module path instead: --job my_job:JOB"),
    ("broken_jobs:WIDE", "the model's output [2, 3] and the targets [2, 1] differ in shape, and MSELoss would "
                         "broadcast them"),
    ("broken_jobs:LOADS", "failed (ValueError: cannot parse this file); fix the job's load or --data (traceback in "),
    ("unimportable:JOB", "job unimportable.JOB: importing module 'unimportable' failed (RuntimeError: a bug at import)"),
])
def test_a_wrong_job_is_one_line_and_writes_nothing(job: str, expected: str, importable: Path, tmp_path: Path,
                                                    capsys) -> None:
    code = main(["--job", job, "--artifacts-dir", str(tmp_path / "artifacts")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "artifacts").exists()


def test_a_wrong_job_from_the_command_line(user_dir: Path, prefect_api: str, tmp_path: Path) -> None:
    proc = command(TRAIN, ["--job", "my_job:JBO", "--artifacts-dir", str(tmp_path / "artifacts")], user_dir, prefect_api)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "has no 'JBO' (its JobSpecs: JOB)" in proc.stderr, proc.stderr
    assert not (tmp_path / "artifacts").exists()
