"""Simple linear regression, the salary tutorial (seed 002): y = w x + b on 7 rows.

- Data: ``data/salary.csv`` (header ``x,y``), the tutorial's X = 1..7 (years) and
  Y = 25 000 ... 180 000 (salary), read by the shared checked CSV reader.
- Model: the tutorial's ``LinearRegressionModel`` with its attribute ``linear`` =
  ``nn.Linear(1, 1)``, so our ``model_state_dict.pt`` (keys ``linear.weight``, ``linear.bias``)
  loads into the tutorial's class and ``model(torch.Tensor([[8]]))`` prints the prediction in won.
- Loss/optimizer: MSE, plain SGD, full batch (``batch_size`` 7 = every row of the committed
  file; with a longer ``--data`` it becomes mini-batches of 7).
- Split: :func:`~tasks.jobs.csvdata.train_on_all_rows`. The tutorial fits all 7 points and so
  do we: holding out 2 of 7 points would move the line (and the x = 8 prediction) far more than
  a 1-row validation/test set could measure. Validation and test are therefore empty
  (``metrics.json`` shows ``"rows": 0``); :func:`report` evaluates the final model on the
  training rows (``train``) and against the closed-form least-squares line of the same rows.
- Learning rate and scaling: raw units (no feature or target scaling) with lr 0.02 instead of
  the tutorial's 0.001. For MSE + SGD the error dynamics are linear in the targets, so scaling
  y (e.g. to units of 10 000) changes the loss's size but not how fast or whether it converges;
  that is set by x: the Hessian 2·E[[x², x], [x, 1]] has eigenvalues 41.6 and 0.384 for
  x = 1..7. lr 0.001 crawls along the slow direction (after 10 000 epochs the prediction for
  x = 8 is still ~48 won off the optimum), lr ≥ 2/41.6 ≈ 0.048 diverges (it does at 0.05), and
  lr 0.02 is well inside the stable range and converges to float32 precision in ~2 000 epochs.
  Keeping raw units keeps the tutorial's model meaning (weight in won per year).
- Epochs: 10 000 in chunks of 1 000 (the tutorial's ``range(10001)``, rounded so every chunk is
  whole; the fit has converged long before).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.jobs.csvdata import read_xy_csv, train_on_all_rows
from tasks.jobs.spec import DATA_DIR, JobData, JobSpec, Tensors

CSV_PATH = DATA_DIR / "salary.csv"
#: The tutorial predicts the salary for this x.
PREDICT_X = 8.0


class LinearRegressionModel(nn.Module):
    """The tutorial's model; the attribute name ``linear`` keeps its state_dict keys."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # [B, 1] -> [B, 1]


def load(path: Path) -> JobData:
    """Parse and check the CSV once; x [N, 1], y [N, 1] (float32, like ``torch.Tensor(X)``)."""
    values = torch.from_numpy(read_xy_csv(path, 2, "x,y")).float()
    return JobData(
        pool=Tensors(values[:, 0:1].contiguous(), values[:, 1:2].contiguous()),
        fingerprint=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
    )


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Closed-form fit of y on [x, 1] in float64: (weight, bias)."""
    a = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [N, 2]
    w, b = torch.linalg.lstsq(a, y.double()).solution.flatten().tolist()
    return w, b


def report(run_dir: Path, model: nn.Module, data: JobData, split: dict[str, torch.Tensor], metrics: dict[str, Any]) -> dict[str, Any]:
    """The tutorial's outputs (f(x) and the prediction for x = 8), the fit on the training rows,
    and the same for the least-squares line of those rows."""
    x, y = data.pool.x[split["train"]], data.pool.y[split["train"]]
    device = model.linear.weight.device
    with torch.no_grad():
        fitted = model(x.to(device)).cpu().double()
        pred = float(model(torch.tensor([[PREDICT_X]], device=device)))
    w, b = float(model.linear.weight.detach()), float(model.linear.bias.detach())
    ls_w, ls_b = least_squares(x, y)
    ls_pred = ls_w * PREDICT_X + ls_b
    mse = float(((fitted - y.double()) ** 2).mean())
    ls_mse = float(((x.double() * ls_w + ls_b - y.double()) ** 2).mean())
    return {
        "evaluated_on": "training rows (val and test are empty: the job trains on all rows, see tasks/jobs/linear.py)",
        "train": {"rows": len(x), "loss": mse},
        "weight": w,
        "bias": b,
        "equation": f"f(x) = {w:.2f}x + {b:.2f}",
        "prediction": {"x": PREDICT_X, "y": pred, "least_squares_y": ls_pred, "abs_error": abs(pred - ls_pred)},
        "least_squares": {"weight": ls_w, "bias": ls_b, "train_mse": ls_mse},
        "train_mse_over_optimum": mse / ls_mse if ls_mse > 0 else None,
    }


JOB = JobSpec(
    name="linear",
    description="salary by year (7 rows), nn.Linear(1, 1), MSE, full-batch SGD; predicts x = 8",
    defaults=dict(
        data=CSV_PATH, epochs=10_000, chunk_epochs=1_000, lr=0.02, batch_size=7, eval_batch_size=7,
        optimizer="sgd",
    ),
    load=load,
    build_model=lambda cfg: LinearRegressionModel(1, 1),
    loss=lambda cfg: nn.MSELoss(),
    split_sizes=train_on_all_rows,
    report=report,
    model_label=lambda cfg: "LinearRegressionModel",
    in_default_set=False,
    data_help="CSV with header 'x,y' (default data/salary.csv)",
)
