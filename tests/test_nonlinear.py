"""The nonlinear job: committed data, tutorial fidelity, and the accuracy goal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.jobs.nonlinear import CSV_PATH, CustomDataset, CustomModel, generate_csv_text, load
from tests.helpers import run_cli


def test_committed_csv_is_what_the_generator_makes() -> None:
    assert CSV_PATH.read_text() == generate_csv_text()
    rows = CSV_PATH.read_text().splitlines()[1:]
    xs = [float(r.split(",")[0]) for r in rows]
    assert len(rows) == 200 and xs[0] == -10.0 and xs[-1] == 9.9
    for r in rows:
        x, y = map(float, r.split(","))
        assert 0.01 - 0.005 <= y - (3.1 * x * x - 1.7 * x) <= 0.99 + 0.005


def test_features_match_the_tutorial_dataset() -> None:
    ours, tutorial = load(CSV_PATH).pool, CustomDataset(CSV_PATH)
    for i in (0, 57, 199):
        x, y = tutorial[i]
        assert torch.equal(ours.x[i], x) and torch.equal(ours.y[i], y)


def test_state_dict_keys_are_the_tutorials() -> None:
    assert list(CustomModel().state_dict()) == ["layer.weight", "layer.bias"]


@pytest.mark.slow
def test_default_run_fits_the_curve(prefect_api: str, tmp_path: Path) -> None:
    """The full default recipe: 10 000 epochs, 10 checkpoints, near the least-squares optimum."""
    proc = run_cli(["--job", "nonlinear", "--artifacts-dir", str(tmp_path)], prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "nonlinear").glob("run-*")  # not the `latest` pointer
    m = json.loads((run_dir / "metrics.json").read_text())
    assert abs(m["weights"][0] - 3.1) < 0.05 and abs(m["weights"][1] + 1.7) < 0.05
    assert m["test_mse_over_optimum"] <= 1.10
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == sorted(f"checkpoint-{k}.pt" for k in range(1, 11))
    split = json.loads((run_dir / "split.json").read_text())["sizes"]
    assert split == {"train": 160, "val": 20, "test": 20}
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 10_001 and history[0].startswith("epoch,train_loss")
    # The tutorial's own loading code works on the outputs.
    model = torch.load(run_dir / "model.pt", weights_only=False)  # the explicit full-model load
    sd = CustomModel()
    sd.load_state_dict(torch.load(run_dir / "model_state_dict.pt"))
    x = torch.FloatTensor([[1, 1], [25, 5], [121, 11]])
    with torch.no_grad():
        assert torch.equal(model(x), sd(x))
        assert torch.allclose(model(x).flatten(), torch.tensor([1.9154, 69.4928, 356.8351]), atol=0.5)
