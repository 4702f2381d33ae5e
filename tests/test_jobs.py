"""Every registered job, with no per-job code here: a short run through the real flow gives the
expected artifacts, and an exception inside chunk 2 (retried by Prefect, resumed from the last
checkpoint) ends bit-identical to an uninterrupted run.

A job whose data is not available offline gets tiny data written by the tests
(``helpers.TEST_DATA``); the others run on their default data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prefect.exceptions import CancelledRun

from flows.train_flow import parser, train_flow
from tasks.engine.training import chunk_count
from tasks.jobs.registry import JOBS, default_jobs
from tests.helpers import TEST_DATA, assert_same_tensors, fail_once_at, state_dict


#: 3 chunks of 2 epochs; the fault is injected in the second epoch of chunk 2.
SMALL = {"epochs": 6, "chunk_epochs": 2, "seed": 3}
FAULT_EPOCH = 3  # 0-based: chunk 2 covers epochs 2 and 3
OUTPUTS = ("config.json", "split.json", "run.json", "history.csv", "metrics.json", "model.pt", "model_state_dict.pt")


#: Models that draw random numbers while training (dropout): a resume must restore their stream.
RANDOM_MODELS = {"fashion_mnist": "cnn"}


def job_options(job: str, folder: Path) -> dict[str, str]:
    """Options of a test run beyond SMALL: the job's tiny test data where its own is not offline,
    and its model with dropout where it has one."""
    options = {"model": RANDOM_MODELS[job]} if job in RANDOM_MODELS else {}
    if job in TEST_DATA:
        folder.mkdir(parents=True, exist_ok=True)
        options["data"] = str(TEST_DATA[job](folder))
    return options


def run(job: str, options: dict[str, str], artifacts: Path) -> Path:
    result = train_flow(job=job, artifacts_dir=str(artifacts), run_name="r", **SMALL, **options)
    assert result[job]["status"] == "completed"
    return Path(result[job]["run_dir"])


@pytest.fixture(scope="module", params=list(JOBS))
def reference(request, prefect_api: str, tmp_path_factory) -> tuple[str, dict[str, str], Path]:
    """(job, options, run folder) of an uninterrupted SMALL run of each registered job."""
    job = request.param
    root = tmp_path_factory.mktemp(f"jobs-{job}")
    options = job_options(job, root / "data")
    return job, options, run(job, options, root / "artifacts")


def test_short_run_writes_every_artifact(reference: tuple[str, dict[str, str], Path]) -> None:
    job, options, run_dir = reference
    spec = JOBS[job]
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), f"{job}: {name} missing"
    cfg = spec.config(**SMALL, **options)
    chunks = chunk_count(cfg)
    for k in range(1, chunks + 1):
        assert (run_dir / "checkpoints" / f"checkpoint-{k}.pt").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["job"] == job and metrics["epochs"] == SMALL["epochs"]
    assert {"val", "test", "final_train_loss"} <= set(metrics)
    split = json.loads((run_dir / "split.json").read_text())
    assert sum(split["sizes"].values()) > 0 and split["sizes"]["train"] >= cfg.batch_size
    history = (run_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == SMALL["epochs"] + 1
    # The saved weights load, the safe way, into the job's own model class.
    model = spec.build_model(cfg)
    model.load_state_dict(state_dict(run_dir / "model_state_dict.pt"))
    ckpt = torch.load(run_dir / "checkpoints" / f"checkpoint-{chunks}.pt", weights_only=True)
    assert ckpt["model"] == spec.model_label(cfg) and ckpt["epoch"] == SMALL["epochs"] - 1


def test_exception_inside_chunk_2_resumes_bit_exact(reference: tuple[str, dict[str, str], Path], tmp_path: Path,
                                                    monkeypatch) -> None:
    job, options, ref = reference
    calls = fail_once_at(monkeypatch, FAULT_EPOCH)
    run_dir = run(job, options, tmp_path)
    # Prefect retried chunk 2, which resumed from checkpoint-1: only chunk 2's epochs are redone.
    assert calls.count(FAULT_EPOCH) == 2 and calls.count(2) == 2 and calls.count(1) == 1, calls
    assert_same_tensors(state_dict(run_dir / "model_state_dict.pt"), state_dict(ref / "model_state_dict.pt"))
    for name in ("metrics.json", "history.csv", "split.json"):
        assert (run_dir / name).read_text() == (ref / name).read_text(), f"{job}: {name} differs"


def test_a_stop_inside_an_epoch_resumes_bit_exact(reference: tuple[str, dict[str, str], Path], tmp_path: Path,
                                                  monkeypatch) -> None:
    """SIGTERM halfway through an epoch of chunk 2: the checkpoint holds the batches done in that
    epoch (weights, optimizer, schedule, RNG, their loss sum), and the rerun continues from that
    batch to the bits of an uninterrupted run. (A full-batch job stops at the epoch's end.)"""
    import signal
    import threading

    import tasks.engine.training as training

    real = training.Trainer.run_epoch
    sent: list[int] = []  # steps per epoch, once the signal went

    def run_epoch(self, epoch, on_batch=None):
        def after_batch(done, loss_sum):
            if epoch == FAULT_EPOCH and not sent and done == max(self.steps_per_epoch // 2, 1):
                assert threading.current_thread() is threading.main_thread()  # where GracefulStop listens
                sent.append(self.steps_per_epoch)
                signal.raise_signal(signal.SIGTERM)
            return on_batch(done, loss_sum)
        return real(self, epoch, after_batch)

    monkeypatch.setattr(training.Trainer, "run_epoch", run_epoch)
    job, options, ref = reference
    with pytest.raises(CancelledRun, match="^SIGTERM: saved checkpoint-2"):  # a stop: the command exits 143
        run(job, options, tmp_path)
    saved = json.loads((tmp_path / job / "r" / "checkpoints" / "checkpoint-2.json").read_text())
    steps = sent[0]
    inside = (FAULT_EPOCH - 1, steps // 2) if steps > 1 else (FAULT_EPOCH, 0)  # (last whole epoch, batches after it)
    assert (saved["epoch"], saved["batch"]) == inside, saved
    monkeypatch.setattr(training.Trainer, "run_epoch", real)
    run_dir = run(job, options, tmp_path)
    assert_same_tensors(state_dict(run_dir / "model_state_dict.pt"), state_dict(ref / "model_state_dict.pt"))
    for name in ("metrics.json", "history.csv", "split.json"):
        assert (run_dir / name).read_text() == (ref / name).read_text(), f"{job}: {name} differs"


@pytest.mark.parametrize("job", list(JOBS))
def test_help_lists_the_job(job: str) -> None:
    help_text = parser().format_help()
    assert f"  {job} " in help_text
    assert ("(default)" in help_text.split(f"  {job} ", 1)[1].splitlines()[0]) == (job in default_jobs())


def test_compile_trains_through_torch_compile_and_keeps_the_tutorials_files(prefect_api: str, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """--compile: each chunk's model goes through torch.compile, the run is its own (another
    fingerprint, so never mixed with an eager run), and the files keep the model's own state_dict
    keys, so the tutorial's class still loads them."""
    from tasks.jobs.nonlinear import CustomModel

    compiled: list[str] = []
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: (compiled.append(type(self).__name__), real(self, *a, **k))[1])
    result = train_flow(job="nonlinear", epochs=4, chunk_epochs=2, compile=True, artifacts_dir=str(tmp_path))
    run_dir = Path(result["nonlinear"]["run_dir"])
    assert compiled == ["CustomModel", "CustomModel"]  # one per chunk
    record = json.loads((run_dir / "config.json").read_text())
    eager = JOBS["nonlinear"].config(epochs=4, chunk_epochs=2)
    assert record["identity"]["compile"] is True
    assert record["fingerprint"] != eager.fingerprint(record["data_fingerprint"])
    CustomModel().load_state_dict(state_dict(run_dir / "model_state_dict.pt"))  # strict: the same keys
    ckpt = torch.load(run_dir / "checkpoints" / "checkpoint-2.pt", weights_only=True)
    assert list(ckpt["model_state_dict"]) == ["layer.weight", "layer.bias"]
