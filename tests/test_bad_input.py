"""Bad input: one line naming the problem and the fix, non-zero exit, nothing lost."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.train_flow import main
from tasks.jobs.registry import JOBS
from tests.helpers import ROOT, TRAIN

GOOD = (ROOT / "data" / "non_linear.csv").read_text()

CSV_CASES = {
    "empty file": ("", "is empty"),
    "header only": ("x,y\n", "no rows"),
    "non-numeric cell": ("x,y\n1,2\n3,abc\n", "'abc' is not a number"),
    "nan": ("x,y\n1,2\n3,nan\n", "is not finite"),
    "inf": ("x,y\n1,inf\n3,4\n", "is not finite"),
    "three columns": ("x,y,z\n1,2,3\n", "3 columns"),
    "ragged row": ("x,y\n1,2\n3,4,5\n", "not a valid CSV"),
    "short row": ("x,y\n1,2\n3\n", "(line 3 has 1 value)"),
    "no header": ("1,2\n3,4\n", "no header"),
    "too few rows to split": ("x,y\n" + "".join(f"{i},{i * i}\n" for i in range(12)), "too few rows to split"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe".decode("latin-1"), "not"),
}


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_artifacts(tmp_path: Path) -> Path:
    """An artifacts folder that already holds a (fake) earlier run's files."""
    root = tmp_path / "artifacts"
    (root / "nonlinear" / "old-run" / "checkpoints").mkdir(parents=True)
    (root / "nonlinear" / "old-run" / "metrics.json").write_text('{"keep": true}')
    (root / "nonlinear" / "old-run" / "checkpoints" / "checkpoint-1.pt").write_bytes(b"precious")
    return root


def run_main(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code != 0
    assert err.count("\n") == 0, f"not one line: {err!r}"
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv(case: str, tmp_path: Path, existing_artifacts: Path, capsys) -> None:
    content, expected = CSV_CASES[case]
    csv = tmp_path / "bad.csv"
    csv.write_bytes(content.encode("latin-1"))
    before = snapshot(existing_artifacts)
    code, err = run_main(capsys, ["--job", "nonlinear", "--data", str(csv), "--artifacts-dir", str(existing_artifacts),
                                  "--run-name", "old-run"])
    assert_one_line_error(code, err, expected)
    assert str(csv) in err  # names the file
    assert snapshot(existing_artifacts) == before


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data", "/nonexistent/nope.csv"], "does not exist"),
        (["--job", "nope"], f"unknown job 'nope'; choose one of: {', '.join(JOBS)}"),
        (["--epochs", "0"], "invalid --epochs: Input should be greater than 0"),
        (["--epochs", "-3"], "invalid --epochs"),
        (["--chunk-epochs", "0"], "invalid --chunk-epochs"),
        (["--lr", "-1"], "invalid --lr"),
        (["--epochs", "ten"], "invalid int value: 'ten'"),
        (["--run-name", "../escape"], "invalid --run-name"),
        (["--lr", "inf"], "invalid --lr: Input should be a finite number"),
        (["--weight-decay", "inf"], "invalid --weight-decay: Input should be a finite number"),
        (["--lr", "1e300"], "invalid --lr: must be at most 3.403e+38, the largest float32"),  # overflows float32
        (["--weight-decay", "1e39"], "invalid --weight-decay: must be at most 3.403e+38"),
        (["--seed", "-1"], "invalid --seed: Input should be greater than or equal to 0"),
        (["--seed", str(10**30)], "invalid --seed: Input should be less than 4294967296"),
        (["--epochs", str(10**13)], "invalid --epochs: Input should be less than or equal to 1000000000000"),
        (["--threads", "1000000"], "invalid --threads: Input should be less than or equal to 1024"),
        (["--job", "fashion_mnist", "--model", "resnet"], "unknown model 'resnet' for job 'fashion_mnist'"),
        (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
        (["--nesterov"], "--nesterov needs a momentum: add --momentum"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum and --nesterov apply to --optimizer sgd only"),
        (["--nproc-per-node", "0"], "invalid --nproc-per-node: Input should be greater than or equal to 1"),
        (["--nproc-per-node", "3"], "--batch-size 16 does not divide by --nproc-per-node 3"),
        pytest.param(["--nproc-per-node", "64", "--batch-size", "64", "--device", "cpu"],
                     "more CPU processes than this machine's", marks=pytest.mark.skipif(
                         len(os.sched_getaffinity(0)) >= 64, reason="a machine with 64 cores")),
        (["--artifacts-dir", "s3://"], "invalid --artifacts-dir: the URL names no bucket: use s3://BUCKET"),
        (["--num-workers", "-1"], "invalid --num-workers: Input should be greater than or equal to 0 (got -1)"),
        (["--grad-accum", "0"], "invalid --grad-accum: Input should be greater than or equal to 1 (got 0)"),
        (["--clip-grad-norm", "0"], "invalid --clip-grad-norm: Input should be greater than 0 (got 0.0)"),
        (["--config", "/nonexistent/best_config.json"], "--config /nonexistent/best_config.json: No such file"),
        (["--config", str(ROOT / "pyproject.toml")], f"--config {ROOT / 'pyproject.toml'}: not JSON"),
        pytest.param(["--precision", "fp16"], "--precision fp16 needs CUDA (its GradScaler); on the CPU use "
                     "--precision bf16", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine")),
        (["--nproc-per-node", "2", "--dist-backend", "nccl", "--device", "cpu"], "--dist-backend nccl needs CUDA"),
        pytest.param(["--nproc-per-node", "2", "--device", "cuda"], "--device cuda: this machine has no usable CUDA",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine")),
    ],
)
def test_bad_options(args: list[str], expected: str, existing_artifacts: Path, capsys) -> None:
    before = snapshot(existing_artifacts)
    with pytest.raises(SystemExit) if {"ten", "lbfgs"} & set(args) else _nullcontext() as raised:
        code, err = run_main(capsys, ["--artifacts-dir", str(existing_artifacts), *args])  # a case's own wins
    if raised is not None:  # argparse's own errors, also one line
        code, err = raised.value.code, capsys.readouterr().err.strip()
    assert_one_line_error(code, err, expected)
    assert snapshot(existing_artifacts) == before


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_mlflow_without_its_extra_names_the_install(existing_artifacts: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow: ImportError, as without the extra
    before = snapshot(existing_artifacts)
    code, err = run_main(capsys, ["--artifacts-dir", str(existing_artifacts), "--mlflow", "http://127.0.0.1:1"])
    assert_one_line_error(code, err, "--mlflow needs MLflow: pip install -e '.[mlflow]'")
    assert snapshot(existing_artifacts) == before


def test_unwritable_artifacts_dir(tmp_path: Path, capsys) -> None:
    # A path under a regular file cannot be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run_main(capsys, ["--job", "nonlinear", "--artifacts-dir", str(blocker / "artifacts")])
    assert_one_line_error(code, err, "is not writable (Not a directory); pass --artifacts-dir")
    assert blocker.read_text() == "not a folder"


def test_bad_input_from_a_real_process(tmp_path: Path) -> None:
    """The real command: exit status 2, exactly one line on stderr, nothing on stdout."""
    csv = tmp_path / "bad.csv"
    csv.write_text("x,y\n1,oops\n")
    proc = subprocess.run([sys.executable, str(TRAIN), "--data", str(csv), "--artifacts-dir", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "'oops' is not a number" in proc.stderr
    assert not (tmp_path / "a" / "nonlinear").exists() or not any((tmp_path / "a" / "nonlinear").iterdir())


def test_run_folder_of_an_older_version_is_refused_not_mixed(existing_artifacts: Path, capsys) -> None:
    """A run folder made by a version whose training gave other floats (format 1: LeNet in
    shards) is never continued with today's floats: one line, exit 2, the folder untouched."""
    import json

    from tasks.storage.data import describe_data
    from tasks.storage.run import Run

    cfg = JOBS["nonlinear"].config(run_name="old-run", artifacts_dir=existing_artifacts)
    old = Run.of(cfg, describe_data(cfg)).config_record()
    old.pop("format")
    old["fingerprint"] = "f" * 64  # what the old code derived: another fingerprint
    (existing_artifacts / "nonlinear" / "old-run" / "config.json").write_text(json.dumps(old))
    before = snapshot(existing_artifacts)
    code, err = run_main(capsys, ["--job", "nonlinear", "--run-name", "old-run", "--artifacts-dir",
                                  str(existing_artifacts)])
    assert_one_line_error(code, err, "was made by an older trainflow that trained with other floats (format 1)")
    assert "use --fresh" in err and snapshot(existing_artifacts) == before
