"""Checkpoint cost per chunk on S3 (moto on loopback) against local disk, and against the
chunk's training time, for ``fashion_mnist --model cnn``: ``[--rounds N] [--quick]``.

Imports ours' internals. The payload is the real one: the run's ``Trainer`` (real data; run
folder and split prepared in a temp dir as the flow does) after ``run_epoch`` on 20 batches, so
it holds Adam's and OneCycle's state, history and ``best``. A save: ``save(state_dict(chunk))``,
serialisation included, prune not, to ``LocalCheckpoints`` in a temp dir and ``ObjectCheckpoints``
in a new bucket of our own moto server (same CPUs) or of ``$AWS_ENDPOINT_URL`` (removed after).
A chunk: one epoch of ``train_epoch`` on the real training rows (``--quick``: 20 batches, scaled
to the epoch's) plus one validation pass, x ``chunk_epochs`` (2). Sides interleaved; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.engine.rows import TensorRows, epoch_order
from tasks.engine.training import Trainer, evaluate_model, train_epoch
from tasks.jobs.registry import get_job
from tasks.jobs.spec import Tensors
from tasks.orchestration.server import reserve_port
from tasks.storage.checkpoint import LocalCheckpoints
from tasks.storage.data import describe_data, ensure_split
from tasks.storage.remote import Remote
from tasks.storage.run import Run
from tasks.storage.store import ObjectCheckpoints

FEW_BATCHES = 20
RULE = 2.0  # percent: "If uploads cost more than 2% of a chunk, upload in the background"


def start_moto() -> subprocess.Popen | None:
    """Our own moto server on loopback, unless $AWS_ENDPOINT_URL names a store already."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        return None
    with reserve_port() as sock:
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        raise SystemExit("moto server did not start")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    return proc


def trainer_for(root: Path) -> Trainer:
    """The run's Trainer, prepared as the flow does, after 20 batches and one validation pass."""
    cfg = get_job("fashion_mnist").config(model="cnn", artifacts_dir=root)
    run = Run.of(cfg, describe_data(cfg))
    run.prepare()
    ensure_split(run)
    tr = Trainer(run)
    full, n = tr.train, FEW_BATCHES * cfg.batch_size
    tr.train = TensorRows(Tensors(full.x[:n], full.y[:n]), tr.device, tr.spec.prepare)
    tr.run_epoch(0)
    tr.next_epoch, tr.train = 1, full
    return tr


def chunk_seconds(tr: Trainer, rows: TensorRows, epoch: int) -> float:
    """``rows`` trained once, scaled to an epoch's batches, plus validation, x chunk_epochs."""
    cfg, t0 = tr.cfg, time.perf_counter()
    count = len(rows) // cfg.batch_size
    train_epoch(tr.step, rows.batches(epoch, epoch_order(cfg.seed, epoch, len(rows)), cfg.batch_size, 0, count))
    t1 = time.perf_counter()
    evaluate_model(tr.model, tr.loss_fn, tr.val, cfg.eval_batch_size, tr.spec, tr.step.autocast)
    t2 = time.perf_counter()
    return cfg.chunk_epochs * ((t1 - t0) * tr.steps_per_epoch / (len(rows) // cfg.batch_size) + t2 - t1)


def save_seconds(store: LocalCheckpoints | ObjectCheckpoints, tr: Trainer, chunk: int) -> float:
    """One checkpoint of the trainer's state, as ``Trainer.save`` writes it (without the prune)."""
    t0 = time.perf_counter()
    store.save(tr.state_dict(chunk))
    return time.perf_counter() - t0


def measure(a: argparse.Namespace, tmp: Path, bucket: str) -> dict[str, list[float]]:
    """Per side, each round's seconds; and the checkpoint's size in MB."""
    tr = trainer_for(tmp / "artifacts")
    n = FEW_BATCHES * tr.cfg.batch_size if a.quick else len(tr.train)
    rows = TensorRows(Tensors(tr.train.x[:n], tr.train.y[:n]), tr.device, tr.spec.prepare)
    stores = {"local": LocalCheckpoints(tmp / "local"), "s3": ObjectCheckpoints(Remote(f"s3://{bucket}/ckpt"))}
    for store in stores.values():  # warm-up: first writes, the s3fs session
        store.save(tr.state_dict(0))
    times: dict[str, list[float]] = {"local": [], "s3": [], "chunk": []}
    for r in range(1, a.rounds + 1):
        for side in [*times][r % 3:] + [*times][: r % 3]:
            times[side].append(chunk_seconds(tr, rows, r) if side == "chunk" else save_seconds(stores[side], tr, r))
    return {**times, "mb": [(tmp / "local" / "checkpoint-0.pt").stat().st_size / 1e6]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help=f"train {FEW_BATCHES} batches per round, not an epoch")
    a = p.parse_args()
    if not a.quick and a.rounds > 8:
        p.error("--rounds is at most 8 without --quick: the OneCycle schedule spans the job's 10 epochs")
    moto, bucket, fs = start_moto(), f"trainflow-bench-{uuid.uuid4().hex[:8]}", None
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(bucket)
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
            t = {k: statistics.median(v) for k, v in measure(a, Path(tmp), bucket).items()}
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()
        elif fs is not None and fs.exists(bucket):
            fs.rm(bucket, recursive=True)
    share = 100 * t["s3"] / t["chunk"]
    above = share > RULE
    print(f"fashion_mnist --model cnn, medians of {a.rounds} rounds{' (--quick)' if a.quick else ''}, S3 at "
          f"{os.environ['AWS_ENDPOINT_URL']}: checkpoint {t['mb']:.2f} MB; local save {t['local']:.3f} s, "
          f"S3 save {t['s3']:.3f} s; chunk training {t['chunk']:.1f} s")
    print(f"S3 / local: {t['s3'] / t['local']:.1f}x; S3 save / chunk: {share:.2f}% ({'above' if above else 'not above'} "
          f"the {RULE:g}% threshold: {'upload in the background' if above else 'uploads inline are fine'})")


if __name__ == "__main__":
    main()
