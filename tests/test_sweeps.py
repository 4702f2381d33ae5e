"""Sweeps (flows/sweep_flow.py): a sweep killed inside a trial resumes that trial and ends as an
uninterrupted one, pruning included; trials side by side stop at checkpoints with the sweep and
resume; a finished one reports; bad input is one line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from flows.sweep_flow import main
from flows.train_flow import main as train
from tasks.kernel import read_json
from tasks.storage.store import OWNER_FILE
from tests.helpers import ROOT, answers, cli_env, wait_until

#: 3 trials of 600 epochs in 3 chunks, lr from a seeded TPE sampler (its random start-up), the
#: median pruner judging the third trial after its first and second chunks.
ARGS = ["--job", "nonlinear", "--epochs", "600", "--chunk-epochs", "200", "--seed", "3", "--trials", "3",
        "--space", "lr=log:1e-5:3e-4", "--pruner", "median", "--sweep-name", "s"]


def trials(folder: Path) -> list[dict[str, str]]:
    """trials.csv's rows without their durations (none before the first is written)."""
    if not (folder / "trials.csv").exists():
        return []
    with open(folder / "trials.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def sweep_command(args: list[str], prefect_api: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "flows" / "sweep_flow.py"), *args], cwd=ROOT,
                            env=cli_env(prefect_api), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_when(args: list[str], prefect_api: str, moment, what: str):
    """Start the sweep command; SIGKILL its process group at ``moment()`` (truthy); that value."""
    proc = sweep_command(args, prefect_api)
    value = wait_until(moment, what=what, proc=proc, every=0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return value


def chunks_recorded(run_dir: Path) -> int:
    """Chunks the run's record holds (run.json is rewritten after each chunk's checkpoint)."""
    return len((read_json(run_dir / "run.json") or {}).get("chunks", {}))


def trainer_pid(run_dir: Path) -> int:
    return int((read_json(run_dir / OWNER_FILE) or {})["pid"])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.fixture
def mlflow_server(s3_server, tmp_path: Path):
    """A real MLflow tracking server: runs in SQLite, artifacts on the test's S3, which the runs
    upload through the server (its default, proxied artifacts). Returns its URL."""
    from tasks.orchestration.server import reserve_port

    with reserve_port() as sock:
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    artifacts = f"{s3_server.bucket()}/mlflow"
    with open(tmp_path / "mlflow.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", artifacts,
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url), 300, "the MLflow server", proc=proc, every=0.3)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def mlflow_sweep(url: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    """The sweep's MLflow run and its children's, by run name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("nonlinear").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("trainflow.sweep_dir") == str(folder.resolve())]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def steps(url: str, run: Any, key: str = "train_loss") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(url).get_metric_history(run.info.run_id, key))


def test_a_sweep_killed_inside_a_trial_resumes_it_and_ends_as_an_uninterrupted_one(
        prefect_api: str, mlflow_server, tmp_path: Path, capsys) -> None:
    """SIGKILL to the command's process group inside trial 1's run (the trial's own process dies
    with it), then again as that trial ends before the study is told, then between trials: each
    rerun of the same command takes the cut trial up from its checkpoints (none starts over),
    and the sweep ends with the same trials, values, pruned trial and best trial, bit for bit, as
    an uninterrupted sweep; in MLflow too (a parent run, one child per trial, each with every
    epoch once). Then it reruns as already complete."""
    url, artifacts = mlflow_server
    assert main([*ARGS, "--artifacts-dir", str(tmp_path / "ref"), "--mlflow", url]) == 0
    reference = trials(tmp_path / "ref" / "sweeps" / "s")
    assert [row["state"] for row in reference] == ["COMPLETE", "COMPLETE", "PRUNED"], reference
    folder = tmp_path / "arts" / "sweeps" / "s"
    args = [*ARGS, "--artifacts-dir", str(tmp_path / "arts"), "--mlflow", url]
    trial_1 = folder / "nonlinear" / "trial-001"
    # 1. Inside trial 1's second chunk; its own process dies with the command.
    trainer = kill_when(args, prefect_api, lambda: chunks_recorded(trial_1) and trainer_pid(trial_1), "trial 1's chunk")
    wait_until(lambda: gone(trainer), 30, "the trial's process to die with the sweep")
    assert not (trial_1 / "metrics.json").exists(), "killed too late: trial 1 had finished"
    # 2. As trial 1 ends (its metrics written), before the study hears of it.
    kill_when(args, prefect_api, (trial_1 / "metrics.json").exists, "trial 1's end")
    assert trials(folder)[1]["state"] == "RUNNING"
    # 3. Between trials: trial 1 told, trial 2 just asked for.
    kill_when(args, prefect_api, lambda: [r["state"] for r in trials(folder)] == ["COMPLETE", "COMPLETE", "RUNNING"],
              "trial 1 told and trial 2 asked")
    assert main(args) == 0
    assert trials(folder) == reference
    assert all((folder / name).stat().st_size > 0 for name in ("history.png", "parameters.png", "summary.md"))
    assert json.loads((folder / "best_config.json").read_text()) == \
        json.loads((tmp_path / "ref" / "sweeps" / "s" / "best_config.json").read_text())
    record = json.loads((trial_1 / "run.json").read_text())  # each attempt resumed: none started over
    assert record["attempts"] >= 2 and all(r["from_checkpoint"] for r in record["resumes"][1:]), record
    check_mlflow(url, artifacts, tmp_path / "ref" / "sweeps" / "s", folder, record)
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("sweep: already complete: best trial ")
    # best_config.json trains again as an ordinary run, to the best trial's value.
    assert train(["--config", str(folder / "best_config.json"), "--artifacts-dir", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again" / "nonlinear").glob("run-*")
    best = min(float(row["loss"]) for row in trials(folder) if row["state"] == "COMPLETE")
    assert json.loads((again / "metrics.json").read_text())["val"]["loss"] == best


def check_mlflow(url: str, artifacts: str, reference: Path, folder: Path, record: dict[str, Any]) -> None:
    """The killed sweep's MLflow runs are the uninterrupted one's: a finished parent with the best
    trial's figures, one child per trial, and each completed trial's run (trial 1's across its
    attempts, the run.json names it) holding every epoch once, with the same values; the files
    are on S3."""
    import s3fs

    ref_parent, ref_children = mlflow_sweep(url, reference)
    parent, children = mlflow_sweep(url, folder)
    assert parent.info.status == "FINISHED" and parent.data.params["space.lr"] == ref_parent.data.params["space.lr"]
    assert parent.data.metrics == ref_parent.data.metrics and parent.data.metrics["best_trial"] in (0, 1)
    assert sorted(children) == sorted(ref_children) == ["trial-000", "trial-001", "trial-002"]
    assert children["trial-001"].info.run_id == record["mlflow_run_id"]
    for name in ("trial-000", "trial-001"):
        assert children[name].info.status == "FINISHED"
        assert steps(url, children[name]) == steps(url, ref_children[name])
        assert [s for s, _ in steps(url, children[name])] == list(range(1, 601))
    assert [s for s, _ in steps(url, children["trial-002"])] == list(range(1, len(steps(url, children["trial-002"])) + 1))
    assert children["trial-002"].info.status == "KILLED"  # pruned: stopped at a checkpoint
    assert {"model_state_dict.pt", "summary.md", "loss.png"} <= {
        p.rsplit("/", 1)[-1] for p in s3fs.S3FileSystem(skip_instance_cache=True).find(artifacts.removeprefix("s3://"))}


def test_trials_side_by_side_on_a_store_stop_at_checkpoints_with_the_sweep_and_resume_elsewhere(
        prefect_api: str, s3_server, tmp_path: Path, monkeypatch) -> None:
    """--parallel 2 with --artifacts-dir s3://: two trials train at once, each in its own process,
    their runs on the store. SIGTERM to the sweep stops both at checkpoints (exit 143, one line);
    the same command on another machine (an empty local cache) takes the sweep and both trials
    up from the store and completes them."""
    from tasks.orchestration.trials import record_reader

    root = s3_server.bucket()
    # 6 chunks: both trials are mid-run when the stop comes (the first to start is a chunk or two ahead).
    args = [*ARGS[:-4], "--trials", "2", "--parallel", "2", "--epochs", "1200", "--sweep-name", "p",
            "--artifacts-dir", root]
    records = [record_reader(f"{root}/sweeps/p/nonlinear/trial-{n:03d}") for n in (0, 1)]
    stopped = subprocess.Popen([sys.executable, str(ROOT / "flows" / "sweep_flow.py"), *args], cwd=ROOT,
                               env=cli_env(prefect_api, TRAINFLOW_CACHE=str(tmp_path / "machine-1")),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: all((read("run.json") or {}).get("chunks") for read in records), what="both trials' first "
               "chunk on the store", proc=stopped)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143 and err.splitlines()[-1].startswith("stopped: SIGTERM: the sweep and its "
                                                                          "running trials stopped"), err[-2000:]
    assert [read("run.json")["status"] for read in records] == ["stopped", "stopped"]
    study = record_reader(f"{root}/sweeps/p")  # the sweep's files, read from the store
    assert study("sweep.json")["space"], "the stopped sweep left its files on the store"
    monkeypatch.setenv("TRAINFLOW_CACHE", str(tmp_path / "machine-2"))
    rerun = datetime.now()
    assert main(args) == 0
    assert (study("best_config.json") or {}).get("job") == "nonlinear"
    # The trials are the ones the first machine asked for (its study, from the store), taken up.
    import optuna
    import s3fs

    (tmp_path / "study.db").write_bytes(s3fs.S3FileSystem(skip_instance_cache=True).cat(f"{root}/sweeps/p/study.db"))
    asked = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'study.db'}").get_trials()
    assert [t.state.name for t in asked] == ["COMPLETE", "COMPLETE"] and all(t.datetime_start < rerun for t in asked)
    for read in records:
        record = read("run.json")
        assert record["attempts"] == 2 and record["resumes"][-1]["from_checkpoint"].startswith("checkpoint-"), record
        assert (read("metrics.json") or {}).get("val"), "trial not complete"
    csv_text = s3fs.S3FileSystem(skip_instance_cache=True).cat(f"{root}/sweeps/p/trials.csv").decode()
    assert [row["state"] for row in csv.DictReader(csv_text.splitlines())] == ["COMPLETE", "COMPLETE"]


@pytest.mark.parametrize(("options", "error"), [
    (["--trials", "0"], "error: --trials 0: a sweep needs at least 1 trial"),
    (["--space", "width=int:1:4"], "error: --space 'width=int:1:4': 'width' is not an option a sweep can vary"),
    (["--space", "lr=log:1e-2:1e-4"], "error: --space 'lr=log:1e-2:1e-4': the low end must be below the high end"),
    (["--space", "lr=log:0:1e-4"], "error: --space 'lr=log:0:1e-4': a log range needs a positive low end"),
    (["--lr", "0.1"], "error: --lr is both fixed and in --space; give one"),
    (["--space", "lr=float:0.1:0.2"], "error: --space names an option twice; give each option one range"),
    (["--sampler", "grid"], "error: --sampler grid needs choices or int ranges; --space lr is a float range"),
    (["--sampler", "anneal"], "error: argument --sampler: invalid choice: 'anneal'"),
    (["--pruner", "asha"], "error: argument --pruner: invalid choice: 'asha'"),
    (["--parallel", "0"], "error: --parallel 0: run at least 1 trial at a time"),
    (["--study-db", "optuna.db"], "error: --study-db 'optuna.db': give a database URL, e.g. postgresql://"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(options: list[str], error: str, tmp_path: Path,
                                                          capsys) -> None:
    argv = ["--job", "nonlinear", "--trials", "3", "--space", "lr=log:1e-5:1e-3", *options,
            "--artifacts-dir", str(tmp_path / "a")]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(error) and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()


def test_trials_side_by_side_share_the_cores(monkeypatch) -> None:
    """--threads auto gives each of K trial processes (ranks included) its share of 16 cores,
    one kept free; a number of threads, or the user's $OMP_NUM_THREADS, is left as it is."""
    from tasks.orchestration.trials import share_of_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert share_of_cores("auto", 4) == {"OMP_NUM_THREADS": "3"}
    assert share_of_cores("auto", 32) == {"OMP_NUM_THREADS": "1"}
    assert share_of_cores("auto", 1) == share_of_cores(2, 4) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert share_of_cores("auto", 4) == {}
