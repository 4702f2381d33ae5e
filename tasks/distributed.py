"""``--nproc-per-node N``: each chunk trained by N processes, data-parallel, resumed exactly.

The ``train_chunk`` task stays the unit of retry. It runs PyTorch's elastic launcher, torchrun
with ``--standalone`` (one machine, a free local port for the rendezvous), in a thread
(:func:`run_ranks`); it starts N ranks of :func:`main` and waits for them; torchrun's other
options come from its ``PET_*`` environment variables (``PET_MAX_RESTARTS``, ...). A rank that
fails or dies stops the group (torchrun), the task fails, and Prefect's retry starts the whole
group again from the latest valid checkpoint.

Each rank builds the same :class:`~tasks.training.Trainer` from the same checkpoint, wraps the
model in ``DistributedDataParallel`` and trains on its contiguous share of every global batch of
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
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":
    gc.disable()  # until main(): no full collections among the imports' objects (flows/train_flow.py)
if __name__ == "__main__" and sys.platform.startswith("linux"):
    # A rank: SIGKILLed when its launcher dies (the command's torchrun thread, or a torchrun of
    # its own), from here on (before the seconds of imports below), and gone at once if the
    # launcher is gone already. A launcher stopped while it starts the ranks does not know them
    # all, and a rank left behind would wait for its rendezvous until it times out.
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.environ.get("TRAINFLOW_LAUNCHER_PID", str(os.getppid())) != str(os.getppid()):  # see run_ranks
        sys.exit(1)

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tasks.checkpoint import capture_rng, restore_rng
from tasks.history import HISTORY_FILE, write_history_csv
from tasks.jobs.spec import TrainConfig, UserError
from tasks.progress import ChunkProgress
from tasks.training import (
    GracefulStop,
    StopRequested,
    Trainer,
    chunk_base,
    chunk_end,
    chunk_outcome,
    epoch_order,
    log_chunk,
    train_epoch,
)

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


class RankTrainer(Trainer):
    """One rank's trainer: the model in DDP, this rank's share of each batch, rank 0 saves."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, fingerprint: str, stop_file: Path):
        self.rank, self.world, self.stop_file = dist.get_rank(), dist.get_world_size(), stop_file
        super().__init__(cfg, run_dir, fingerprint)
        if self.resumed_from is None:  # own dropout masks per rank, after the shared init
            torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (self.rank + 1))
        device_ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None  # LOCAL_RANK's GPU
        # Buffers (BatchNorm's running statistics) are averaged once per epoch (fit), not
        # broadcast before every forward: a collective per step less (~15 % of a small_cnn step here).
        self.net = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        super().load_state_dict(ckpt)
        restore_rng(ckpt["rng_ranks"][self.rank])

    def state_dict(self, chunk: int) -> dict[str, Any]:
        """The usual payload, with every rank's RNG state (a collective: every rank calls it)."""
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, capture_rng())
        return {**super().state_dict(chunk), "rng_ranks": states, "world_size": self.world}

    def fit(self, epoch: int, on_batch: Any = None) -> float:
        """This rank's share of every batch through DDP; the mean batch loss over all ranks."""
        assert not self.skip, "data-parallel chunks stop at epoch ends only"
        order = shard(epoch_order(self.cfg.seed, epoch, len(self.train)), self.cfg.batch_size, self.rank, self.world)
        cost = train_epoch(self.net, self.optimizer, self.scheduler, self.loss_fn, self.train, order,
                           self.cfg.batch_size // self.world, self.spec.prepare)
        for buffer in self.model.buffers():  # each rank's running statistics -> their mean, on every rank
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world
        total = torch.tensor([cost], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.world

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks get the same answer."""
        flag = torch.tensor([int(self.stop_file.exists())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def train_until(self, end: int, stop: Any = None, progress: Any = None) -> None:
        start = self.next_epoch
        self.tell(start, end, math.nan)
        for epoch in range(start, end):
            row = self.run_epoch(epoch)
            self.next_epoch = epoch + 1
            self.tell(start, end, row["train_loss"])
            if self.stop_agreed() or self.stopped_early:
                return

    def tell(self, start: int, end: int, loss: float) -> None:
        """Rank 0: where the chunk is, for the launching process to show (:class:`Watch`)."""
        if self.rank == 0:
            state = {"start": start, "end": end, "steps": self.steps_per_epoch, "done": self.next_epoch, "loss": loss}
            tmp = self.stop_file.with_name("progress.tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.stop_file.with_name("progress.json"))

    def save(self, chunk: int) -> Any:
        payload = self.state_dict(chunk)
        if self.rank != 0:
            return None
        name = self.checkpoints.save(payload)
        self.checkpoints.prune(self.cfg.keep_last, self.history.get(self.monitor, []), self.higher_is_better)
        return name


# --- one rank (python -m tasks.distributed <folder>, started by torchrun) ----------------------


def rank_chunk(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Train the chunk on this rank; rank 0's result is the chunk's."""
    cfg = TrainConfig.model_validate(spec["config"])
    trainer = RankTrainer(cfg, Path(spec["run_dir"]), spec["fingerprint"], folder / "stop")
    chunk, start = spec["chunk"], trainer.next_epoch
    base = chunk_base(trainer, chunk, spec["resumed"])
    if start >= chunk_end(cfg, chunk) or trainer.finished:
        return {**base, "skipped": True, "epoch": start}
    if cfg.compile:
        trainer.model.compile()
    t0 = time.perf_counter()
    trainer.train_until(chunk_end(cfg, chunk))
    seconds = time.perf_counter() - t0
    path = trainer.save(chunk)
    if trainer.rank != 0:
        return {}
    write_history_csv(Path(spec["run_dir"]) / HISTORY_FILE, trainer.history)
    return chunk_outcome(base, trainer, start, seconds, path)


def main(argv: list[str] | None = None) -> int:
    """A rank: join the group, train the chunk, rank 0 writes ``result.json`` (also for bad input)."""
    if not gc.isenabled():  # started as a rank: the modules imported so far live until its exit
        gc.freeze()
        gc.enable()
    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    spec = json.loads((folder / "spec.json").read_text())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cfg = TrainConfig.model_validate(spec["config"])
    if backend(cfg) == "nccl":
        torch.cuda.set_device(local)  # one GPU per process
    dist.init_process_group(backend(cfg), timeout=COLLECTIVE_TIMEOUT)
    try:
        result: dict[str, Any] = rank_chunk(spec, folder)
    except UserError as exc:  # e.g. the loss diverged: the same on every rank, and never retried
        result = {"error": str(exc)}
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        (folder / "result.tmp").write_text(json.dumps(result))
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
    one process does it (tasks/progress.py), at each epoch's end."""

    def __init__(self, cfg: TrainConfig, folder: Path, logger: Any, report: Callable[[float, str], None] | None):
        self.cfg, self.file, self.log, self.report = cfg, folder / "progress.json", logger, report
        self.seen, self.progress = "", None

    def poll(self) -> None:
        text = self.file.read_text() if self.file.exists() else self.seen
        if text == self.seen:
            return
        self.seen, state = text, json.loads(text)
        if self.progress is None:
            self.progress = ChunkProgress(state["start"], state["end"], self.cfg.epochs, state["steps"],
                                          self.cfg.batch_size, self.log, self.report).__enter__()
        if state["done"] > state["start"]:
            self.progress.epoch_done(state["done"] - 1, state["loss"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.__exit__()


def run_ranks(cfg: TrainConfig, folder: Path, stop: GracefulStop, watch: Watch) -> tuple[bool, str]:
    """torchrun's own entry point (``torch.distributed.run.main``, what ``python -m
    torch.distributed.run`` calls) in a thread of this process, which has torch imported already
    (a torchrun process cost ~1.5 s to start and ~0.5 s to exit, per chunk). A stop request is
    passed on through ``folder/stop``, progress comes back through ``watch``. Returns whether every
    rank succeeded, and the launcher's log and the ranks' output (``--redirects``: ``folder/logs``)."""
    from torch.distributed.run import main as torchrun

    args = [*launcher_args(cfg), "--redirects", "3", "--log-dir", str(folder / "logs"),
            "-m", "tasks.distributed", str(folder)]
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


def chunk_spec(cfg: TrainConfig, run_dir: Path, fingerprint: str, chunk: int, resumed: bool) -> dict[str, Any]:
    """What every rank of a chunk reads (``spec.json``): the same on every machine."""
    return {"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "fingerprint": fingerprint,
            "chunk": chunk, "resumed": resumed}


def launch_chunk(cfg: TrainConfig, run_dir: Path, fingerprint: str, chunk: int, logger: Any, resumed: bool,
                 report: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Train chunk ``chunk`` with ``cfg.nproc_per_node`` processes; its result, as one process's."""
    logger.info("chunk %d: %d processes (torch.distributed, %s)", chunk, cfg.nproc_per_node, backend(cfg))
    spec = chunk_spec(cfg, run_dir, fingerprint, chunk, resumed)
    with tempfile.TemporaryDirectory(prefix="trainflow-ranks-") as tmp, GracefulStop("at the end of this epoch") as stop:
        folder = Path(tmp)
        (folder / "spec.json").write_text(json.dumps(spec))
        ok, output = run_ranks(cfg, folder, stop, Watch(cfg, folder, logger, report))
        done = folder / "result.json"
        result = json.loads(done.read_text()) if done.exists() else None
    if result is not None and "error" in result:
        raise UserError(result["error"])
    if not ok or result is None:
        logger.error("the %d processes of chunk %d failed: %s", cfg.nproc_per_node, chunk, failures(output))
        raise RuntimeError(f"chunk {chunk}: a process of the group failed")
    if result.get("resumed_from"):
        logger.info("chunk %d: resumed from %s", chunk, result["resumed_from"])
    if not result["skipped"]:
        log_chunk(logger, cfg, result)
    if stop.signum is not None:
        message = (f"{signal.Signals(stop.signum).name}: saved {result['checkpoint']} at epoch "
                   f"{result['end_epoch']}/{cfg.epochs}; rerun the same command to resume from there")
        logger.warning(message)
        raise StopRequested(stop.signum, message)
    return result


if __name__ == "__main__":
    status = main()
    # As flows/train_flow.py: the exit-time collections skip what is alive now (torch's modules),
    # ~0.6 s of each rank's exit, which every chunk waits for. The collection first is needed: a
    # rank that froze its garbage (DDP's and the process group's objects) died of SIGABRT at exit
    # now and then ("terminate called without an active exception").
    gc.collect()
    gc.freeze()
    sys.exit(status)
