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


def test_with_several_processes_the_launcher_shows_progress_inside_an_epoch(tmp_path) -> None:
    """Rank 0 tells where it is inside an epoch too (not only at its end), and the launching
    process shows it as one process does: the first epoch is not silent."""
    from tasks.engine.distributed import Tell, Watch
    from tasks.jobs.registry import JOBS

    logger = mock.Mock()
    tell = Tell(tmp_path, start=0, end=1, steps=100, rank=0).__enter__()
    watch = Watch(JOBS["nonlinear"].config(epochs=1, chunk_epochs=1), tmp_path, Watchers(logger))
    watch.poll()  # the chunk began
    watch.progress.next_tick = watch.progress.next_log = 0.0  # show at the next report
    tell.batch(40, torch.tensor(4.0))
    watch.poll()
    line = logger.info.call_args.args[1] + " " + logger.info.call_args.args[2]
    assert "train loss 0.1" in line, line  # the loss of the 40 batches so far
