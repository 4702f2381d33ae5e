"""The tutorial's nonlinear regression: y = 3.1x^2 - 1.7x + U(0.01, 0.99), features [x^2, x]."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from tasks.jobs.csvdata import read_xy_csv
from tasks.jobs.spec import DATA_DIR, JobData, JobSpec, Predictor, Tensors, TrainConfig

CSV_PATH = DATA_DIR / "non_linear.csv"
GENERATOR_SEED = 20241210  # the tutorial post's date; any fixed value would do


def generate_csv_text(seed: int = GENERATOR_SEED) -> str:
    """The committed ``data/non_linear.csv``: x = -10.0, -9.9, ..., 9.9 (200 rows)."""
    rng = np.random.default_rng(seed)
    xs = np.round(np.arange(-100, 100) / 10.0, 1)
    ys = 3.1 * xs**2 - 1.7 * xs + rng.uniform(0.01, 0.99, size=xs.shape)
    return "x,y\n" + "".join(f"{x:.1f},{y:.2f}\n" for x, y in zip(xs, ys))


class CustomDataset(Dataset):
    """The tutorial's dataset: row i -> (FloatTensor[x^2, x], FloatTensor[y]). Used by the
    benchmark's tutorial loop; our pipeline builds the same tensors once in :func:`load`."""

    def __init__(self, file_path: Path):
        import pandas as pd  # as the tutorial reads it; the pipeline itself does not need pandas

        df = pd.read_csv(file_path)
        self.x = df.iloc[:, 0].values
        self.y = df.iloc[:, 1].values
        self.length = len(df)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.FloatTensor([self.x[index] ** 2, self.x[index]])
        y = torch.FloatTensor([self.y[index]])
        return x, y

    def __len__(self) -> int:
        return self.length


class CustomModel(nn.Module):
    """The tutorial's model; the attribute name ``layer`` keeps its state_dict keys."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # [B, 2] -> [B, 1]


def features(xs: np.ndarray) -> torch.Tensor:
    """[N] x values -> float32 [N, 2] features [x^2, x] (squared in float64, as the tutorial)."""
    return torch.from_numpy(np.stack([xs**2, xs], axis=1)).float()


def load(path: Path) -> JobData:
    """Parse and check the CSV once; features [N, 2], targets [N, 1]."""
    values = read_xy_csv(path)
    return JobData(
        pool=Tensors(features(values[:, 0]), torch.from_numpy(values[:, 1:2]).float()),
        fingerprint=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
    )


def least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form fit of y on [x^2, x, 1] in float64: returns [w1, w2, b]."""
    a = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [N, 3]
    return torch.linalg.lstsq(a, y.double()).solution.flatten()


def report(run_dir: Path, model: nn.Module, data: JobData, split: dict[str, torch.Tensor], metrics: dict[str, Any]) -> dict[str, Any]:
    """Compare the trained line with the least-squares optimum on the same split."""
    pool = data.pool
    opt = least_squares(pool.x[split["train"]], pool.y[split["train"]])
    test_x, test_y = pool.x[split["test"]].double(), pool.y[split["test"]].double()
    opt_mse = float(((test_x @ opt[:2] + opt[2] - test_y.flatten()) ** 2).mean())
    w = model.layer.weight.detach().cpu().double().flatten()
    b = float(model.layer.bias.detach().cpu().double())
    with torch.no_grad():
        probe = model(features(np.array([1.0, 5.0, 11.0])).to(model.layer.weight.device)).flatten().tolist()
    plot_fit(Path(run_dir) / FIT_PNG, model, pool, split, opt)
    return {
        "weights": [float(w[0]), float(w[1])],
        "bias": b,
        "weights_error": [abs(float(w[0]) - 3.1), abs(float(w[1]) + 1.7)],
        "least_squares": {"weights": [float(opt[0]), float(opt[1])], "bias": float(opt[2]), "test_mse": opt_mse},
        "test_mse_over_optimum": metrics["test"]["loss"] / opt_mse,
        "predictions": {"x": [1.0, 5.0, 11.0], "y": probe},
    }


FIT_PNG = "fit.png"


def plot_fit(path: Path, model: nn.Module, pool: Tensors, split: dict[str, torch.Tensor], opt: torch.Tensor) -> Path:
    """The data (train/val/test), the trained model's curve and the least-squares curve."""
    from tasks.jobs.plots import new_figure, save_png

    xs = pool.x[:, 1].double()  # the feature column [x^2, x] -> x
    grid = np.linspace(float(xs.min()), float(xs.max()), 400)
    with torch.no_grad():
        fitted = model(features(grid).to(model.layer.weight.device)).flatten().cpu().numpy()
    lsq = opt[0].item() * grid**2 + opt[1].item() * grid + opt[2].item()
    fig = new_figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    for part, color in (("train", "tab:blue"), ("val", "tab:orange"), ("test", "tab:red")):
        idx = split[part]
        ax.scatter(xs[idx].numpy(), pool.y[idx].flatten().numpy(), s=10, color=color, alpha=0.6, label=f"{part} ({len(idx)})")
    w = model.layer.weight.detach().cpu().double().flatten().tolist()
    b = float(model.layer.bias.detach().cpu().double())
    ax.plot(grid, fitted, color="black", linewidth=1.5, label=f"model: {w[0]:.4f}x² {w[1]:+.4f}x {b:+.4f}")
    ax.plot(grid, lsq, color="tab:green", linestyle="--", linewidth=1.5,
            label=f"least squares (train): {opt[0].item():.4f}x² {opt[1].item():+.4f}x {opt[2].item():+.4f}")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("nonlinear: y = 3.1x² − 1.7x + noise")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _predict_arguments(parser: Any) -> None:
    parser.add_argument("--x", type=float, nargs="+", required=True, metavar="X", help="x values to predict y for")


def _predict_inputs(args: Any, cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    return features(np.array(args.x, dtype=np.float64)), [f"x={x:g}" for x in args.x]


def _predict_format(labels: list[str], outputs: torch.Tensor) -> list[str]:
    return [f"{label}: y={float(y):.4f}" for label, y in zip(labels, outputs.flatten())]


PREDICTOR = Predictor(add_arguments=_predict_arguments, inputs=_predict_inputs, format=_predict_format,
                      fields=lambda outputs: [{"y": float(y)} for y in outputs.flatten()])


JOB = JobSpec(
    name="nonlinear",
    description="y = 3.1x^2 - 1.7x + noise from a CSV, nn.Linear(2, 1) on [x^2, x], MSE, SGD",
    defaults=dict(
        data=CSV_PATH, epochs=10_000, chunk_epochs=1_000, lr=1e-4, batch_size=16,
        eval_batch_size=4, optimizer="sgd",
    ),
    load=load,
    build_model=lambda cfg: CustomModel(),
    loss=lambda cfg: nn.MSELoss(),
    report=report,
    model_label=lambda cfg: "CustomModel",
    data_help="CSV with header 'x,y'",
    predict=PREDICTOR,
)
