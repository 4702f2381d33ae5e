"""Jobs that give a map-style Dataset (the tutorials' way), read through a DataLoader: the
nonlinear tutorial's CustomDataset, copied verbatim, trains on two processes to the tensor
path's floats and resumes bit-exact after a SIGKILL; a run with random augmentation stopped
inside an epoch with loader workers resumes with another worker count (and a killed worker)
and ends bit-exact; a job's own step and optimizer over dict batches, with bf16, accumulation
and clipping, resume bit-exact; a bad item is named in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from flows.train_flow import main
from tests.helpers import (
    ROOT,
    Command,
    assert_same_run,
    assert_same_tensors,
    cli_env,
    descendants,
    fail_once_at,
    history,
    state_dict,
    train_cli,
    wait_until,
)
from tests.user_job import tutorial_dataset

JOB, AUGMENTED = "tests.user_job.tutorial_dataset:JOB", "tests.user_job.tutorial_dataset:AUGMENTED"
SMALL = ["--epochs", "30", "--chunk-epochs", "10", "--seed", "5"]
TUTORIAL = ROOT.parent / "shared" / "seeds" / "000_5326a4f8532414f2.txt"


def test_the_docs_show_the_tutorials_dataset_verbatim() -> None:
    source = Path(tutorial_dataset.__file__).read_text()
    assert f"```python\n{source}```" in (ROOT / "docs" / "jobs.md").read_text(), "docs/jobs.md differs from the file"
    if not TUTORIAL.exists():
        pytest.skip(f"the tutorial's text ({TUTORIAL}) is not beside this checkout")
    copied = source.split("# --- verbatim from the tutorial (shared/seeds/000) ---\n")[1].split("# --- end")[0]
    text = TUTORIAL.read_text()
    for block in copied.strip().split("\n\n\n"):
        assert block.startswith("class ") and block in text, block


def test_the_tutorials_dataset_on_two_processes_matches_tensors(prefect_api: str, tmp_path: Path) -> None:
    """The same rows in the same order as the built-in nonlinear job (tensors), each rank taking
    its share of every batch from its loader worker: the same trained floats, bit for bit, with two
    processes. (A kill and resume on two processes with loader workers: tests/test_streaming.py.)"""
    two = [*SMALL, "--nproc-per-node", "2"]
    reference = train_cli(["--job", "nonlinear", *two], prefect_api, tmp_path / "ref", "r")  # tensors
    folder = train_cli(["--job", JOB, *two, "--num-workers", "1"], prefect_api, tmp_path, "d")
    assert_same_tensors(state_dict(folder / "model_state_dict.pt"), state_dict(reference / "model_state_dict.pt"))
    # Validation differs in its last bits: the tensor path evaluates a set this small in one batch.
    assert history(folder)["train_loss"] == history(reference)["train_loss"]


def test_augmentation_stopped_inside_an_epoch_resumes_bit_exact_with_any_workers(
        prefect_api: str, tmp_path: Path) -> None:
    """Per-item randomness comes from (seed, epoch, item): an uninterrupted run without workers,
    and a run with 2 workers stopped by SIGTERM inside an epoch then resumed with 1 (whose worker
    is killed once: the retry resumes), end the same."""
    options = ["--epochs", "30", "--chunk-epochs", "10", "--batch-size", "4"]  # 40 batches an epoch
    train_cli(["--job", AUGMENTED, *options, "--num-workers", "0"], prefect_api, tmp_path / "ref", "r")
    reference = tmp_path / "ref" / "tests.user_job.tutorial_dataset.AUGMENTED" / "r"
    args = ["--job", AUGMENTED, *options, "--artifacts-dir", str(tmp_path), "--run-name", "a"]
    checkpoints = tmp_path / "tests.user_job.tutorial_dataset.AUGMENTED" / "a" / "checkpoints"
    for _ in range(4):  # until a stop lands inside an epoch, not before the first batch or in a validation
        run = Command.train([*args, "--num-workers", "2"], cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO"))
        run.wait_line(": training epochs")
        time.sleep(0.7)  # into the chunk's epochs (a chunk takes a few seconds)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 128 + signal.SIGTERM, run.output[-2000:]
        newest = max(checkpoints.glob("checkpoint-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        if json.loads(newest.read_text()).get("batch", 0) > 0:
            break
    else:
        pytest.fail(f"four stops in a row landed between epochs: {run.output[-1500:]}")
    # The resume with 1 worker; that worker is killed once: the task's retry resumes again.
    again = Command.train([*args, "--num-workers", "1"], cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO"))
    worker = wait_until(lambda: loader_workers(again.pid), what="a loader worker", proc=again, every=0.05)
    os.kill(worker[0], signal.SIGKILL)
    assert again.wait() == 0, again.output[-3000:]
    # The error depends on when torch notices: "is killed by signal", "exited unexpectedly", or a
    # connection reset while the worker was starting; each ends in the task's retry.
    assert re.search(r"Task run 'train_chunk-\d+' - Task run failed with exception: .* - Retry 1/", again.output), \
        again.output[-3000:]
    assert "resuming from checkpoint-" in again.output
    assert_same_run(checkpoints.parent, reference)


def loader_workers(pid: int) -> list[int]:
    """The command's DataLoader workers: its forks (the same command line), not its other
    children (git, when the run records its code)."""
    def cmdline(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""

    return [p for p in descendants(pid) if cmdline(p) == cmdline(pid) != b""]


BROKEN = """
import torch
from dataclasses import replace
from torch.utils.data import Dataset

from tests.user_job.tutorial_dataset import JOB, CustomDataset, load


class Broken(Dataset):
    def __init__(self, path, odd):
        self.data, self.odd = CustomDataset(path), odd

    def __getitem__(self, index):
        x, y = self.data[index]
        if index == 37 and not self.odd:
            raise ValueError("cannot decode this row")
        return (torch.zeros(3) if index == 37 else x), y

    def __len__(self):
        return len(self.data)


RAISES = replace(JOB, load=lambda path: replace(load(path), pool=Broken(path, odd=False)))
ODD = replace(JOB, load=lambda path: replace(load(path), pool=Broken(path, odd=True)))
"""


@pytest.mark.parametrize("job, expected", [
    ("RAISES", r"item 37 of the (train|val|test) set: ValueError: cannot decode this row; fix the dataset or its "
               r"transform"),
    ("ODD", r"item 37 of the (train|val|test) set has shapes \(\(3,\), \(1,\)\), item \d+ \(\(2,\), \(1,\)\)"),
])
def test_a_bad_item_is_named_in_one_line(job: str, expected: str, prefect_api: str, tmp_path: Path, monkeypatch,
                                         capsys) -> None:
    (tmp_path / "broken_datasets.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["--job", f"broken_datasets:{job}", "--epochs", "2", "--chunk-epochs", "1", "--num-workers", "1",
                 "--artifacts-dir", str(tmp_path / "artifacts")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and re.search(expected, err), err


#: A job whose items are dicts (text-like: named inputs and a mask), with its own step (a model
#: of two inputs, with dropout) and its own optimizer and scheduler.
DICT_JOB = """
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset

from tests.user_job.tutorial_dataset import JOB as TUTORIAL, CustomDataset


class AsDicts(Dataset):
    def __init__(self, path):
        self.data = CustomDataset(path)

    def __getitem__(self, index):
        x, y = self.data[index]
        return {"square": x[:1], "plain": x[1:], "mask": torch.ones(1), "target": y}

    def __len__(self):
        return len(self.data)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(1, 1), nn.Linear(1, 1, bias=False), nn.Dropout(0.2)

    def forward(self, square, plain):
        return self.a(square) + self.drop(self.b(plain))


def step(model, batch):
    out = model(batch["square"], batch["plain"])
    return ((out - batch["target"]) ** 2 * batch["mask"]).mean()


def optimizers(cfg, model, steps_per_epoch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=0.9)


JOB = replace(TUTORIAL, load=lambda path: replace(TUTORIAL.load(path), pool=AsDicts(path)),
              build_model=lambda cfg: TwoInputs(), step=step, optimizers=optimizers)
"""


def test_a_dict_batch_job_with_its_own_step_resumes_bit_exact(
        prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    """The extension points (a job's step over dict batches, its optimizer and scheduler) and the
    options (--precision bf16, --grad-accum 2, --clip-grad-norm) together: an exception inside
    chunk 2, retried by Prefect, ends bit-identical to an uninterrupted run."""
    from flows.train_flow import train_flow

    (tmp_path / "dict_job.py").write_text(DICT_JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    options = dict(job="dict_job:JOB", epochs=6, chunk_epochs=2, lr=0.05, precision="bf16", grad_accum=2,
                   clip_grad_norm=1.0, seed=2)
    runs = []
    for name in ("reference", "faulted"):
        with monkeypatch.context() as patch:
            calls = fail_once_at(patch, 3) if name == "faulted" else []
            result = train_flow(**options, artifacts_dir=str(tmp_path / name), run_name="r")
        assert result["dict_job.JOB"]["status"] == "completed", result
        runs.append(tmp_path / name / "dict_job.JOB" / "r")
    assert calls.count(3) == 2  # the epoch that failed, then its retry
    assert_same_run(*runs)


def test_grad_accum_gives_the_result_of_a_larger_batch() -> None:
    """--batch-size 8 --grad-accum 4 and --batch-size 32 take the same optimizer steps on the
    same rows: the same weights up to float rounding (and not those of 4x more steps of 8)."""
    import torch
    from torch import nn

    from tasks.engine.rows import TensorRows, epoch_order
    from tasks.engine.training import Step, build_optimizer, textbook_loss, train_epoch
    from tasks.jobs.registry import get_job

    data = get_job("nonlinear").load(ROOT / "data" / "non_linear.csv").pool
    rows, cpu, order = TensorRows(data, torch.device("cpu"), lambda x: x), torch.device("cpu"), epoch_order(0, 0, 200)
    weights = []
    for batch, accum in ((32, 1), (8, 4), (8, 1)):
        cfg = get_job("nonlinear").config(batch_size=batch, grad_accum=accum, lr=1e-4)
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        step = Step(cfg, model, build_optimizer(cfg, model), None, textbook_loss(nn.MSELoss()), cpu)
        train_epoch(step, rows.batches(0, order, batch, 0, 200 // 32 * 32 // batch), accum)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    large, accumulated, small = weights
    assert torch.allclose(large, accumulated, rtol=1e-5, atol=1e-7), (large, accumulated)
    assert not torch.allclose(large, small, rtol=1e-3), "the check cannot tell accumulation from smaller steps"


def test_fixed_validation_and_test_sets_are_kept_whole() -> None:
    """A job that gives its own validation and test sets: the whole pool trains (in a seeded
    order), and validation and test read those sets, every item once, in their order."""
    import torch
    from torch.utils.data import Subset

    from tasks.engine.rows import rows_of
    from tasks.jobs.registry import get_job
    from tasks.jobs.spec import JobData
    from tasks.storage.data import make_split

    pool = tutorial_dataset.CustomDataset(tutorial_dataset.CSV)
    data = JobData(pool=Subset(pool, range(150)), val=Subset(pool, range(150, 170)), test=Subset(pool, range(170, 200)),
                   fingerprint="f")
    split = make_split(data, get_job("nonlinear").config(batch_size=16))
    assert sorted(split["train"].tolist()) == list(range(150))
    for part, first in (("val", 150), ("test", 170)):
        rows = rows_of(data, split, part, 0, torch.device("cpu"), 0, lambda x: x)
        x = torch.cat([batch[0] for batch in rows.in_order(7)])
        assert len(x) == len(getattr(data, part)) and torch.equal(x, torch.stack([pool[first + i][0] for i in range(len(x))]))
