"""Benchmarks (not tests): the tutorials' loops against ours, measured side by side in one run.

    python tests/benchmark.py                 # everything (~12 min on 2 cores)
    python tests/benchmark.py nonlinear       # or: fashion_mnist

Ratios are measured interleaved (A, B, A, B, ...) so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, random_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_THREADS = torch.get_num_threads()  # what the tutorial runs with, before anything changes it
sys.path.insert(0, str(ROOT))

from tasks.data import make_split, split_tensors  # noqa: E402
from tasks.jobs import get_job  # noqa: E402
from tasks.training import (build_optimizer, epoch_batches, epoch_order, setup_torch, shard_clock,  # noqa: E402
                            train_epoch)


def interleave(*fns, rounds: int) -> list[list[float]]:
    """Time each of ``fns`` in turn, ``rounds`` times over; one list of times per function."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return times


def line(name: str, ours: float, theirs: float, target: float) -> None:
    ratio = ours / theirs
    print(f"  {name}: ours {ours:.3f}s, tutorial {theirs:.3f}s, ratio {ratio:.3f} "
          f"(target <= {target}) {'OK' if ratio <= target else 'MISSED'}")


# --- nonlinear -----------------------------------------------------------------------------


def bench_nonlinear(epochs_per_round: int, rounds: int, full: bool) -> None:
    from tasks.jobs.nonlinear import CSV_PATH, CustomDataset, CustomModel

    print(f"nonlinear: training loop, {epochs_per_round} epochs per round, {rounds} rounds interleaved")
    torch.set_num_threads(1)
    spec = get_job("nonlinear")
    cfg = spec.config()

    # The tutorial: a new tensor per sample through a DataLoader (batch 16, shuffle, drop_last).
    dataset = CustomDataset(CSV_PATH)
    train_ds, _, _ = random_split(dataset, [160, 20, 20], generator=torch.Generator().manual_seed(0))
    loader = DataLoader(train_ds, batch_size=16, shuffle=True, drop_last=True)
    t_model = CustomModel()
    criterion = nn.MSELoss()
    t_opt = optim.SGD(t_model.parameters(), lr=0.0001)

    def tutorial(epochs: int = epochs_per_round) -> None:
        for _ in range(epochs):
            cost = 0.0
            for x, y in loader:
                output = t_model(x)
                loss = criterion(output, y)
                t_opt.zero_grad()
                loss.backward()
                t_opt.step()
                cost += loss
            cost = cost / len(loader)

    # Ours: features built once, shuffled batches sliced from them (same semantics).
    data = spec.load(CSV_PATH)
    train = split_tensors(data, make_split(data, cfg), "train")
    o_model = CustomModel()
    o_opt = build_optimizer(cfg, o_model)
    epoch = [0]

    def ours() -> None:
        for _ in range(epochs_per_round):
            train_epoch(o_model, o_opt, None, criterion, train, epoch_order(0, epoch[0], len(train)), 16)
            epoch[0] += 1

    ta, tb = interleave(ours, tutorial, rounds=rounds)
    line("training loop (median round)", statistics.median(ta), statistics.median(tb), 0.35)

    if full:
        print("nonlinear: full `python flows/train_flow.py --job nonlinear` (a new process, its own temporary "
              "Prefect server) against the tutorial's 10 000 epochs, 5 rounds interleaved")

        def flow() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
                subprocess.run([sys.executable, str(ROOT / "flows" / "train_flow.py"), "--job", "nonlinear",
                                "--artifacts-dir", tmp], check=True, capture_output=True, cwd=ROOT, env=env)

        tf, tt = interleave(flow, lambda: tutorial(10_000), rounds=5)
        print("  rounds (s): flow " + " ".join(f"{t:.1f}" for t in tf) + ", tutorial " + " ".join(f"{t:.1f}" for t in tt))
        line("whole flow incl. Prefect start vs tutorial loop (median)", statistics.median(tf), statistics.median(tt), 0.6)


# --- FashionMNIST -------------------------------------------------------------------------


class TutorialNeuralNet(nn.Module):
    """The tutorial's model as written (003; Python 3 super()): the baseline runs its code, not ours."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def num_flat_features(self, x):
        n = 1
        for s in x.size()[1:]:
            n *= s
        return n


def torchvision_root(folder: Path, tmp: Path) -> Path:
    """A torchvision root with the extracted IDX files it expects."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name.endswith("-ubyte.gz"):
            (raw / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
        elif f.name.endswith("-ubyte"):
            (raw / f.name).write_bytes(f.read_bytes())
    return tmp


def bench_fashion(rounds: int, goal: bool) -> None:
    from torchvision import datasets, transforms

    import tasks.jobs.fashion_mnist as fm

    spec = get_job("fashion_mnist")
    folder = fm.locate(fm.DATA_DIR)
    print(f"fashion_mnist: one epoch of the 60 000 training images, tutorial pipeline vs ours (LeNet, SGD lr 1e-3 "
          f"momentum 0.9, batch 128), {rounds} rounds interleaved; data in {folder}")
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(folder, Path(tmp))
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        trainset = datasets.FashionMNIST(root=str(root), train=True, download=False, transform=transform)
        # The tutorial as written: default threads, 2 worker processes, per-sample PIL transforms.
        loader = DataLoader(trainset, batch_size=128, shuffle=True, num_workers=2)
        t_net = TutorialNeuralNet()
        criterion = nn.CrossEntropyLoss()
        t_opt = optim.SGD(t_net.parameters(), lr=0.001, momentum=0.9)
        threads = DEFAULT_THREADS

        def tutorial() -> None:
            torch.set_num_threads(threads)
            for inputs, labels in loader:
                t_opt.zero_grad()
                loss = criterion(t_net(inputs), labels)
                loss.backward()
                t_opt.step()

        cfg = spec.config(model="lenet", optimizer="sgd", lr=1e-3, momentum=0.9, schedule="constant")
        data = spec.load(fm.DATA_DIR)
        # All 60 000 training images, as the tutorial's epoch (our runs hold 6 000 out for validation).
        train = data.pool

        def our_epochs(cfg):
            """One epoch of our training loop per call, on its own model and optimizer."""
            torch.manual_seed(0)
            net = spec.build_model(cfg)
            opt, epoch = build_optimizer(cfg, net), [0]
            clock = shard_clock(cfg.shards, torch.device("cpu"))  # one for all epochs, as a run's Trainer keeps

            def run() -> None:
                setup_torch(cfg)  # as the product does: threads and malloc policy (process-wide)
                train_epoch(net, opt, None, criterion, train, epoch_order(0, epoch[0], len(train)), 128, fm.prepare,
                            cfg.shards, clock)
                epoch[0] += 1

            return run

        ours = our_epochs(cfg)  # LeNet's default: 2 shards, one thread each
        # For comparison: one thread (--shards 1), and the tutorial's two intra-op threads
        # (--shards 1 --threads 2): faster still on an idle machine, several times slower when
        # another process is busy.
        ours_1 = our_epochs(cfg.model_copy(update={"shards": 1}))
        ours_2_threads = our_epochs(cfg.model_copy(update={"shards": 1, "threads": 2}))

        def data_only() -> None:
            setup_torch(cfg)  # our default thread count, whatever ran before
            for _ in epoch_batches(train, epoch_order(0, 0, len(train)), 128, fm.prepare):  # train_epoch's data path
                pass

        ta, tb, t1, t2 = interleave(ours, tutorial, ours_1, ours_2_threads, rounds=rounds)
        ours_s, tut_s = statistics.median(ta), statistics.median(tb)
        line(f"epoch (median; ours: --shards {cfg.shards} --threads {cfg.threads})", ours_s, tut_s, 0.25)
        print("  each round, ours / the tutorial's epoch right after it: "
              + " ".join(f"{a / b:.3f}" for a, b in zip(ta, tb)))
        for name, t in (("--shards 1 (one thread)", t1), ("--shards 1 --threads 2 (intra-op threads)", t2)):
            print(f"  for comparison, ours with {name}: {statistics.median(t):.3f}s, ratio {statistics.median(t) / tut_s:.3f}")
        td = statistics.median(interleave(data_only, rounds=3)[0])
        print(f"  data path alone: {td:.3f}s = {100 * td / ours_s:.2f}% of our epoch (target <= 2%) "
              f"{'OK' if td / ours_s <= 0.02 else 'MISSED'}")
        print(f"  (tutorial: {threads} intra-op threads + 2 workers; ours: {cfg.shards} shards of {cfg.threads} "
              f"thread each, no workers)")

    if goal:
        print("fashion_mnist: wall time of the default config to the accuracy goal (10 epochs, whole flow)")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(ROOT / "flows" / "train_flow.py"), "--job", "fashion_mnist",
                                   "--artifacts-dir", tmp], capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                return
            import json

            (run,) = (Path(tmp) / "fashion_mnist").glob("run-*")
            m = json.loads((run / "metrics.json").read_text())
            print(f"  test accuracy {m['test_accuracy']:.4f} (goal >= 0.910) after {m['epochs_trained']} epochs, "
                  f"wall time {wall:.1f}s including Prefect start")


def main() -> None:
    """Run the selected benchmarks and print their figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="*", help="nonlinear and/or fashion_mnist (default: both)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="skip the whole-flow runs")
    a = p.parse_args()
    a.which = a.which or ["nonlinear", "fashion_mnist"]
    if set(a.which) - {"nonlinear", "fashion_mnist"}:
        p.error(f"unknown benchmark(s) {sorted(set(a.which) - {'nonlinear', 'fashion_mnist'})}")
    if "nonlinear" in a.which:
        bench_nonlinear(200, a.rounds, full=not a.quick)
    if "fashion_mnist" in a.which:
        bench_fashion(a.rounds, goal=not a.quick)


if __name__ == "__main__":
    main()
