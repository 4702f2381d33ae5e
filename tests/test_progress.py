"""Progress inside a chunk: its pace counts only the batches this chunk trained."""

from __future__ import annotations

from unittest import mock

import torch

from tasks.engine.progress import ChunkProgress, Watchers


def test_after_a_resume_inside_an_epoch_the_rate_counts_only_the_batches_trained_since() -> None:
    logger = mock.Mock()
    # Resumed at batch 90 of 100 in epoch 1 of 1: 10 batches left.
    progress = ChunkProgress(0, 1, 1, steps=100, batch_size=1, watchers=Watchers(logger), skip=90)
    progress.next_log = 0.0  # log at the next tick
    progress.tick(progress.t0 + 2.0, done=95, loss_sum=torch.tensor(9.5))  # 5 batches in 2 s
    line = logger.info.call_args.args[2]
    assert line.startswith("ETA 2s,"), line  # 2.5 batches/s: the 5 batches left take 2 s
