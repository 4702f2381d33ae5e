"""The FashionMNIST shards job, with what the streaming tests observe: each sample it decodes is
logged to ``$SHARD_LOG`` when that is set (one line: its shard, its key, the seed trainflow gave
torch's generator for it, which tells the epoch, the rank and the process), after
``$SHARD_DELAY`` seconds (a slower loader, so that a signal lands inside an epoch). The floats are
the job's own."""

import os
import time
from dataclasses import replace

import torch

from tasks.jobs import fashion_shards


def decode(sample):
    time.sleep(float(os.environ.get("SHARD_DELAY", "0")))
    if os.environ.get("SHARD_LOG"):
        with open(os.environ["SHARD_LOG"], "a") as log:  # one short write: whole lines from every process
            log.write(f"{sample['__url__']} {sample['__key__']} {torch.initial_seed()} {os.environ.get('RANK', '-')} "
                      f"{os.getpid()}\n")
    return fashion_shards.decode(sample)


JOB = replace(fashion_shards.JOB, load=lambda path: fashion_shards.load(path, decode))
