"""FashionMNIST as image files: the export one-liner writes the real images in ImageFolder's
layout, to a folder and to S3, and the job trains from either to the same floats (the Dataset
path's resume is tests/test_datasets.py's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.jobs.fashion_png import CLASSES
from tasks.storage.remote import Remote
from tests.helpers import ROOT, assert_same_tensors, machine, state_dict, train_cli

JOB = "tasks.jobs.fashion_png.JOB"
#: 3 images of each class and part: 60 PNG files.
EXPORT = ["--limit", "3"]
TINY = ["--job", JOB, "--model", "cnn3", "--epochs", "1", "--chunk-epochs", "1", "--batch-size", "9",
        "--num-workers", "1"]


def export(dest: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "tasks.jobs.fashion_png", "export", dest, *EXPORT], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_exported_images_train_the_same_from_a_folder_and_from_s3(prefect_api: str, s3_server, tmp_path: Path) -> None:
    local, url = tmp_path / "png", f"{s3_server.bucket()}/fashion_png"
    export(str(local))
    export(url)
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*.png"))
    assert len(files) == 60 and {f.split("/")[1] for f in files} == set(CLASSES)
    assert files[0] == "test/0_T-Shirt/00019.png"  # the official test set's first T-shirt
    assert Remote(url).keys() == files, "the store holds the same layout"
    from_folder = train_cli([*TINY, "--data", str(local)], prefect_api, tmp_path / "a", "r")
    cache = tmp_path / "machine-b"
    done = subprocess.run([sys.executable, "flows/train_flow.py", *TINY, "--data", url, "--artifacts-dir",
                           str(tmp_path / "b"), "--run-name", "r"], cwd=ROOT, capture_output=True, text=True,
                          env=machine(tmp_path, "machine-b", prefect_api), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tensors(state_dict(tmp_path / "b" / JOB / "r" / "model_state_dict.pt"),
                        state_dict(from_folder / "model_state_dict.pt"))
    (copy,) = (cache / "data").glob("*/fashion_png")  # fetched once, into that machine's cache
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*.png")) == files
