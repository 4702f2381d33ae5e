"""The nonlinear tutorial's own data path as trainflow jobs: its ``CustomDataset``, copied
verbatim from the tutorial (tests/test_datasets.py checks the copy), plugged in unchanged.

- ``JOB``: the tutorial's Dataset, model, loss and optimizer. Its floats are the built-in
  ``nonlinear`` job's (the same rows in the same order), whatever ``--num-workers``.
- ``AUGMENTED``: the same with random augmentation (noise on x, drawn from torch's global
  generator as torchvision's transforms draw), validated on the items without it.
"""

import hashlib
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from tasks.jobs.spec import JobData, JobSpec

CSV = Path(__file__).resolve().parents[2] / "data" / "non_linear.csv"


# --- verbatim from the tutorial (shared/seeds/000) ---
class CustomDataset(Dataset):
    def __init__(self, file_path):
        df = pd.read_csv(file_path)  # file_path로 csv 파일 불러오기
        self.x = df.iloc[:, 0].values
        self.y = df.iloc[:, 1].values
        self.length = len(df)

    def __getitem__(self, index):  # x, y값 반환 (2차 방정식 형태)
        x = torch.FloatTensor([self.x[index] ** 2, self.x[index]])
        y = torch.FloatTensor([self.y[index]])
        return x, y

    def __len__(self):
        return self.length


class CustomModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def forward(self, x):
        x = self.layer(x)
        return x
# --- end of the tutorial's code ---


class Jitter(Dataset):
    """Random augmentation: each item's x plus a little noise, new every epoch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x * (1 + 0.01 * torch.randn(2)), y

    def __len__(self):
        return len(self.dataset)


def load(path: Path) -> JobData:
    return JobData(pool=CustomDataset(path), fingerprint=hashlib.sha256(Path(path).read_bytes()).hexdigest())


def load_augmented(path: Path) -> JobData:
    plain = CustomDataset(path)
    return JobData(pool=Jitter(plain), eval_pool=plain, fingerprint=hashlib.sha256(Path(path).read_bytes()).hexdigest())


DEFAULTS = dict(data=CSV, epochs=10_000, chunk_epochs=1_000, lr=1e-4, batch_size=16, eval_batch_size=4,
                optimizer="sgd")

JOB = JobSpec(
    name="tutorial_dataset",
    description="the nonlinear tutorial's CustomDataset through a DataLoader: nn.Linear(2, 1), MSE, SGD",
    defaults=DEFAULTS,
    load=load,
    build_model=lambda cfg: CustomModel(),
    loss=lambda cfg: nn.MSELoss(),
)

AUGMENTED = replace(JOB, name="tutorial_augmented", load=load_augmented,
                    description="the same with random noise on x in training (validated without)")
