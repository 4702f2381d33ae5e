"""What can 2 processes gain here at best? The product's training step alone, with no launch,
validation or checkpoint: 1 process at the batch size, against 2 processes on half batches
each, independent (the machine's ceiling: no communication) and in DDP (torch.distributed's
ceiling: the gradient all-reduce added). 1 thread per process, interleaved rounds.

    python benchmarks/ddp_step.py                          # small_cnn, 3 rounds
    python benchmarks/ddp_step.py --model lenet --rounds 5 --steps 200

The step is tasks/engine/training.py's ``train_epoch`` over real FashionMNIST batches, the model,
optimizer and loss built as a run builds them, wrapped in DDP as tasks/engine/distributed.py does.
benchmarks/distributed.py measures the whole command; this one says how much of its gap to the
``--nproc-per-node`` goal (>= 1.6x) is the machine's and the all-reduce's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(model: str, batch: int, steps: int, ddp: bool) -> None:
    """Time ``steps`` training steps of ``batch`` rows (this process's share); print JSON."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tasks.engine.distributed import shard
    from tasks.engine.rows import TensorRows, epoch_order
    from tasks.engine.training import Step, build_optimizer, textbook_loss, train_epoch
    from tasks.jobs.registry import get_job
    from tasks.storage.data import load_job_data, make_split, split_tensors

    torch.set_num_threads(1)
    cfg = get_job("fashion_mnist").config(model=model, threads=1)
    spec, data = get_job(cfg.job), load_job_data(cfg)
    train = TensorRows(split_tensors(data, make_split(data, cfg), "train"), torch.device("cpu"), spec.prepare)
    net = spec.build_model(cfg)
    optimizer, loss_fn = build_optimizer(cfg, net), spec.loss(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if ddp:
        dist.init_process_group("gloo")
        net = DistributedDataParallel(net, broadcast_buffers=False)  # as tasks/engine/distributed.py
    step = Step(cfg, net, optimizer, None, textbook_loss(loss_fn), torch.device("cpu"))
    order = shard(epoch_order(cfg.seed, 0, len(train)), batch * world, rank, world)  # [n]: this process's rows
    warm, timed = order[: 10 * batch], order[10 * batch : (10 + steps) * batch]
    train_epoch(step, train.batches(0, warm, batch, 0, len(warm) // batch))
    if ddp:
        dist.barrier()
    t0 = time.perf_counter()
    train_epoch(step, train.batches(0, timed, batch, 0, len(timed) // batch))
    if rank == 0:  # DDP's ranks run in step: rank 0's time is the group's
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    if ddp:
        dist.destroy_process_group()


def run(args: argparse.Namespace, mode: str) -> float:
    """Samples per second of the whole group (all processes' rows over the slowest's time)."""
    half = args.batch // 2
    me = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--steps", str(args.steps)]
    if mode == "ddp":
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 *me, "--batch", str(half), "--ddp"]]
    else:
        n = 1 if mode == "single" else 2
        cmds = [[sys.executable, *me, "--batch", str(args.batch if n == 1 else half)]] * n
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                              cwd=ROOT) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    seconds = [json.loads(line)["seconds"] for out in outs for line in out.splitlines() if line.startswith("{")]
    if not seconds or any(p.returncode for p in procs):
        raise SystemExit(f"{mode} failed: {' '.join(cmds[0])}")
    return args.steps * args.batch / max(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn", choices=["small_cnn", "lenet", "cnn"])
    p.add_argument("--batch", type=int, default=128, help="the global batch (each of 2 processes takes half)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.model, args.batch, args.steps, args.ddp)
    modes = ["single", "pair", "ddp"]
    got: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes[r % 3:] + modes[: r % 3]:  # the first mode rotates each round
            got[mode].append(run(args, mode))
        print(f"round {r + 1}: " + ", ".join(f"{m} {got[m][-1]:.0f}" for m in modes) + " samples/s", flush=True)
    ratio = {m: statistics.median(b / a for a, b in zip(got["single"], got[m])) for m in ("pair", "ddp")}
    print(f"{args.model}, batch {args.batch}, {args.rounds} rounds (medians of per-round ratios): 2 independent "
          f"processes {ratio['pair']:.2f}x one (the machine's ceiling); 2 DDP ranks {ratio['ddp']:.2f}x one "
          f"(with the all-reduce; goal >= 1.6x)")


if __name__ == "__main__":
    main()
