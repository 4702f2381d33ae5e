"""The nonlinear tutorial's script as written: the baseline of benchmarks/tutorial_loops.py.

    python benchmarks/tutorial_nonlinear.py --out DIR [--epochs 10000 --chunk-epochs 1000]

Its Dataset builds a new tensor per sample, read through a DataLoader (batch 16, shuffle,
drop_last), SGD lr 1e-4, 10 000 epochs, a checkpoint (the tutorial's keys) every 1 000 epochs,
then the validation rows, all with torch's default threads, as the tutorial runs. It prints
the seconds of its training loop alone: the measure the README's old target was set on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn, optim
from torch.utils.data import DataLoader, random_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.jobs.nonlinear import CSV_PATH, CustomDataset, CustomModel

LOOP_MARK = "tutorial: training loop"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoints")
    p.add_argument("--epochs", type=int, default=10_000)
    p.add_argument("--chunk-epochs", type=int, default=1_000)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    dataset = CustomDataset(CSV_PATH)
    n = len(dataset)
    train_size, validation_size = int(n * 0.8), int(n * 0.1)
    train_dataset, validation_dataset, _ = random_split(
        dataset, [train_size, validation_size, n - train_size - validation_size], torch.manual_seed(4))
    train_dataloader = DataLoader(train_dataset, batch_size=16, shuffle=True, drop_last=True)
    validation_dataloader = DataLoader(validation_dataset, batch_size=4, shuffle=True, drop_last=True)

    model = CustomModel()
    criterion = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=0.0001)

    t0 = time.perf_counter()
    checkpoint = 1
    for epoch in range(a.epochs):
        cost = 0.0
        for x, y in train_dataloader:
            output = model(x)
            loss = criterion(output, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cost += loss
        cost = cost / len(train_dataloader)
        if (epoch + 1) % a.chunk_epochs == 0:
            torch.save({"model": "CustomModel", "epoch": epoch, "model_state_dict": model.state_dict(),
                        "optimizer_state_dict": optimizer.state_dict(), "cost": cost,
                        "description": f"CustomModel 체크포인트-{checkpoint}"}, a.out / f"checkpoint-{checkpoint}.pt")
            checkpoint += 1
    print(f"{LOOP_MARK} {time.perf_counter() - t0:.3f} s", flush=True)

    with torch.no_grad():
        model.eval()
        for x, y in validation_dataloader:
            outputs = model(x)
            print(f"X : {x}\nY : {y}\nOutputs : {outputs}\n------------------")


if __name__ == "__main__":
    main()
