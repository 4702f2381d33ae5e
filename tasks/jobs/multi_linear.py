"""Multiple linear regression, the 2 -> 2 example of the datasets/dataloaders tutorial (seed 001).

- Data: ``data/multi_linear.csv`` (header ``x1,x2,y1,y2``), the tutorial's ``train_x`` /
  ``train_y`` (6 rows), read by the shared checked CSV reader.
- Model: the tutorial's bare ``nn.Linear(2, 2, bias=True)``, so ``model_state_dict.pt`` has its
  keys ``weight`` and ``bias`` and loads into ``nn.Linear(2, 2)``.
- Loss/optimizer: MSE, SGD lr 1e-3, batch 2, shuffled, drop_last, 20 000 epochs (chunks of
  2 000), all as in the tutorial. (The tutorial's loop as published never calls
  ``optimizer.zero_grad()``, so its gradients pile up across batches; we keep the standard
  zero_grad -> backward -> step of the other tutorials and the generic loop.)
- Split: :func:`~tasks.jobs.csvdata.train_on_all_rows`, like the tutorial: 6 rows leave nothing
  worth holding out, so validation and test are empty (``"rows": 0`` in ``metrics.json``) and
  :func:`report` evaluates the fit on the training rows and against least squares.
- Least squares is not unique here: x2 = x1 + 1 in every row, so [x1, x2, 1] has rank 2 and the
  exact solutions form a line. (S)GD never moves the weights along that line's direction (every
  gradient lies in the row space of the data), so it converges to the least-squares solution
  *nearest its initial weights*; :func:`report` compares with that one (and also lists the
  minimum-norm solution, which SGD does not reach).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.jobs.csvdata import read_xy_csv, train_on_all_rows
from tasks.jobs.spec import DATA_DIR, JobData, JobSpec, Tensors

CSV_PATH = DATA_DIR / "multi_linear.csv"
HEADER = "x1,x2,y1,y2"
#: A point beyond the data, to show the fitted map (y1 = 0.9 x1 - 0.8, y2 = 1.3 x1 + 0.2 there).
PROBE_X = [[7.0, 8.0]]


def load(path: Path) -> JobData:
    """Parse and check the CSV once; x [N, 2], y [N, 2] (float32, like ``torch.FloatTensor``)."""
    values = torch.from_numpy(read_xy_csv(path, 4, HEADER)).float()
    return JobData(
        pool=Tensors(values[:, 0:2].contiguous(), values[:, 2:4].contiguous()),
        fingerprint=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
    )


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [N, 3]


def _theta(model: nn.Linear) -> torch.Tensor:
    """Weights and bias stacked as the least-squares unknowns [3, 2]: rows w_x1, w_x2, b."""
    return torch.cat([model.weight.detach().cpu().double().T, model.bias.detach().cpu().double()[None]], dim=0)


def nearest_least_squares(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The least-squares solution nearest to ``theta`` [3, 2] (the unique one when the data
    has full rank): theta + pinv(A) (y - A theta)."""
    a = _design(x)
    return theta + torch.linalg.pinv(a) @ (y.double() - a @ theta)


def _as_layer(theta: torch.Tensor) -> dict[str, list]:
    return {"weights": theta[:2].T.tolist(), "bias": theta[2].tolist()}


def report(run_dir: Path, model: nn.Module, data: JobData, split: dict[str, torch.Tensor], metrics: dict[str, Any]) -> dict[str, Any]:
    """Weights against least squares on the training rows, and the fit on those rows."""
    x, y = data.pool.x[split["train"]], data.pool.y[split["train"]]
    device = model.weight.device
    with torch.no_grad():
        fitted = model(x.to(device)).cpu().double()
        probe = model(torch.tensor(PROBE_X, device=device)).cpu().tolist()
    theta = _theta(model)
    nearest = nearest_least_squares(x, y, theta)
    min_norm = torch.linalg.pinv(_design(x)) @ y.double()
    ls_mse = float(((_design(x) @ nearest - y.double()) ** 2).mean())
    return {
        "evaluated_on": "training rows (val and test are empty: the job trains on all rows, see tasks/jobs/multi_linear.py)",
        "train": {"rows": len(x), "loss": float(((fitted - y.double()) ** 2).mean())},
        **_as_layer(theta),
        "least_squares": {
            "rank": int(torch.linalg.matrix_rank(_design(x))),
            "nearest": _as_layer(nearest),
            "min_norm": _as_layer(min_norm),
            "train_mse": ls_mse,
        },
        "weights_distance": float((theta - nearest).abs().max()),
        "predictions": {"x": PROBE_X, "y": probe},
    }


JOB = JobSpec(
    name="multi_linear",
    description="2 -> 2 multiple linear regression (6 rows), nn.Linear(2, 2), MSE, SGD lr 1e-3, batch 2",
    defaults=dict(
        data=CSV_PATH, epochs=20_000, chunk_epochs=2_000, lr=1e-3, batch_size=2, eval_batch_size=2,
        optimizer="sgd",
    ),
    load=load,
    build_model=lambda cfg: nn.Linear(2, 2, bias=True),
    loss=lambda cfg: nn.MSELoss(),
    split_sizes=train_on_all_rows,
    report=report,
    model_label=lambda cfg: "Linear",
    in_default_set=False,
    data_help=f"CSV with header '{HEADER}' (default data/multi_linear.csv)",
)
