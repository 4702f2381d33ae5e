"""The job of benchmarks/streaming.py: synthetic samples of 16 KiB (``bin``: random bytes, ``cls``:
a class) in shards, a linear model on 64 means of 256 bytes each. Its loss of a batch is cheap, so
that one epoch measures the loading. Its step also tells the benchmark when it first ran in a
process (``$STREAM_FIRST_STEP``: that file gets the time) and stops the run on request
(``$STREAM_STOP_AT``: SIGTERM to itself after that many steps, so a checkpoint lands there)."""

import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from tasks.jobs.shards import Shards
from tasks.jobs.spec import JobData, JobSpec

SAMPLE_BYTES = 16 * 1024


def decode(sample):
    return torch.frombuffer(bytearray(sample["bin"]), dtype=torch.uint8), torch.tensor(int(sample["cls"]))


def load(path) -> JobData:
    pool = Shards(path, decode)
    return JobData(pool=pool, fingerprint=pool.fingerprint, source=str(path))


class Step:
    """Cross-entropy of a batch, and the benchmark's two clocks (module docstring)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if not model.training:  # the command's check of the job, or an evaluation
            return nn.functional.cross_entropy(model(x), y)
        self.calls += 1
        if self.calls == 1 and os.environ.get("STREAM_FIRST_STEP"):
            Path(os.environ["STREAM_FIRST_STEP"]).write_text(repr(time.time()))
        if str(self.calls) == os.environ.get("STREAM_STOP_AT"):
            os.kill(os.getpid(), signal.SIGTERM)  # the run stops after this batch, with a checkpoint
        return nn.functional.cross_entropy(model(x), y)


JOB = JobSpec(
    name="streaming",
    description="synthetic 16 KiB samples in shards: a linear model (benchmarks/streaming.py)",
    defaults=dict(data="/tmp/trainflow-streaming/1x", epochs=1, chunk_epochs=1, lr=0.1, batch_size=256,
                  eval_batch_size=256),
    load=load,
    build_model=lambda cfg: nn.Linear(64, 10),
    loss=lambda cfg: nn.CrossEntropyLoss(),
    split_sizes=lambda n: (n, 0, 0),  # every sample trains: the epoch is the measure
    prepare=lambda x: x.view(len(x), 64, -1).float().mean(2),  # uint8 [B, 16384] -> [B, 64]
    step=Step(),
    streams=True,
)
