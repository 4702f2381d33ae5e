"""Scheduled deployments on a real Prefect server (in full on PostgreSQL, as in production; a
smoke run on the session's server, on SQLite, the default backend): registered both
ways (``deployments/serve.py``, and ``deployments/deploy.py`` with ``prefect deploy`` of
``deployments/prefect.yaml``), run by a real serve process and real workers. The workers start
in empty folders and clone the code from a bare git repository (the deployments' pull step);
the artifacts live on an S3 server. A worker SIGKILLed with its run is detected by the heartbeat
automation, and the requeue automation hands the run to the other worker, which resumes it from
S3; a flow-run process killed under a live worker is requeued to that worker."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.automations import AUTOMATION_NAME, SILENT_NAME
from deployments.flow import RUN_NAME_TEMPLATE, resolve_run_name
from deployments.registry import (
    DEFAULT_CRON,
    DEFAULT_TIMEZONE,
    ENTRYPOINT,
    FLOW_NAME,
    PREFECT_YAML,
    SWEEP_ENTRYPOINT,
    WORK_POOL,
    job_parameters,
    prefect_yaml,
    sweep_parameters,
)
from tasks.jobs.registry import JOBS
from tasks.storage.remote import Remote
from tests.helpers import ROOT, assert_same_tensors, descendants, state_dict, train_cli, wait_until

pytestmark = pytest.mark.slow

#: Short but real runs: 6 chunks, so a kill lands mid-run.
RUN = {"epochs": 1500, "chunk_epochs": 250, "seed": 7}
#: A ceiling for each wait on a server, worker or automation: generous, for a busy machine (the
#: automations alone take a minute or two).
CEILING = 600


# --- fast checks: the committed prefect.yaml cannot drift from the job registry ----------


def test_prefect_yaml_is_generated_from_the_job_registry() -> None:
    assert PREFECT_YAML.read_text() == prefect_yaml(), (
        "deployments/prefect.yaml differs from the job registry; run `python deployments/serve.py --write-yaml`")
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    trains = [d for d in doc["deployments"] if d["entrypoint"] == ENTRYPOINT]
    sweeps = [d for d in doc["deployments"] if d["entrypoint"] == SWEEP_ENTRYPOINT]
    assert len(trains) + len(sweeps) == len(doc["deployments"])
    assert {d["name"]: d["parameters"] for d in trains} == {j: job_parameters(j) for j in JOBS}
    assert {d["name"]: d["parameters"] for d in sweeps} == {j: sweep_parameters(j) for j in JOBS}
    for d in trains:
        assert d["schedules"] == [{"cron": DEFAULT_CRON, "timezone": DEFAULT_TIMEZONE, "active": True}]
        assert d["concurrency_limit"]["limit"] == 1
    for d in doc["deployments"]:
        assert d["work_pool"]["name"] == WORK_POOL and (ROOT / d["entrypoint"].split(":")[0]).exists()


def test_every_option_is_a_flag_and_a_parameter_of_both_flows() -> None:
    """Options are defined once, as TrainConfig fields: each is a CLI flag (besides ``--config``,
    a file of them), a ``train`` parameter and a ``scheduled-train`` parameter (but ``fresh``),
    typed and described like the field, and the deployments' parameters are among them."""
    import inspect

    from deployments.flow import scheduled_train
    from flows.train_flow import parser, train_flow
    from tasks.kernel import TrainConfig

    fields = set(TrainConfig.model_fields)
    flags = {a.dest for a in parser()._actions} - {"help"}
    assert flags == fields | {"config"}  # --config FILE: the same options, from a file
    assert set(inspect.signature(train_flow.fn).parameters) == fields
    assert set(inspect.signature(scheduled_train.fn).parameters) == fields - {"fresh"}
    schema = train_flow.parameters.model_dump()["properties"]
    assert schema["nesterov"]["description"] == TrainConfig.model_fields["nesterov"].description
    assert {"type": "boolean"} in schema["nesterov"]["anyOf"]
    assert all(set(job_parameters(j)) <= fields for j in JOBS)
    args = vars(parser().parse_args(["--job", "nonlinear", "--nesterov", "--momentum", "0.9", "--no-compile"]))
    cfg = JOBS[args.pop("job")].config(**args)
    assert cfg.nesterov is True and cfg.momentum == 0.9 and cfg.compile is False and cfg.epochs == 10_000


def test_run_name_comes_from_the_scheduled_time() -> None:
    from datetime import datetime

    t = datetime(2025, 3, 4, 2, 0, tzinfo=UTC)
    assert resolve_run_name(RUN_NAME_TEMPLATE, "nonlinear", t) == "scheduled-20250304T020000Z"
    assert resolve_run_name("{job}-{scheduled:%Y-%m-%d}", "nonlinear", t) == "nonlinear-2025-03-04"


def test_requeue_automation_is_bounded_and_scoped() -> None:
    from prefect.events.schemas.automations import Posture

    from deployments.automations import REQUEUE_AFTER, requeue_crashed
    from deployments.flow import MAX_RUNS

    a = requeue_crashed()
    t = a.trigger
    assert t.after == {"prefect.flow-run.Crashed"} and t.posture == Posture.Proactive and t.within == REQUEUE_AFTER
    assert t.match.model_dump()["prefect.run-count"] == [str(n) for n in range(1, MAX_RUNS)]
    assert t.match_related.model_dump() == {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
    [action] = a.actions
    assert action.type == "change-flow-run-state" and action.state.value == "SCHEDULED"


def test_silent_run_automation_follows_prefects_zombie_recipe() -> None:
    """A heartbeat, then no event of that flow run within 3 heartbeats: Crashed, never forced
    (Prefect then refuses it for a run that already ended), for our flow only, with the
    heartbeat the deployments set."""
    from prefect.events.schemas.automations import Posture

    from deployments.automations import HEARTBEAT_WINDOW, crash_silent
    from deployments.registry import HEARTBEAT_ENV, HEARTBEAT_SECONDS, deployments

    t = crash_silent().trigger
    assert t.after == {"prefect.flow-run.heartbeat"} and t.expect == {"prefect.flow-run.*"}
    assert t.posture == Posture.Proactive and t.for_each == {"prefect.resource.id"}
    assert t.within == HEARTBEAT_WINDOW and HEARTBEAT_WINDOW.total_seconds() >= 3 * HEARTBEAT_SECONDS
    assert t.match_related.model_dump() == {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
    [action] = crash_silent().actions
    assert action.state.value == "CRASHED" and action.force is False
    assert all(HEARTBEAT_ENV.items() <= d["work_pool"]["job_variables"]["env"].items() for d in deployments())


@pytest.mark.parametrize(("repository", "branch", "expected"), [
    ("file:///nonexistent/trainflow.git", "main", "cannot reach repository file:///nonexistent/trainflow.git"),
    (f"file://{ROOT}", "no-such-branch", "has no branch 'no-such-branch'"),
])
def test_deploy_refuses_a_repository_it_cannot_clone(repository: str, branch: str, expected: str) -> None:
    """Checked before anything is registered: one line, exit 2 (no server is running here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    p = subprocess.run([sys.executable, "deployments/deploy.py", "--repository", repository, "--branch", branch],
                       cwd=ROOT, env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}, capture_output=True,
                       text=True, timeout=CEILING)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and expected in p.stderr and p.stderr.count("\n") == 1, p.stderr


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of ``pid`` and of every descendant (a flow run may sit in
    its own process group)."""
    groups = set()
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(p))
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)


class Procs:
    """Processes started by a test, each in its own process group; all stopped at the end."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, cmd: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(cmd, cwd=kw.pop("cwd", ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
        p.log_path, p.log = self.logs / f"{name}.log", log
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if p.poll() is None:
            kill_tree(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(p.pid, signal.SIGKILL)  # stragglers in the group and descendants
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        p.log.close()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)

    def tail(self, p: subprocess.Popen, n: int = 3000) -> str:
        p.log.flush()
        return p.log_path.read_text()[-n:]


# --- one Prefect server per backend ------------------------------------------------------


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, f"{name} not found: apt-get install -y postgresql (.ci/run does)"
    return found[-1]


@contextlib.contextmanager
def postgres(procs: Procs) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port, with a database for Prefect and one for
    the sweeps' studies (each keeps an alembic_version table); yields the first's asyncpg URL."""
    root = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))  # not under /tmp/pytest-of-*: postgres must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port, data = free_port(), root / "data"
    try:
        subprocess.run([*as_user, pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=CEILING)
        subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "300",
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=CEILING)
        for db in ("prefect", "optuna"):
            subprocess.run([*as_user, pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                           check=True, capture_output=True, timeout=CEILING)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


class Server:
    def __init__(self, url: str, home: Path, procs: Procs, tmp: Path, database: str | None = None):
        self.url, self.home, self.procs, self.tmp = url, home, procs, tmp
        self.database = database  # its PostgreSQL database's URL (None: SQLite)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a client process (CLI, worker, serve) of this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=self.url, PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_WORKER_QUERY_SECONDS="1",
                   PREFECT_WORKER_HEARTBEAT_SECONDS="5", PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1", **extra)
        return env

    def cli(self, *args: str, timeout: float = CEILING) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=self.env(),
                           check=False, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"prefect {' '.join(args)}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p

    @contextlib.contextmanager
    def client(self):
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.url}), get_client(sync_client=True) as c:
            yield c


@contextlib.contextmanager
def prefect_server(backend: str, tmp: Path) -> Iterator[Server]:
    """A Prefect server on ``backend`` (sqlite or postgresql), its processes stopped at the end."""
    procs = Procs(tmp)
    try:
        with contextlib.ExitStack() as stack:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       PREFECT_SERVER_UI_ENABLED="false",
                       # no clock-driven runs during the test: schedules are checked, not waited for
                       PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
                       PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false")
            if backend == "postgresql":
                env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = stack.enter_context(postgres(procs))
            database = env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
            port = free_port()
            proc = procs.start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                          "--port", str(port)], env, cwd=tmp)
            url = f"http://127.0.0.1:{port}/api"

            def healthy() -> bool:
                try:
                    return urllib.request.urlopen(f"{url}/health", timeout=5).read() == b"true"
                except OSError:
                    return False

            wait_until(healthy, CEILING, "the prefect server", proc=proc, every=0.5)
            yield Server(url, tmp / "home", procs, tmp, database)
    finally:
        procs.stop_all()


# --- helpers on flow runs ----------------------------------------------------------------


def run_folder(root: Path, flow_run) -> Path:
    return root / "nonlinear" / resolve_run_name(RUN_NAME_TEMPLATE, "nonlinear", flow_run.expected_start_time)


def trigger(server: Server, parameters: dict[str, Any], deployment: str = f"{FLOW_NAME}/nonlinear"):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.url}):
        return run_deployment(deployment, parameters=parameters, timeout=0)


def state_of(server: Server, flow_run_id):
    with server.client() as c:
        return c.read_flow_run(flow_run_id)


def wait_final(server: Server, flow_run_id, alive: list[subprocess.Popen], what: str = "the flow run to end"):
    """The flow run once it ended (any final state)."""
    return wait_until(lambda: (r := state_of(server, flow_run_id)).state.is_final() and r, CEILING, what, proc=alive,
                      every=0.5)


def wait_completed(server: Server, flow_run_id, alive: list[subprocess.Popen]):
    fr = wait_final(server, flow_run_id, alive, "the flow run to complete")
    assert fr.state.is_completed(), f"{fr.state}\n" + "\n".join(server.procs.tail(p) for p in alive)
    return fr


def check_registered(server: Server, parameters: dict[str, dict[str, Any]], work_pool: str | None) -> None:
    """Each job's deployment exists with the nightly cron, ``parameters[job]`` and limit 1."""
    with server.client() as c:
        for job, expected in parameters.items():
            d = c.read_deployment_by_name(f"{FLOW_NAME}/{job}")
            assert d.parameters == expected
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == [
                (DEFAULT_CRON, DEFAULT_TIMEZONE, True)]
            assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1
            assert d.work_pool_name == work_pool
            assert not d.paused


# --- the end-to-end test in full on PostgreSQL; its first step on the session's server (SQLite) ---


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory) -> Iterator[Server]:
    with prefect_server("postgresql", tmp_path_factory.mktemp("prefect-postgresql")) as server:
        yield server


@pytest.fixture
def session_server(prefect_api: str, tmp_path: Path) -> Iterator[Server]:
    """The test session's own Prefect server (SQLite), with this test's processes: a server of
    its own would only cost a start (the automations serve.py registers act on the
    scheduled-train flow only, which no other test runs)."""
    procs = Procs(tmp_path)
    try:
        yield Server(prefect_api, tmp_path / "home", procs, tmp_path)
    finally:
        procs.stop_all()


def serve_and_run_once(server: Server, served: Path) -> Path:
    """``deployments/serve.py`` registers every job's deployment and the automations, and runs a
    triggered run to completion, and a triggered sweep of two trials; then Ctrl-C. Returns the
    run's folder."""
    procs = server.procs
    serve = procs.start("serve", [sys.executable, "deployments/serve.py", "--artifacts-dir", str(served)], server.env())

    def registered() -> bool:
        with server.client() as c:
            try:
                return all(c.read_deployment_by_name(f"{FLOW_NAME}/{j}").schedules for j in JOBS)
            except Exception:  # noqa: BLE001 - not there yet
                return False

    wait_until(registered, CEILING, "the served deployments", proc=serve, every=0.5)
    check_registered(server, {j: {**job_parameters(j), "artifacts_dir": str(served)} for j in JOBS}, work_pool=None)
    assert sorted((a.name, a.enabled) for a in automations(server)) == sorted([(AUTOMATION_NAME, True), (SILENT_NAME, True)]), \
        "serve.py registers the automations"
    ref = wait_completed(server, trigger(server, RUN).id, alive=[serve])
    ref_folder = run_folder(served, ref)
    record = json.loads((ref_folder / "run.json").read_text())
    assert record["status"] == "completed" and record["attempts"] == 1, sorted(served.rglob("*"))
    assert {"metrics.json", "model_state_dict.pt", "model.pt", "history.csv"} <= {p.name for p in ref_folder.iterdir()}
    # The on-demand sweep beside it, its trials and space edited for this run.
    with server.client() as c:
        assert c.read_deployment_by_name("sweep/nonlinear").parameters == {**sweep_parameters("nonlinear"),
                                                                          "artifacts_dir": str(served)}
    edited = {"trials": 2, "space": ["lr=log:1e-5:1e-4"], "pruner": "none", "epochs": 200, "chunk_epochs": 100}
    wait_completed(server, trigger(server, edited, "sweep/nonlinear").id, alive=[serve])
    (trials_csv,) = (served / "sweeps").glob("*/trials.csv")
    assert [row.split(",")[1] for row in trials_csv.read_text().splitlines()[1:]] == ["COMPLETE", "COMPLETE"]
    assert (trials_csv.parent / "best_config.json").exists()
    procs.stop(serve, signal.SIGINT)  # Ctrl-C: serve pauses its schedules
    return ref_folder


def test_served_deployments_run_on_sqlite(session_server: Server, tmp_path: Path) -> None:
    """SQLite, the default backend: serve.py registers the deployments, and a triggered run and a
    triggered sweep complete (the end-to-end scenario below runs on PostgreSQL)."""
    serve_and_run_once(session_server, tmp_path / "served")


@pytest.mark.timeout(1800)  # a dozen processes and two automations' timers, one after the other
def test_scheduled_deployments_end_to_end(postgres_server: Server, s3_server, prefect_api: str, tmp_path: Path) -> None:
    server, procs = postgres_server, postgres_server.procs
    # 1. The uninterrupted reference: the same run from the command (serve.py is proven on SQLite, above).
    options = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    ref_folder = train_cli(["--job", "nonlinear", *options], prefect_api, tmp_path / "ref", "ref")

    # 2. work pool, the cluster way: deployments/deploy.py registers prefect.yaml's deployments,
    # whose pull step clones the code from a bare repository; each worker starts in an empty
    # folder with its own cache, and the artifacts root is on the S3 server (no shared disk).
    repo, commit = snapshot_repository(tmp_path)
    deployed = subprocess.run([sys.executable, "deployments/deploy.py", "--repository", repo, "--branch", "main"],
                              cwd=ROOT, env=server.env(), capture_output=True, text=True, timeout=CEILING)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    in_yaml = {d["name"]: d["parameters"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
               if d["entrypoint"] == ENTRYPOINT}
    check_registered(server, in_yaml, work_pool=WORK_POOL)
    with server.client() as c:
        assert c.read_deployment_by_name("sweep/nonlinear").work_pool_name == WORK_POOL
    assert sorted(a.name for a in automations(server)) == sorted([AUTOMATION_NAME, SILENT_NAME])
    root = f"{s3_server.bucket()}/shared"
    w1 = worker(server, tmp_path, "worker-1", root)

    # 3. The machine dies: worker-1 SIGKILLed with its flow-run process mid-run. Nobody reports
    # it; the heartbeat automation marks the run Crashed, the requeue automation hands it to
    # worker-2, which resumes it from the checkpoints on S3.
    fr = trigger(server, RUN)
    run = Remote(f"{root}/nonlinear/{resolve_run_name(RUN_NAME_TEMPLATE, 'nonlinear', fr.expected_start_time)}")
    wait_until(lambda: len(commits(run)) >= 2, CEILING, "checkpoint 2 on S3", proc=w1, every=0.1)  # then the kill
    # now the only worker with a free slot; its sweeps' studies on the Prefect server's PostgreSQL
    studies = server.database.replace("+asyncpg", "").rsplit("/", 1)[0] + "/optuna"
    w2 = worker(server, tmp_path, "worker-2", root, TRAINFLOW_STUDY_DB=studies)
    procs.stop(w1, signal.SIGKILL)  # the worker, its flow run process, everything in them
    before = commits(run)
    assert len(before) < 6, "the kill came too late to interrupt anything"
    assert state_of(server, fr.id).state.is_running(), "a dead worker's run stays Running until its heartbeats stop"
    wait_until(lambda: "Crashed" in states(server, fr.id), CEILING, "the heartbeat automation to mark the run Crashed",
               proc=w2, every=1)
    wait_until(lambda: len(commits(run)) > len(before), CEILING, "a new checkpoint: resumed on worker-2", proc=w2,
               every=0.2)
    fr = wait_completed(server, fr.id, alive=[w2])
    check_resumed(run, before, ref_folder, commit, tmp_path)
    # The job's sweep deployment on the same worker: the sweep and its trials' runs on S3, its
    # study in PostgreSQL (no study.db on the store).
    tiny = {"trials": 2, "space": ["lr=log:1e-5:1e-4"], "pruner": "none", "epochs": 200, "chunk_epochs": 100}
    wait_completed(server, trigger(server, tiny, "sweep/nonlinear").id, alive=[w2])
    sweeps = Remote(f"{root}/sweeps")
    (table,) = [k for k in sweeps.keys() if k.endswith("/trials.csv")]
    assert [row.split(",")[1] for row in sweeps.get(table).decode().splitlines()[1:]] == ["COMPLETE", "COMPLETE"]
    assert not [k for k in sweeps.keys() if k.endswith("study.db")]
    import optuna

    (name,) = optuna.get_all_study_names(f"postgresql+psycopg://{studies.split('://', 1)[1]}")
    assert name == f"trainflow:{root}/sweeps/{table.split('/')[0]}"

    # 4. Only the flow-run process dies, under a live worker: the worker reports Crashed, the
    # automation (registered again, idempotently) requeues the same run to the same worker.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.automations import main as register_automation

    with temporary_settings({PREFECT_API_URL: server.url}):  # = python deployments/automations.py
        assert register_automation([]) == 0
    assert sorted(a.name for a in automations(server)) == sorted([AUTOMATION_NAME, SILENT_NAME]), "registered twice: no copies"
    fr = trigger(server, RUN)
    run = Remote(f"{root}/nonlinear/{resolve_run_name(RUN_NAME_TEMPLATE, 'nonlinear', fr.expected_start_time)}")
    wait_until(lambda: len(commits(run)) >= 2, CEILING, "checkpoint 2 on S3", proc=w2, every=0.1)  # then the kill
    runs = descendants(w2.pid)
    assert runs, "no flow-run process under worker-2"
    for pid in runs:  # the flow-run process only, not the worker
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    before = commits(run)
    assert len(before) < 6, "the kill came too late to interrupt anything"
    # Crashed, then requeued by the automation 60-65 s later (see REQUEUE_AFTER)
    wait_until(lambda: "AwaitingRetry" in states(server, fr.id), CEILING, "the automation to requeue the crashed run",
               proc=w2, every=0.5)
    fr = wait_completed(server, fr.id, alive=[w2])
    assert fr.run_count == 2
    check_resumed(run, before, ref_folder, commit, tmp_path)
    procs.stop(w2)

    # 5. A worker without the storage extra: the run fails (after the flow's own retries) with
    # the one line that names the install command, no traceback, and a non-zero exit.
    shim = tmp_path / "no-s3fs" / "s3fs"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 's3fs'\")\n")
    w3 = worker(server, tmp_path, "worker-3", root, PYTHONPATH=str(shim.parent))
    # First a repository that moved after the deploy: the run crashes before it starts.
    set_repository(server, "file:///nonexistent/trainflow.git")
    fr = trigger(server, RUN)
    fr = wait_final(server, fr.id, alive=[w3], what="the run whose clone fails to crash")
    assert fr.state.is_crashed() and fr.run_count == 0, fr.state  # run count 0: never requeued
    # Prefect 3.9 prints the pull step's error in the worker's output only, not in the run's logs.
    assert "Failed to clone repository 'file:///nonexistent/trainflow.git'" in w3.log_path.read_text()
    set_repository(server, repo)
    fr = trigger(server, RUN)
    fr = wait_final(server, fr.id, alive=[w3], what="the run on a worker without s3fs to fail")
    assert fr.state.is_failed() and "pip install -e '.[s3]'" in fr.state.message, fr.state
    errors = error_logs(server, fr.id)
    assert any("pip install -e '.[s3]'" in line for line in errors) and not any("Traceback" in e for e in errors), errors
    wait_until(lambda: w3.log_path.read_text().count("Process exited with status code: 1") >= 2, CEILING,
               "its process to exit 1 (as the clone's did)", proc=w3, every=0.5)
    procs.stop(w3)

    # 6. The fallback for a server without the automations: mark_crashed.py on a Running run.
    from prefect.states import Running

    from deployments.mark_crashed import mark_crashed

    with server.client() as c, temporary_settings({PREFECT_API_URL: server.url}):
        stuck = c.create_flow_run_from_deployment(c.read_deployment_by_name(f"{FLOW_NAME}/nonlinear").id)
        c.set_flow_run_state(stuck.id, Running(), force=True)
        assert mark_crashed(stuck.id) == "Crashed"


# --- helpers of the work-pool part ------------------------------------------------------------


def snapshot_repository(tmp: Path) -> tuple[str, str]:
    """A bare repository whose branch ``main`` holds this working tree as it is (tracked and
    untracked files, .gitignore applied), committed through a private index: what the workers
    clone. Returns its ``file://`` URL and the commit."""
    bare = tmp / "trainflow.git"
    who = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env = {**os.environ, **who, "GIT_INDEX_FILE": str(tmp / "snapshot.index")}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                              timeout=CEILING).stdout.strip()

    git("init", "-q", "--bare", str(bare))
    git("read-tree", "HEAD")
    git("add", "-A")
    commit = git("commit-tree", git("write-tree"), "-p", "HEAD", "-m", "the working tree under test")
    git("push", "-q", str(bare), f"{commit}:refs/heads/main")
    return f"file://{bare}", commit


def worker(server: Server, tmp: Path, name: str, root: str, **env: str) -> subprocess.Popen:
    """A process worker on "its own machine": an empty folder, its own cache, artifacts on S3."""
    home = tmp / name
    home.mkdir()
    env = server.env(TRAINFLOW_ARTIFACTS_DIR=root, TRAINFLOW_CACHE=str(home / "cache"), HOME=str(home), **env)
    return server.procs.start(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type",
                                     "process", "--limit", "1", "--name", name], env, cwd=home)


def set_repository(server: Server, url: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.variables import Variable

    from deployments.registry import REPOSITORY_VAR

    with temporary_settings({PREFECT_API_URL: server.url}):
        Variable.set(REPOSITORY_VAR, url, overwrite=True)


def automations(server: Server) -> list:
    with server.client() as c:
        return [a for name in (AUTOMATION_NAME, SILENT_NAME) for a in c.read_automations_by_name(name)]


def states(server: Server, flow_run_id) -> list[str]:
    with server.client() as c:
        return [s.name for s in c.read_flow_run_states(flow_run_id)]


def error_logs(server: Server, flow_run_id) -> list[str]:
    """The flow run's logs at ERROR and above, as the UI shows them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

    with server.client() as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                                     level=LogFilterLevel(ge_=40)))
    return [log.message for log in logs]


def commits(run: Remote) -> dict[str, str | None]:
    """ETag of every committed checkpoint's manifest and bytes on the store."""
    keys = run.keys("checkpoints")
    return {k: run.etag(k) for k in keys if k.endswith(".json") or k[:-3] + ".json" in keys}


def check_resumed(run: Remote, before: dict[str, str | None], ref_folder: Path, commit: str, tmp: Path) -> None:
    """The run on S3 completed in a second attempt, from the cloned code, with the commits made
    before the kill untouched and the same bits as the uninterrupted run."""
    assert {k: run.etag(k) for k in before} == before, "checkpoints written before the kill were rewritten"
    assert len([k for k in run.keys("checkpoints") if k.endswith(".json")]) == 6
    record = json.loads(run.get("run.json"))
    assert record["status"] == "completed" and record["attempts"] == 2, record
    code = record["environment"]["git"]
    assert code["commit"] == commit and Path(code["root"]) != ROOT, f"not the cloned code: {code}"
    local = tmp / f"{run.url.rsplit('/', 1)[1]}.pt"
    local.write_bytes(run.get("model_state_dict.pt"))
    assert_same_tensors(state_dict(local), state_dict(ref_folder / "model_state_dict.pt"))
    assert run.get("history.csv") == (ref_folder / "history.csv").read_bytes()
