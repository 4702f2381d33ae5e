"""My own trainflow job: y from x1 and x2 in a CSV with the header x1,x2,y; a small MLP, MSE, Adam.

Run from this file's folder: python /path/to/trainflow/flows/train_flow.py --job my_job:JOB
"""

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.jobs.spec import JobData, JobSpec, Predictor, Tensors, UserError


def load(path: Path) -> JobData:
    """Every row, as one pool that trainflow splits 80/10/10; the fingerprint (of the content)
    is how a rerun sees that the data changed. UserError: a one-line message, exit 2."""
    try:
        rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as exc:
        raise UserError(f"data file {path}: {exc}; pass --data PATH to a CSV with the header x1,x2,y") from None
    if rows.shape[1] != 3:
        raise UserError(f"data file {path} has {rows.shape[1]} columns; expected 3 (x1,x2,y)")
    x, y = torch.from_numpy(rows[:, :2]), torch.from_numpy(rows[:, 2:])  # [N, 2], [N, 1]
    return JobData(pool=Tensors(x, y), fingerprint=hashlib.sha256(Path(path).read_bytes()).hexdigest())


def predict_options(parser) -> None:  # flows/predict_flow.py --run ... --x 1 2 --x 3 4
    parser.add_argument("--x", type=float, nargs=2, action="append", required=True, metavar=("X1", "X2"))


JOB = JobSpec(
    name="my_job",  # trainflow names an import-path job by its path: my_job.JOB
    description="y from x1, x2 (CSV): MLP 2-16-1, MSE, Adam",
    defaults=dict(data=Path(__file__).with_name("points.csv"), epochs=40, chunk_epochs=10, lr=0.01,
                  batch_size=16, eval_batch_size=64, optimizer="adam"),
    load=load,
    build_model=lambda cfg: nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)),
    loss=lambda cfg: nn.MSELoss(),
    data_help="CSV with the header x1,x2,y",
    predict=Predictor(
        add_arguments=predict_options,
        inputs=lambda args, cfg: (torch.tensor(args.x), [f"x1={a:g} x2={b:g}" for a, b in args.x]),
        format=lambda labels, out: [f"{label}: y={float(y):.4f}" for label, y in zip(labels, out)],
    ),
)
