"""Chunk runners: what trains one chunk. One contract, :class:`ChunkRunner`, two
implementations: :class:`InProcess` (this process) and :class:`tasks.engine.distributed.Torchrun`
(N processes through torchrun and DDP). Both run the same protocol
(:func:`tasks.engine.training.train_chunk`) and return the same :class:`~tasks.storage.records.ChunkResult`.
A runner on a cluster engine is a third implementation of the same contract."""

from __future__ import annotations

from typing import Protocol

from tasks.engine.progress import ChunkProgress, Watchers
from tasks.engine.training import (
    GracefulStop,
    Trainer,
    log_chunk,
    stopped,
    train_chunk,
)
from tasks.kernel import TrainConfig
from tasks.storage.records import ChunkResult
from tasks.storage.run import Run


class ChunkRunner(Protocol):
    def run(self, run: Run, chunk: int, resumed: bool, watchers: Watchers, stop: GracefulStop) -> ChunkResult:
        """Train chunk ``chunk`` of ``run`` from its latest valid checkpoint and end by committing
        ``checkpoint-<chunk>``; a chunk already covered returns at once. ``resumed``: the
        checkpoint is an earlier attempt's (a new attempt, or a retry of this chunk); ``watchers``:
        who sees its progress; ``stop``: the attempt's stop request (SIGTERM, Ctrl-C): the chunk
        then checkpoints where it is, and its result says so (``stopped_by``)."""


class InProcess:
    """The chunk in this process. A signal stops it after the current batch, and the checkpoint
    then holds the state inside the epoch (a rerun continues that epoch exactly)."""

    def run(self, run: Run, chunk: int, resumed: bool, watchers: Watchers, stop: GracefulStop) -> ChunkResult:
        cfg, logger = run.cfg, watchers.logger
        with Trainer(run, logger) as trainer:  # reports skipped checkpoints, once

            def progress(start: int, end: int) -> ChunkProgress:
                return ChunkProgress(start, end, cfg.epochs, trainer.steps_per_epoch, cfg.batch_size, watchers,
                                     trainer.skip)

            result = train_chunk(trainer, chunk, resumed, stop, progress)
        log_chunk(logger, cfg, result)
        if stop.signum is None:
            return result
        return stopped(result, stop.signum, f"epoch {trainer.next_epoch}/{cfg.epochs}{trainer.inside()}", logger)


def runner_for(cfg: TrainConfig) -> ChunkRunner:
    """The runner the config asks for: torchrun's for ``--nproc-per-node`` > 1 (torch.distributed
    is imported only then), else this process."""
    if cfg.nproc_per_node > 1:
        from tasks.engine.distributed import Torchrun

        return Torchrun()
    return InProcess()
