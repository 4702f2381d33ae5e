"""The `linear` and `multi_linear` jobs: the tutorials' data and models, bad input, and that the
default recipes converge to the least-squares solutions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from flows.train_flow import main, train_flow
from tasks.jobs.registry import JOBS, default_jobs, linear, multi_linear
from tests.helpers import MULTI_X, MULTI_Y, SALARY_X, SALARY_Y, state_dict


def test_committed_csvs_are_the_tutorials_data() -> None:
    sal = linear.load(linear.CSV_PATH).pool
    assert sal.x.flatten().tolist() == SALARY_X and sal.y.flatten().tolist() == SALARY_Y
    ml = multi_linear.load(multi_linear.CSV_PATH).pool
    assert torch.equal(ml.x, torch.FloatTensor(MULTI_X))
    assert torch.equal(ml.y, torch.FloatTensor(MULTI_Y))


def test_models_keep_the_tutorials_state_dict_keys() -> None:
    assert list(linear.LinearRegressionModel(1, 1).state_dict()) == ["linear.weight", "linear.bias"]
    assert list(JOBS["multi_linear"].build_model(JOBS["multi_linear"].config()).state_dict()) == ["weight", "bias"]


def test_not_in_the_default_set() -> None:
    assert "linear" not in default_jobs() and "multi_linear" not in default_jobs()


def test_every_row_is_training_data() -> None:
    assert JOBS["linear"].split_sizes(7) == (7, 0, 0)
    assert JOBS["multi_linear"].split_sizes(6) == (6, 0, 0)


@pytest.mark.parametrize(
    "job, content, expected",
    [
        ("linear", "x,y\n1,2\n3,nan\n", "is not finite"),
        ("linear", "x,y\n1,2\n2,3\n", "too few rows to split"),  # full batch of 7
        ("multi_linear", "x,y\n1,2\n", "2 columns (x, y); expected 4 (header 'x1,x2,y1,y2')"),
        ("multi_linear", "x1,x2,y1,y2\n1,2,3,oops\n2,3,4,5\n", "'oops' is not a number"),
        ("multi_linear", "1,2,3,4\n5,6,7,8\n", "add the line 'x1,x2,y1,y2' at the top"),
    ],
)
def test_bad_csv_is_one_line(job: str, content: str, expected: str, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    code = main(["--job", job, "--data", str(csv), "--artifacts-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and expected in err and str(csv) in err, err
    assert not (tmp_path / "a" / job).exists() or not any((tmp_path / "a" / job).iterdir())


@pytest.mark.slow
def test_linear_default_run_predicts_like_least_squares(prefect_api: str, tmp_path: Path) -> None:
    """10 000 full-batch epochs at lr 0.02: the x = 8 prediction matches the least-squares line
    of all 7 rows (206 571.43) to well under one won; the tutorial's own code loads the model."""
    result = train_flow(job="linear", artifacts_dir=str(tmp_path))
    run_dir = Path(result["linear"]["run_dir"])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["val"] == {"rows": 0} and m["test"] == {"rows": 0} and m["train"]["rows"] == 7
    assert m["prediction"]["least_squares_y"] == pytest.approx(206571.428571, abs=1e-3)
    assert abs(m["prediction"]["y"] - m["prediction"]["least_squares_y"]) < 1.0
    assert m["weight"] == pytest.approx(25642.857, abs=0.05) and m["bias"] == pytest.approx(1428.571, abs=0.5)
    assert m["train_mse_over_optimum"] < 1 + 1e-5
    # The tutorial's loading and prediction code, unchanged.
    model = linear.LinearRegressionModel(1, 1)
    model.load_state_dict(torch.load(run_dir / "model_state_dict.pt"))
    with torch.no_grad():
        assert float(model(torch.Tensor([[8]]))) == m["prediction"]["y"]


@pytest.mark.slow
def test_multi_linear_default_run_reaches_least_squares(prefect_api: str, tmp_path: Path) -> None:
    """The tutorial's recipe (SGD lr 1e-3, batch 2, 20 000 epochs) reaches the least-squares
    solution nearest its initial weights (x2 = x1 + 1 makes the solution set a line)."""
    result = train_flow(job="multi_linear", artifacts_dir=str(tmp_path))
    run_dir = Path(result["multi_linear"]["run_dir"])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["least_squares"]["rank"] == 2 and m["train"]["rows"] == 6
    assert m["weights_distance"] < 1e-3 and m["train"]["loss"] < 1e-8
    trained = torch.tensor([*m["weights"], m["bias"]]).double()  # rows: W[0], W[1], b
    nearest = torch.tensor([*m["least_squares"]["nearest"]["weights"], m["least_squares"]["nearest"]["bias"]]).double()
    assert torch.allclose(trained, nearest, atol=1e-3)
    # "Nearest" is the projection of the initial weights onto the solutions: SGD never moves
    # along the null direction. Rebuild the initial weights exactly as the trainer does.
    spec = JOBS["multi_linear"]
    cfg = spec.config()
    torch.manual_seed(cfg.seed)
    init = spec.build_model(cfg)
    x, y = (torch.tensor(v, dtype=torch.float32) for v in (MULTI_X, MULTI_Y))
    projected = multi_linear.nearest_least_squares(x, y, multi_linear._theta(init))
    projected = torch.cat([projected[:2].T, projected[2:]])
    # float32 rounding over 60 000 steps drifts ~3e-5 along the null direction, no more.
    assert torch.allclose(projected, nearest, atol=2e-4) and torch.allclose(trained, projected, atol=2e-4)
    min_norm = torch.tensor([*m["least_squares"]["min_norm"]["weights"], m["least_squares"]["min_norm"]["bias"]]).double()
    assert (trained - min_norm).abs().max() > 0.1  # a different solution: only the nearest one is reached
    # The fitted map on a new point: y1 = 0.9 x1 - 0.8, y2 = 1.3 x1 + 0.2.
    assert torch.allclose(torch.tensor(m["predictions"]["y"]), torch.tensor([[5.5, 9.3]]), atol=1e-3)
    # The tutorial's bare nn.Linear(2, 2) takes the state_dict.
    layer = nn.Linear(2, 2, bias=True)
    layer.load_state_dict(state_dict(run_dir / "model_state_dict.pt"))
