"""Jobs that give a map-style Dataset (the tutorials' way), read through a DataLoader: the
nonlinear tutorial's CustomDataset, copied verbatim, trains to the tensor path's floats and
resumes bit-exact after a SIGKILL; a run with random augmentation stopped inside an epoch with
loader workers resumes with another worker count and ends bit-exact; a bad item is named in one
line."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from flows.train_flow import main
from tests.helpers import ROOT, Command, assert_same_run, assert_same_tensors, cli_env, history, run_cli, state_dict, train_cli
from tests.user_job import tutorial_dataset

JOB, AUGMENTED = "tests.user_job.tutorial_dataset:JOB", "tests.user_job.tutorial_dataset:AUGMENTED"
SMALL = ["--epochs", "30", "--chunk-epochs", "10", "--seed", "5"]
TUTORIAL = ROOT.parent / "shared" / "seeds" / "000_5326a4f8532414f2.txt"


def test_the_dataset_is_the_tutorials_verbatim() -> None:
    if not TUTORIAL.exists():
        pytest.skip(f"the tutorial's text ({TUTORIAL}) is not beside this checkout")
    source = Path(tutorial_dataset.__file__).read_text()
    copied = source.split("# --- verbatim from the tutorial (shared/seeds/000) ---\n")[1].split("# --- end")[0]
    text = TUTORIAL.read_text()
    for block in copied.strip().split("\n\n\n"):
        assert block.startswith("class ") and block in text, block


def test_the_tutorials_dataset_trains_like_the_tensor_path_and_resumes_after_sigkill(prefect_api: str,
                                                                                      tmp_path: Path) -> None:
    """The same rows in the same order as the built-in nonlinear job (tensors): the same trained
    floats, bit for bit, with two loader workers, killed (process group, workers included) after its
    first checkpoint and resumed without workers."""
    reference = train_cli(["--job", "nonlinear", *SMALL], prefect_api, tmp_path / "ref", "r")  # tensors
    args = ["--job", JOB, *SMALL, "--artifacts-dir", str(tmp_path), "--run-name", "d"]
    run = Command.train([*args, "--num-workers", "2"], cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO"),
                        start_new_session=True)
    run.wait_line("wrote checkpoint-1.pt")
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    folder = tmp_path / "tests.user_job.tutorial_dataset.JOB" / "d"
    assert not (folder / "model_state_dict.pt").exists(), "the kill came too late"
    again = run_cli([*args, "--num-workers", "0"], prefect_api)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_tensors(state_dict(folder / "model_state_dict.pt"), state_dict(reference / "model_state_dict.pt"))
    # Validation differs in its last bits: the tensor path evaluates a set this small in one batch.
    assert history(folder)["train_loss"] == history(reference)["train_loss"]


def test_random_augmentation_stopped_inside_an_epoch_resumes_bit_exact_with_any_worker_count(
        prefect_api: str, tmp_path: Path) -> None:
    """Per-item randomness comes from (seed, epoch, item): an uninterrupted run without workers,
    and a run with 2 workers stopped by SIGTERM inside an epoch then resumed with 1, end the same."""
    options = ["--epochs", "30", "--chunk-epochs", "5", "--batch-size", "4"]  # 40 batches an epoch
    train_cli(["--job", AUGMENTED, *options, "--num-workers", "0"], prefect_api, tmp_path / "ref", "r")
    reference = tmp_path / "ref" / "tests.user_job.tutorial_dataset.AUGMENTED" / "r"
    args = ["--job", AUGMENTED, *options, "--artifacts-dir", str(tmp_path), "--run-name", "a"]
    checkpoints = tmp_path / "tests.user_job.tutorial_dataset.AUGMENTED" / "a" / "checkpoints"
    for _ in range(4):  # until a stop lands inside an epoch, not before the first batch or in a validation
        run = Command.train([*args, "--num-workers", "2"], cli_env(prefect_api, PREFECT_LOGGING_LEVEL="INFO"))
        run.wait_line(": training epochs")
        time.sleep(1)  # into the chunk's epochs (a chunk takes seconds)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 128 + signal.SIGTERM, run.output[-2000:]
        newest = max(checkpoints.glob("checkpoint-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        if json.loads(newest.read_text()).get("batch", 0) > 0:
            break
    else:
        pytest.fail(f"four stops in a row landed between epochs: {run.output[-1500:]}")
    again = run_cli([*args, "--num-workers", "1"], prefect_api)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(checkpoints.parent, reference)


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
