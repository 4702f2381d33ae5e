"""Every surface of issue 5: Prefect artifacts, PNG plots, TensorBoard events (also across a
killed and a failed attempt), run.json hashes, the latest pointer, predict_flow and model.pt2."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.storage.records import ChunkResult  # noqa: E402
from tests.helpers import (
    PREDICT,
    ROOT,
    TRAIN,
    assert_tensorboard_matches_history,
    cli_env,
    history,
    run_of,
    scalars,
    train_cli,
    wait_until,
)


SMALL = ["--job", "nonlinear", "--epochs", "30", "--chunk-epochs", "10", "--seed", "3"]


@pytest.fixture(scope="module")
def run_dir(prefect_api: str, tmp_path_factory) -> Path:
    """One small, uninterrupted run through the real command."""
    return train_cli(SMALL, prefect_api, tmp_path_factory.mktemp("obs"), "Obs_1")


def read_artifacts(keys: list[str]):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))


# --- Prefect ---------------------------------------------------------------------------------


def test_artifact_keys_follow_prefects_rules() -> None:
    from tasks.reporting import artifact_key

    assert artifact_key("nonlinear", "run-8f957a76e2", "progress") == "nonlinear-run-8f957a76e2-progress"
    assert artifact_key("fashion_mnist", "My_Run.2", "summary") == "fashion-mnist-my-run-2-summary"
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("A__b", "..x..", "history"))


def test_prefect_has_progress_summary_and_history_artifacts(run_dir: Path) -> None:
    keys = {kind: f"nonlinear-obs-1-{kind}" for kind in ("progress", "summary", "history")}
    found = {a.key: a for a in read_artifacts(list(keys.values()))}
    assert set(found) == set(keys.values()), sorted(found)

    progress = found[keys["progress"]]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert re.match(r"epoch 30/30, train loss [\d.e+-]+, val loss [\d.e+-]+", progress.description), progress.description

    summary = found[keys["summary"]]
    assert summary.type == "markdown"
    for text in ("nonlinear", str(run_dir), "## Final metrics", "## Chunks", "resumed | no", "checkpoint-3.pt"):
        assert text in summary.data, text

    table = found[keys["history"]]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and [r["epoch"] for r in rows] == [10, 20, 30]
    assert {"epochs", "train_loss", "val_loss", "seconds", "checkpoint"} <= rows[0].keys()
    assert rows[-1]["checkpoint"] == "checkpoint-3.pt"
    assert rows[-1]["train_loss"] == pytest.approx(history(run_dir)["train_loss"][-1])



def test_flow_graph_is_the_pipelines_chain(run_dir: Path) -> None:
    """On the server, each task run's inputs (parameters, wait_for) name exactly the task run
    before it, and the graph the UI draws (graph-v2) has the same parents: one chain."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    flow_run_id = json.loads((run_dir / "run.json").read_text())["flow_runs"][-1]["flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC)
        graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": flow_run_id}).json()
    names = [r.name for r in runs]
    assert [n if n.startswith("train_chunk") else n.rsplit("-", 1)[0] for n in names] == [
        "load_data", "split_data", "train_chunk-1", "train_chunk-2", "train_chunk-3", "evaluate", "save_model"], names
    chain = [set()] + [{str(before.id)} for before in runs[:-1]]
    inputs = [{str(i.id) for found in r.task_inputs.values() for i in found if i.input_type == "task_run"} for r in runs]
    assert inputs == chain, list(zip(names, inputs))
    drawn = {node_id: {p["id"] for p in node["parents"]} for node_id, node in graph["nodes"]}
    assert [drawn[str(r.id)] for r in runs] == chain, drawn


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal_lines(fd: int, lines: list[str]) -> None:
    """What a terminal shows on ``fd``, one entry per redraw (``\\r``) or line."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the command's end closed the terminal
            return
        if not chunk:
            return
        *done, pending = re.split(rb"[\r\n]", pending + chunk)
        lines += [ANSI.sub("", b.decode(errors="replace")) for b in done if b.strip()]


@pytest.mark.slow
def test_a_terminal_sees_progress_within_the_epoch_and_the_progress_artifact_moves(prefect_api: str,
                                                                                    tmp_path: Path) -> None:
    """FashionMNIST in a pseudo-terminal: inside the first epoch the live line is redrawn by
    batch; the Prefect progress artifact moves before the chunk's checkpoint; Ctrl-C to the
    process group, as a terminal sends it, ends the run without waiting for the chunk's end:
    exit 130 and a checkpoint from inside the chunk."""
    import threading

    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--job", "fashion_mnist", "--epochs", "2", "--chunk-epochs",
                             "2", "--artifacts-dir", str(tmp_path), "--run-name", "tty"], cwd=ROOT, stdin=slave,
                            stdout=slave, stderr=slave, env=cli_env(prefect_api), start_new_session=True)
    os.close(slave)
    lines: list[str] = []
    threading.Thread(target=terminal_lines, args=(master, lines), daemon=True).start()
    manifest = tmp_path / "fashion_mnist" / "tty" / "checkpoints" / "checkpoint-1.json"
    seen: set[float] = set()  # the progress artifact's values while chunk 1 trains

    def moved_or_chunk_done() -> bool:
        seen.update(float(a.data) for a in read_artifacts(["fashion-mnist-tty-progress"]))
        return len(seen - {0.0}) >= 2 or manifest.exists()

    wait_until(moved_or_chunk_done, what="the progress artifact to move", proc=proc, every=0.5)
    assert not manifest.exists(), f"the progress artifact only moved at the chunk's end: {seen}"
    draws = [int(m.group(1)) for text in list(lines) if (m := re.search(r"epoch 1/2 batch (\d+)/\d+ +ETA ", text))]
    assert len(draws) >= 4 and draws == sorted(draws), draws  # redrawn as the first epoch goes
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=600) == 130
    saved = json.loads(manifest.read_text())
    # Before the chunk's end (epochs 1-2): inside epoch 1 or 2, or just between them.
    assert saved["epoch"] in (-1, 0) and (saved["batch"] > 0 or saved["epoch"] == 0), saved


# --- the run folder --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["loss.png", "fit.png"])
def test_plots_are_real_images(run_dir: Path, name: str) -> None:
    import matplotlib.image

    assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(run_dir / name)
    h, w = img.shape[:2]
    assert 300 <= h <= 3000 and 400 <= w <= 3000, img.shape
    assert img[..., :3].std() > 0.05, "blank image"


def test_tensorboard_events_hold_every_epoch_once(run_dir: Path) -> None:
    assert_tensorboard_matches_history(run_dir, 30)
    names = sorted(p.name for p in (run_dir / "tensorboard").iterdir())
    assert len(names) == 3 and all("tfevents" in n for n in names), names  # one file per chunk


def test_tensorboard_rewrite_replaces_the_steps_it_writes_again(run_dir: Path, tmp_path: Path) -> None:
    """Epochs written again (a rerun, a resume from an older checkpoint) show once, with the
    history's new values: purge_step hides the earlier file's steps from TensorBoard's readers."""
    from tasks.reporting import write_tensorboard
    from tasks.storage.history import read_history, write_history_csv

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    files = sorted((copy / "tensorboard").iterdir())
    hist = read_history(run_of(copy))
    assert write_tensorboard(copy, hist, 31) == 30 and sorted((copy / "tensorboard").iterdir()) == files
    hist["train_loss"][20:] = [2 * v for v in hist["train_loss"][20:]]  # epochs 21-30 trained differently
    write_history_csv(copy / "history.csv", hist)
    assert write_tensorboard(copy, hist, 21) == 30
    assert_tensorboard_matches_history(copy, 30)


def report_on_copy(run_dir: Path, tmp_path: Path, events_kept: int, written: int):
    """A copy of the finished run whose TensorBoard folder holds only the first ``events_kept``
    files and whose run.json says ``written`` epochs are in TensorBoard; a RunReport on it."""
    from tasks.reporting import RunReport
    from tasks.storage.records import RunRecord

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for path in sorted((copy / "tensorboard").iterdir())[events_kept:]:
        path.unlink()
    report = RunReport(run_of(copy))
    report.record = RunRecord.model_validate(json.loads((copy / "run.json").read_text()) | {"tensorboard_epochs": written})
    return copy, report


def test_tensorboard_catches_up_after_a_kill_between_checkpoint_and_events(run_dir: Path, tmp_path: Path) -> None:
    """Killed after checkpoints 2 and 3 but before their events: the next attempt's first
    chunk (skipped, all is trained) writes epochs 11-30 and records the resume."""
    copy, report = report_on_copy(run_dir, tmp_path, events_kept=1, written=10)
    report.chunk_done(ChunkResult(chunk=1, trained=False, start_epoch=30, end_epoch=30, loaded="checkpoint-3.pt",
                                  resumed=True))
    assert_tensorboard_matches_history(copy, 30)
    record = json.loads((copy / "run.json").read_text())
    assert record["tensorboard_epochs"] == 30
    assert [(r["from_checkpoint"], r["epochs_saved"]) for r in record["resumes"]] == [("checkpoint-3.pt", 30)]


def test_resume_from_an_older_checkpoint_is_recorded_and_rewrites_its_epochs(run_dir: Path, tmp_path: Path) -> None:
    """checkpoint-3 damaged, so training resumed from checkpoint-2 and trained epochs 21-30
    again: run.json names checkpoint-2 (not the newest manifest), TensorBoard the new values."""
    from tasks.storage.history import read_history, write_history_csv

    copy, report = report_on_copy(run_dir, tmp_path, events_kept=3, written=30)
    hist = read_history(run_of(copy))
    hist["val_loss"][20:] = [v + 1 for v in hist["val_loss"][20:]]
    write_history_csv(copy / "history.csv", hist)
    report.chunk_done(ChunkResult(chunk=3, trained=True, start_epoch=20, end_epoch=30, seconds=0.5,
                                  loaded="checkpoint-2.pt", resumed=True, checkpoint="checkpoint-3.pt",
                                  last={"train_loss": 1.0},
                                  skipped_checkpoints=["checkpoint-3.pt: sha256 mismatch (file damaged)"]))
    assert_tensorboard_matches_history(copy, 30)
    record = json.loads((copy / "run.json").read_text())
    assert [(r["from_checkpoint"], r["epochs_saved"]) for r in record["resumes"]] == [("checkpoint-2.pt", 20)]
    assert record["chunks"]["3"]["resumed_from"] == "checkpoint-2.pt"
    assert record["resumes"][0]["skipped_checkpoints"] == ["checkpoint-3.pt: sha256 mismatch (file damaged)"]


def test_summary_md(run_dir: Path) -> None:
    text = (run_dir / "summary.md").read_text()
    for part in ("# nonlinear · Obs_1", "| status | completed |", "## Final metrics", "| test | 20 |",
                 "**weights**", "least_squares", "## Chunks", "| 3 | 21-30 | 30 |", "## Config",
                 "![loss.png](loss.png)", "![fit.png](fit.png)"):
        assert part in text, part


def test_run_json_records_everything_and_its_hashes_match(run_dir: Path) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["attempts"] == 1 and record["resumes"] == []
    assert record["config"]["epochs"] == 30 and record["identity"]["chunk_epochs"] == 10
    config = json.loads((run_dir / "config.json").read_text())
    assert record["data_fingerprint"] == config["data_fingerprint"] and record["fingerprint"] == config["fingerprint"]
    env = record["environment"]
    assert env["libraries"]["torch"] == torch.__version__.split("+")[0] and "prefect" in env["libraries"]
    assert env["device"]["type"] in ("cpu", "cuda") and env["python"] == sys.version.split()[0]
    assert env["git"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"])
    assert record["started_at"] <= record["finished_at"]
    assert sorted(record["chunks"]) == ["1", "2", "3"] and record["flow_runs"][0]["flow_run_id"]

    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    expected = on_disk - {"run.json", ".lock", ".lock.owner"}
    assert set(record["files"]) == expected
    for rel, info in record["files"].items():
        data = (run_dir / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"], rel
    assert {"model.pt2", "summary.md", "loss.png", "fit.png", "model_state_dict.pt"} <= expected


def test_latest_names_the_run_and_tensorboard_lists_each_run_once(run_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    from tasks.reporting import resolve_run
    from tasks.storage.store import LocalStore

    latest = run_dir.parent / "latest"
    assert latest.is_file() and not latest.is_symlink() and latest.read_text() == "Obs_1\n"
    assert resolve_run(latest) == run_dir
    tb = EventMultiplexer()
    tb.AddRunsFromDirectory(str(run_dir.parent.parent))  # tensorboard --logdir <artifacts-dir>
    assert sorted(tb.Runs()) == ["nonlinear/Obs_1/tensorboard"]
    (tmp_path / "old-run").mkdir()
    (tmp_path / "latest").symlink_to("old-run")  # an older version's pointer
    LocalStore(tmp_path / "new-run").point_latest()
    assert not (tmp_path / "latest").is_symlink() and resolve_run(tmp_path / "latest") == tmp_path / "new-run"


# --- using the model -------------------------------------------------------------------------


def expected_predictions(run_dir: Path, xs: list[float]) -> list[float]:
    sd = torch.load(run_dir / "model_state_dict.pt", weights_only=True)
    w, b = sd["layer.weight"].flatten().double(), float(sd["layer.bias"])
    return [float(w[0]) * x * x + float(w[1]) * x + b for x in xs]


def test_predict_flow_prints_the_models_predictions(run_dir: Path, capsys) -> None:
    from flows.predict_flow import main

    proc = subprocess.run([sys.executable, str(PREDICT), "--run", str(run_dir.parent / "latest"), "--x", "1", "5", "11",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # the real command
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [r["input"] for r in rows] == ["x=1", "x=5", "x=11"]
    assert np.allclose([r["output"][0] for r in rows], expected_predictions(run_dir, [1, 5, 11]), rtol=1e-4)
    assert main(["--run", str(run_dir), "--x", "2"]) == 0
    assert re.fullmatch(r"x=2: y=-?[\d.]+\n", capsys.readouterr().out)


def test_predict_flow_refuses_bad_input(run_dir: Path, tmp_path: Path, capsys) -> None:
    from flows.predict_flow import main

    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run_dir)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--x" in err and err.count("\n") == 1
    assert main(["--run", str(tmp_path), "--x", "1"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_model_pt2_loads_and_predicts_in_a_fresh_process_without_project_code(run_dir: Path) -> None:
    """torch.export.load in `python -I` from /tmp: no project on sys.path, no pickled classes."""
    script = (
        "import json, sys, torch\n"
        "program = torch.export.load(sys.argv[1])\n"
        "x = torch.tensor([[1.0, 1.0], [25.0, 5.0], [121.0, 11.0]])  # features [x^2, x]\n"
        "y = program.module()(x).flatten().tolist()\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'flows'))\n"
        "print(json.dumps({'y': y, 'leaked': leaked, 'path': sys.path}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(run_dir / "model.pt2")], cwd="/tmp", env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["leaked"] == [] and not any(str(ROOT) == p for p in out["path"])
    assert np.allclose(out["y"], expected_predictions(run_dir, [1, 5, 11]), rtol=1e-4)


# --- interrupted runs ------------------------------------------------------------------------


def test_failed_attempt_then_rerun_continues_the_same_curves(prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    """Attempt 1 fails inside chunk 2 with an error Prefect does not retry; attempt 2 (the same
    call again) resumes from checkpoint-1: TensorBoard has each epoch once, run.json says so."""
    from flows.train_flow import train_flow
    from tasks.engine.training import Trainer
    from tasks.kernel import UserError

    real = Trainer.run_epoch

    def failing(self, epoch: int, *args):
        if epoch == 14:
            raise UserError("injected non-retried failure at epoch 15")
        return real(self, epoch, *args)

    kwargs = {"job": "nonlinear", "epochs": 30, "chunk_epochs": 10, "seed": 3, "artifacts_dir": str(tmp_path),
              "run_name": "r"}
    monkeypatch.setattr(Trainer, "run_epoch", failing)
    with pytest.raises(UserError):
        train_flow(**kwargs)
    run_dir = tmp_path / "nonlinear" / "r"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "epoch 15" in record["error"]
    assert [s for s, _ in scalars(run_dir)["Loss/train"]] == list(range(1, 11)) and record["tensorboard_epochs"] == 10

    monkeypatch.setattr(Trainer, "run_epoch", real)
    train_flow(**kwargs)
    assert_tensorboard_matches_history(run_dir, 30)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["attempts"] == 2
    assert [(r["attempt"], r["from_checkpoint"], r["epochs_saved"]) for r in record["resumes"]] == [(2, "checkpoint-1.pt", 10)]
    assert "from `checkpoint-1.pt` (10 of 30 epochs kept)" in (run_dir / "summary.md").read_text()
