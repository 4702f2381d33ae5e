"""``--nproc-per-node N``: each chunk trained by N processes, data-parallel, resumed exactly.

The ``train_chunk`` task stays the unit of retry. It runs PyTorch's elastic launcher, torchrun
with ``--standalone`` (one machine, a free local port for the rendezvous), in a thread
(:class:`Torchrun`, a :class:`~tasks.engine.runners.ChunkRunner`); it starts N ranks of :func:`main` and waits for them; torchrun's other
options come from its ``PET_*`` environment variables (``PET_MAX_RESTARTS``, ...). A rank that
fails or dies stops the group (torchrun), the task fails, and Prefect's retry starts the whole
group again from the latest valid checkpoint.

Each rank builds the same :class:`~tasks.engine.training.Trainer` from the same checkpoint, with the
:class:`DataParallel` strategy: the model in ``DistributedDataParallel``, and each rank trains on its contiguous share of every global batch of
the epoch's ``(seed, epoch)`` order, so an epoch's samples and batches do not depend on N: DDP
averages the gradients of the N equal shares, i.e. the gradient of the global batch's mean loss.
What does depend on N: the floats (the order of the additions), and dropout (each rank draws its
own masks, and its RNG state is saved). So N is part of the run's identity. Every rank validates
the whole validation set (identical models give identical metrics, and early stopping agrees
without a message). Rank 0 alone writes checkpoints, in the usual format, with every rank's RNG
state (``rng_ranks``); the model is replicated, so rank 0 holds all of it (no sharded
checkpoint, ``torch.distributed.checkpoint``, is needed).

A stop (SIGTERM, Ctrl-C) reaches the launching process only (each rank runs in its own session):
it asks the ranks through a file, and they agree at the end of the current epoch (an
``all_reduce``), save a checkpoint and exit; the command then exits 143 / 130.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def become_rank() -> None:
    """The first thing a rank does (``python -m tasks.engine.distributed``), before its imports: no
    full garbage collections among the imports' objects (as flows/train_flow.py), and on Linux
    be SIGKILLed when its launcher dies (the command's torchrun thread, or a torchrun of its
    own), gone at once if the launcher is gone already: a launcher stopped while it starts the
    ranks does not know them all, and a rank left behind would wait for its rendezvous."""
    gc.disable()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.environ.get("TRAINFLOW_LAUNCHER_PID", str(os.getppid())) != str(os.getppid()):  # see run_ranks
            sys.exit(1)


if __name__ == "__main__":
    become_rank()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from tasks.engine.progress import TICK, ChunkProgress, Watchers  # noqa: E402
from tasks.engine.training import (  # noqa: E402
    GracefulStop,
    Trainer,
    log_chunk,
    stopped,
    train_chunk,
)
from tasks.kernel import TrainConfig, UserError  # noqa: E402
from tasks.storage.checkpoint import capture_rng, restore_rng  # noqa: E402
from tasks.storage.records import ChunkResult  # noqa: E402
from tasks.storage.run import Run, RunSpec  # noqa: E402

#: A collective that waits longer than this (a rank died without torchrun noticing) fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
POLL_S = 0.2


def backend(cfg: TrainConfig) -> str:
    if cfg.dist_backend != "auto":
        return cfg.dist_backend
    return "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"


def shard(order: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of an epoch's ``order``: the ``rank``-th contiguous ``batch_size / world``
    rows of every full global batch, in batch order (a trailing partial batch is dropped, as
    with one process)."""
    batches = len(order) // batch_size
    per = batch_size // world
    return order[: batches * batch_size].view(batches, world, per)[:, rank].reshape(-1)  # [batches * per]


class DataParallel:
    """The Trainer's strategy for one rank of N (:class:`tasks.engine.training.SingleProcess`'s twin):
    the model in DDP, this rank's share of each global batch, buffers and loss averaged at each
    epoch's end, every rank's RNG state in the checkpoint, rank 0 writes."""

    stops_inside_epoch = False  # the ranks agree on a stop at an epoch's end (one all_reduce)

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writes = self.rank == 0

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None  # LOCAL_RANK's GPU
        # Buffers (BatchNorm's running statistics) are averaged once per epoch (epoch_cost), not
        # broadcast before every forward: one collective per step less.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed * 1_000_003 + 7919 * (self.rank + 1))  # own dropout masks, after the shared init

    def share(self, order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        return shard(order, batch_size, self.rank, self.world), batch_size // self.world

    def epoch_cost(self, model: torch.nn.Module, cost: float) -> float:
        for buffer in model.buffers():  # each rank's running statistics -> their mean, on every rank
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world
        total = torch.tensor([cost], dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(total)
        return float(total) / self.world

    def agree(self, flag: bool) -> bool:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        agreed = torch.tensor([int(flag)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's RNG state (a collective: every rank calls it)."""
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, capture_rng())
        return {"rng_ranks": states, "world_size": self.world}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        restore_rng(ckpt["rng_ranks"][self.rank])


# --- one rank (python -m tasks.engine.distributed <folder>, started by torchrun) ----------------------


class FileStop:
    """A stop request from the launcher: the file ``stop`` in the chunk's folder."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def requested(self) -> bool:
        return self.path.exists()


class Tell:
    """Rank 0's progress for the launcher (``progress.json``: at each epoch's end, and inside an
    epoch every ``TICK`` seconds), which shows it the way one process does (:class:`Watch`).
    Other ranks tell nothing."""

    def __init__(self, folder: Path, start: int, end: int, steps: int, rank: int):
        self.file, self.rank, self.next = folder / "progress.json", rank, 0.0
        self.state = {"start": start, "end": end, "steps": steps, "done": start, "loss": float("nan"),
                      "batch": 0, "loss_sum": 0.0}

    def write(self) -> None:
        if self.rank == 0:
            tmp = self.file.with_name("progress.tmp")
            tmp.write_text(json.dumps(self.state))
            tmp.replace(self.file)

    def __enter__(self) -> Tell:
        self.write()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def batch(self, done: int, loss_sum: torch.Tensor) -> None:
        if self.rank == 0 and time.monotonic() >= self.next:
            self.next = time.monotonic() + TICK
            self.state.update(batch=done, loss_sum=float(loss_sum))
            self.write()

    def epoch_done(self, epoch: int, train_loss: float) -> None:
        self.state.update(done=epoch + 1, loss=train_loss, batch=0, loss_sum=0.0)
        self.write()


def rank_chunk(job: ChunkJob, folder: Path) -> ChunkResult:
    """Train the chunk on this rank; rank 0's result is the chunk's."""
    with Trainer(Run.attach(job.run), parallel=DataParallel()) as trainer:
        rank = trainer.parallel.rank
        return train_chunk(trainer, job.chunk, job.resumed, FileStop(folder / "stop"),
                           lambda start, end: Tell(folder, start, end, trainer.steps_per_epoch, rank))


def main(argv: list[str] | None = None) -> int:
    """A rank: join the group, train the chunk, rank 0 writes ``result.json`` (also for bad input)."""
    if not gc.isenabled():  # started as a rank: the modules imported so far live until its exit
        gc.freeze()
        gc.enable()
    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    job = ChunkJob.model_validate_json((folder / "spec.json").read_text())
    cfg = TrainConfig.model_validate(job.run.config)
    if backend(cfg) == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    dist.init_process_group(backend(cfg), timeout=COLLECTIVE_TIMEOUT)
    try:
        outcome = RankOutcome(result=rank_chunk(job, folder))
    except UserError as exc:  # e.g. the loss diverged: the same on every rank, and never retried
        outcome = RankOutcome(error=str(exc))
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        (folder / "result.tmp").write_text(outcome.model_dump_json())
        (folder / "result.tmp").replace(folder / "result.json")
    return 0


# --- the launching process (inside the train_chunk task) ---------------------------------------
def launcher_args(cfg: TrainConfig) -> list[str]:
    """torchrun's options that trainflow sets; the rest come from its PET_* variables.
    ``--standalone``: one machine, and a free local port for the rendezvous at every launch, so
    a port in use (torchrun's default 29500, another run's) never stops a chunk."""
    return ["--standalone", "--nproc-per-node", str(cfg.nproc_per_node)]


class Watch:
    """The chunk's progress as rank 0 tells it (``progress.json``), drawn and reported the way
    one process does it (tasks/engine/progress.py), at each epoch's end."""

    def __init__(self, cfg: TrainConfig, folder: Path, watchers: Watchers):
        self.cfg, self.file, self.watchers = cfg, folder / "progress.json", watchers
        self.seen, self.progress, self.done = "", None, 0

    def poll(self) -> None:
        text = self.file.read_text() if self.file.exists() else self.seen
        if text == self.seen:
            return
        self.seen, state = text, json.loads(text)
        if self.progress is None:
            self.progress = ChunkProgress(state["start"], state["end"], self.cfg.epochs, state["steps"],
                                          self.cfg.batch_size, self.watchers).__enter__()
            self.done = state["start"]
        if state["done"] > self.done:
            self.done = state["done"]
            self.progress.epoch_done(state["done"] - 1, state["loss"])
        if state["batch"]:
            self.progress.batch(state["batch"], torch.tensor(state["loss_sum"]))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.__exit__()


def run_ranks(cfg: TrainConfig, folder: Path, stop: GracefulStop, watch: Watch) -> tuple[bool, str]:
    """torchrun's own entry point (``torch.distributed.run.main``, what ``python -m
    torch.distributed.run`` calls) in a thread of this process, which has torch imported already
    (a torchrun process of its own would start and exit for every chunk). A stop request is
    passed on through ``folder/stop``, progress comes back through ``watch``. Returns whether every
    rank succeeded, and the launcher's log and the ranks' output (``--redirects``: ``folder/logs``)."""
    from torch.distributed.run import main as torchrun

    args = [*launcher_args(cfg), "--redirects", "3", "--log-dir", str(folder / "logs"),
            "-m", "tasks.engine.distributed", str(folder)]
    failed: list[BaseException] = []

    def launch() -> None:
        try:
            torchrun(args)
        except BaseException as exc:  # noqa: BLE001 - a rank failed (ChildFailedError), or the launch did
            failed.append(exc)

    # In a thread that is not the main one, the launcher leaves this process's signal handlers
    # alone (GracefulStop's); the ranks run in their own sessions, so a terminal's Ctrl-C reaches
    # this process only. Each rank dies with this process (see the top of this file).
    with launcher_environment(cfg, folder / "launcher.log"):
        thread = threading.Thread(target=launch, name="torchrun", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                if stop.signum is not None and not (folder / "stop").exists():
                    (folder / "stop").touch()
                watch.poll()
                thread.join(POLL_S)
        finally:
            watch.close()
    logs = sorted((folder / "logs").glob("**/std*.log"))
    output = "\n".join(f.read_text(errors="replace") for f in [folder / "launcher.log", *logs] if f.exists())
    return not failed, output + "".join(f"\n{type(e).__name__}: {e}" for e in failed)


@contextlib.contextmanager
def launcher_environment(cfg: TrainConfig, log_file: Path) -> Iterator[None]:
    """What the ranks inherit (this process's environment, which the launcher copies): the
    import path (a user's job module too), this process's pid (a rank checks that its launcher
    is alive) and the run's threads per process. The launcher's log goes to ``log_file``."""
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "TRAINFLOW_LAUNCHER_PID", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    os.environ["TRAINFLOW_LAUNCHER_PID"] = str(os.getpid())
    os.environ["OMP_NUM_THREADS"] = str(cfg.thread_count())  # else torchrun sets 1, with a warning
    handler = logging.FileHandler(log_file)
    loggers = [logging.getLogger(name) for name in ("torch.distributed.run", "torch.distributed.elastic")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.propagate = True
        handler.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def failures(output: str) -> str:
    """What went wrong in a failed group: each rank's exception line (torchrun prefixes a rank's
    output with ``[rankN]:``), else the end of the output."""
    raised = [line for line in output.splitlines() if re.match(r"\[rank\d+\]: \w+(Error|Exception|Interrupt)\b", line)]
    return "; ".join(raised) if raised else "\n" + "\n".join(output.strip().splitlines()[-30:])


class ChunkJob(BaseModel):
    """What every rank of a chunk reads (``spec.json``): the same on every machine."""

    run: RunSpec
    chunk: int
    resumed: bool


class RankOutcome(BaseModel):
    """What rank 0 leaves in ``result.json``: the chunk's result, or the bad input it met."""

    result: ChunkResult | None = None
    error: str | None = None


class Torchrun:
    """The chunk on ``cfg.nproc_per_node`` processes (a :class:`~tasks.engine.runners.ChunkRunner`):
    torchrun's launcher in a thread of this process, the ranks in their own sessions. A stop
    request (SIGTERM, Ctrl-C) is passed to the ranks, which checkpoint at the epoch's end."""

    def run(self, run: Run, chunk: int, resumed: bool, watchers: Watchers, stop: GracefulStop) -> ChunkResult:
        cfg, logger = run.cfg, watchers.logger
        logger.info("chunk %d: %d processes (torch.distributed, %s)", chunk, cfg.nproc_per_node, backend(cfg))
        job = ChunkJob(run=run.spec(), chunk=chunk, resumed=resumed)
        # In the run's own folder (hidden), not the temp directory: a killed command's leftovers
        # are cleared by the run's next chunk, on whatever machine.
        folder = run.dir / ".ranks"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            (folder / "spec.json").write_text(job.model_dump_json())
            ok, output = run_ranks(cfg, folder, stop, Watch(cfg, folder, watchers))
            done = folder / "result.json"
            outcome = RankOutcome.model_validate_json(done.read_text()) if done.exists() else None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if outcome is not None and outcome.error is not None:
            raise UserError(outcome.error)
        if not ok or outcome is None or outcome.result is None:
            logger.error("the %d processes of chunk %d failed: %s", cfg.nproc_per_node, chunk, failures(output))
            raise RuntimeError(f"chunk {chunk}: a process of the group failed")
        result = outcome.result
        if result.resumed_from:
            logger.info("chunk %d: resumed from %s", chunk, result.resumed_from)
        log_chunk(logger, cfg, result)
        if stop.signum is None:
            return result
        return stopped(result, stop.signum, f"epoch {result.end_epoch}/{cfg.epochs}", logger)


if __name__ == "__main__":
    status = main()
    # As flows/train_flow.py: the exit-time collections skip what is alive now (torch's modules),
    # which every chunk waits for. The collection first is needed: a rank that froze its garbage
    # (DDP's and the process group's objects) died of SIGABRT at exit now and then
    # ("terminate called without an active exception").
    gc.collect()
    gc.freeze()
    sys.exit(status)
