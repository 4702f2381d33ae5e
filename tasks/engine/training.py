"""The generic, resumable training loop. Knows nothing about any particular job."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from tasks.engine.rows import Rows, TensorRows, head, release_frames, rows_of
from tasks.jobs.registry import get_job
from tasks.jobs.spec import JobData, JobSpec
from tasks.kernel import TrainConfig, UserError, saved_traceback
from tasks.storage.checkpoint import capture_rng, restore_rng
from tasks.storage.data import load_job_data, read_split
from tasks.storage.history import HISTORY_FILE, duration, eta_seconds, write_history_csv
from tasks.storage.records import ChunkResult
from tasks.storage.run import Run

log = logging.getLogger("trainflow.training")


class DivergedError(UserError):
    """The loss became NaN/inf: deterministic, so retrying would only fail again."""


class StopRequested(KeyboardInterrupt):
    """SIGTERM/SIGINT arrived; a checkpoint was saved after the current batch.
    Not an Exception, so Prefect records a crash and does not retry; a KeyboardInterrupt, so
    Prefect calls it "aborted by an interrupt signal", not an "unexpected exception"."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class GracefulStop:
    """While active (main thread only), SIGTERM and SIGINT (Ctrl-C) only set ``signum``, and the
    run stops at its next safe point: after the current batch, with a checkpoint (inside the
    epoch: the batches done and their loss sum go into it, so the rerun continues that epoch
    exactly; several processes stop at the epoch's end), or before its next step (:meth:`check`).
    It is active for a whole attempt, so a signal between two chunks is not lost. A second signal
    goes to the handler that was there before (Prefect's, or Python's KeyboardInterrupt): stop
    at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            previous = self.previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping at the next checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def check(self, where: str) -> None:
        """Raise StopRequested if a stop was asked for: the run stops ``where`` (a safe point)."""
        if self.signum is not None:
            raise StopRequested(self.signum, f"{signal.Signals(self.signum).name}: stopped {where}; "
                                             f"rerun the same command to resume from there")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous.clear()


def resolve_device(cfg: TrainConfig) -> torch.device:
    """CUDA when available (the tutorial's rule) unless the config pins a device."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@functools.cache  # process-wide settings: once is enough
def deterministic_cuda() -> None:
    """Make CUDA training repeatable bit for bit, so that a resumed run ends exactly where an
    uninterrupted one would (on an H200, two identical CNN runs differed by up to 7e-3 after 3
    epochs without these settings and were identical with them): deterministic cuDNN algorithms
    without autotuning, a fixed cuBLAS workspace, and PyTorch's deterministic kernel wherever an
    op has one (an op without one still runs, with a warning naming it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup_torch(cfg: TrainConfig) -> torch.device:
    """Apply the thread count (CPU) and, on CUDA, deterministic kernels; return the device."""
    torch.set_num_threads(cfg.thread_count())
    device = resolve_device(cfg)
    if device.type == "cuda":
        deterministic_cuda()
    return device


def chunk_count(cfg: TrainConfig) -> int:
    """How many checkpointed chunks the run has."""
    return -(-cfg.epochs // cfg.chunk_epochs)  # ceil, in integers (exact for any size)


def chunk_end(cfg: TrainConfig, chunk: int) -> int:
    """Exclusive end epoch of chunk ``chunk`` (1-based): it covers epochs up to this one."""
    return min(chunk * cfg.chunk_epochs, cfg.epochs)


def likely_cause(cfg: TrainConfig) -> str:
    """Advice for a diverged run, naming the option most likely at fault: each step scales the
    weights by (1 - lr * weight_decay), which flips and grows them once that product reaches 1."""
    if cfg.weight_decay * cfg.lr >= 1:
        return f"lower --weight-decay (now {cfg.weight_decay}; lr x weight decay must stay well below 1)"
    return f"lower --lr (now {cfg.lr})"


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by the config."""
    # On the CPU, the per-parameter loop is what torch.optim picks by itself; naming it skips that
    # choice on every step, which the regression jobs' tiny steps notice.
    foreach = None if next(model.parameters()).is_cuda else False
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, foreach=foreach)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-batch LR schedule (None for a constant LR)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


class EpochStopped(Exception):
    """``on_batch`` asked to stop inside an epoch: after ``done`` batches, whose losses sum to ``total``."""

    def __init__(self, done: int, total: torch.Tensor):
        super().__init__(f"stopped after batch {done}")
        self.done, self.total = done, total


def textbook_loss(loss_fn: nn.Module) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The default loss of a batch ``(x, y)``: ``loss_fn(model(x), y)``."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return loss_fn(model(x), y)

    return loss


class Step:
    """The textbook step (pytorch/examples' mnist/main.py: zero_grad, forward and loss, backward,
    optimizer step, then the scheduler's) with what ``--precision``, ``--grad-accum`` and
    ``--clip-grad-norm`` add: the forward under ``torch.autocast``, the backward of each of the
    K batches of one step scaled by 1/K (and by fp16's GradScaler), and clipping before the step."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 loss: Callable[[nn.Module, Any], torch.Tensor], device: torch.device):
        self.model, self.optimizer, self.scheduler, self.loss = model, optimizer, scheduler, loss
        self.clip, self.device = cfg.clip_grad_norm, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def __call__(self, group: list[Any]) -> list[torch.Tensor]:
        """One optimizer step over the batches of ``group``; their losses (detached)."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, batch in enumerate(group):
            with self.accumulating(i < len(group) - 1), self.autocast():
                loss = self.loss(self.model, batch)
            self.scaler.scale(loss / len(group) if len(group) > 1 else loss).backward()
            losses.append(loss.detach())
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return losses

    def autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.dtype)

    def accumulating(self, more: bool) -> Any:
        """DDP's ``no_sync`` while more batches of the step follow: gradients are averaged once per step."""
        return self.model.no_sync() if more and hasattr(self.model, "no_sync") else contextlib.nullcontext()


def train_epoch(step: Step, batches: Iterator[Any], accum: int = 1,
                on_batch: Callable[[int, torch.Tensor], bool | None] | None = None,
                start: int = 0, total: torch.Tensor | None = None) -> float:
    """One epoch: a :class:`Step` per ``accum`` batches of ``batches`` (the epoch's batches from
    batch ``start`` on, full batches only). Returns the mean batch loss (the tutorial's ``cost``).

    ``on_batch(done, loss_sum)``, the loop's one extension point, runs after each step with the
    batches done this epoch and the sum of their losses (a device tensor: reading it syncs); if
    it returns True, the epoch stops there with :class:`EpochStopped`. ``start`` and ``total``
    continue an epoch stopped that way: its batches done, and their loss sum."""
    step.model.train()
    # The sum stays on the device (no sync per batch); float64, so the order of the additions
    # is the only thing that decides it.
    total = torch.zeros((), dtype=torch.float64, device=step.device) if total is None else total.clone()
    done, group = start, []
    with contextlib.closing(batches):  # an epoch cut short lets go of its loader at once
        for batch in batches:
            group.append(batch)
            if len(group) < accum:
                continue
            for loss in step(group):
                total += loss
            done, group = done + len(group), []
            if on_batch is not None and on_batch(done, total):
                raise EpochStopped(done, total)
    return float(total) / done


SMALL_EVAL_ELEMENTS = 1 << 16


def batch_rows(batch: Any) -> int:
    """How many rows a batch holds (its first tensor's length)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
    return len(first)


@torch.no_grad()
def evaluate_model(model: nn.Module, loss_fn: nn.Module, rows: Rows, batch_size: int, spec: JobSpec,
                   autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Loss (sample-weighted mean over all rows) and the job's metrics on ``rows`` (the loss
    only, for a job with its own ``step``)."""
    if len(rows) == 0:
        return {}
    if isinstance(rows, TensorRows) and rows.x.numel() <= SMALL_EVAL_ELEMENTS:
        # Small sets (the regression jobs validate every epoch) go through in one forward pass:
        # the sample-weighted mean is the same, and it saves thousands of tiny calls per run.
        batch_size = len(rows)
    model.eval()
    outputs, targets, loss_sum = [], [], 0.0
    with contextlib.closing(rows.in_order(batch_size)) as batches:
        for batch in batches:
            with autocast():
                if spec.step is not None:
                    loss_sum += float(spec.step(model, batch)) * batch_rows(batch)
                    continue
                x, y = batch
                out = model(x)
                loss_sum += float(loss_fn(out, y)) * len(y)
            outputs.append(out)
            targets.append(y)
    metrics = spec.metrics(torch.cat(outputs), torch.cat(targets)) if outputs else {}
    return {"loss": loss_sum / len(rows), **metrics}


#: Losses that broadcast an output against a target of another shape, with only a warning.
BROADCASTING_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)


@torch.no_grad()
def check_job(cfg: TrainConfig, data: JobData) -> None:
    """Before anything trains: the job's model takes two rows of its data and its loss takes the
    output, with the targets' shape where the loss would broadcast. What fails here would fail
    the same way in every chunk and every retry: a UserError naming the job, in one line."""
    spec = get_job(cfg.job)
    batch = head(data, 2, spec.prepare)  # a bad item is named (ItemError) before the model is tried
    try:
        model = spec.build_model(cfg).eval()
        if spec.step is not None:
            spec.step(model, batch)
            return
        (x, y), loss_fn = batch, spec.loss(cfg)
        out = model(x)
        if isinstance(loss_fn, BROADCASTING_LOSSES) and out.shape != y.shape:
            raise UserError(f"job {cfg.job}: the model's output {list(out.shape)} and the targets {list(y.shape)} "
                            f"differ in shape, and {type(loss_fn).__name__} would broadcast them; make build_model's "
                            f"output match the targets of load")
        loss_fn(out, y)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the job's own code: the same failure in every chunk
        raise UserError(f"job {cfg.job}: its model or loss fails on two rows of its data ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); fix build_model, loss, step or load "
                        f"(traceback in {saved_traceback(exc)})") from None



class Progress(Protocol):
    """What the loop tells about a chunk while it trains (tasks/engine/progress.py's ChunkProgress for
    one process; a rank of several tells its launcher)."""

    def __enter__(self) -> Progress: ...
    def __exit__(self, *exc: object) -> None: ...
    def batch(self, done: int, loss_sum: torch.Tensor) -> None: ...
    def epoch_done(self, epoch: int, train_loss: float) -> None: ...


class Stop(Protocol):
    """Whether someone asked the chunk to stop (a signal, a launcher's request)."""

    @property
    def requested(self) -> bool: ...


class SingleProcess:
    """The data-parallel strategy of one process: every batch whole, nothing to agree on. Its
    multi-process twin is :class:`tasks.engine.distributed.DataParallel`; the Trainer only talks to these."""

    #: Whether a stop may end an epoch after any batch (several processes stop at epoch ends).
    stops_inside_epoch = True
    #: Whether this process writes the checkpoints.
    writes = True

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model

    def seed(self, seed: int) -> None:
        """After a fresh model's initialisation (no checkpoint was loaded)."""

    def share(self, order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """This process's rows of an epoch's order, and its part of a batch."""
        return order, batch_size

    def epoch_cost(self, model: nn.Module, cost: float) -> float:
        """The epoch's mean batch loss over all processes (and their buffers made one)."""
        return cost

    def agree(self, flag: bool) -> bool:
        """``flag`` as every process sees it: true if any process's is."""
        return flag

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint needs beyond one process's state (a collective for several)."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        pass


class Trainer:
    """Model, optimizer and data of one run, positioned at the latest valid checkpoint. It owns
    its state: :meth:`state_dict` builds the checkpoint payload, :meth:`load_state_dict` reads it.
    ``parallel``: how the processes of a chunk share the work (one process by default)."""

    def __init__(self, run: Run, logger: Any = log, parallel: Any = None):
        cfg = run.cfg
        self.run, self.cfg, self.log = run, cfg, logger
        self.parallel = parallel or SingleProcess()
        self.spec = get_job(cfg.job)
        self.device = setup_torch(cfg)
        self.load_data()
        self.loss_fn = self.spec.loss(cfg).to(self.device)
        torch.manual_seed(cfg.seed)  # model init is part of the seeded, reproducible run
        self.model = self.spec.build_model(cfg).to(self.device)
        # Batches per epoch: full optimizer steps of --grad-accum batches each (drop_last).
        self.steps_per_epoch = len(self.train) // (cfg.batch_size * cfg.grad_accum) * cfg.grad_accum
        self.optimizer, self.scheduler = self.build_optimizers()
        self.history: dict[str, list[float]] = {}
        self.next_epoch = 0
        # After a stop inside epoch next_epoch: its batches done, their loss sum, its starting lr.
        self.skip, self.partial, self.epoch_lr = 0, None, None
        self.stopped_early = False
        metric, self.higher_is_better = self.spec.monitor
        self.monitor = f"val_{metric}"
        self.best: dict[str, Any] | None = None  # {"epoch", "value", "metric", "model_state_dict"}
        self.net = self.parallel.wrap(self.model, self.device)
        self.step = Step(cfg, self.net, self.optimizer, self.scheduler, self.spec.step or textbook_loss(self.loss_fn),
                         self.device)
        found = run.store.checkpoints.latest_valid(run.fingerprint, map_location=self.device, warn=logger.warning)
        self.resumed_from, self.rejected = found.path, found.rejected
        if found.payload is not None:
            self.load_state_dict(found.payload)
        else:
            self.parallel.seed(cfg.seed)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        """Stop the data's loader workers: the chunk is over, whatever its end. After an error,
        first drop what its frames hold: a loader iterator kept alive by them keeps its workers'
        pids registered with the DataLoader's SIGCHLD handler, which then raises a dead worker's
        error again at the next child's exit, anywhere (inside Prefect's retry, seen once in ~40
        runs of test_datasets' worker kill). That handler may also fire during this cleanup: then
        its error is the chunk's, and the cleanup runs again."""
        for _ in range(3):
            try:
                release_frames(exc)
                self.train.close()
                self.val.close()
                return
            except RuntimeError as again:  # the loader's SIGCHLD handler, reporting the same death
                exc = again
        raise exc

    def load_data(self) -> None:
        cfg, data = self.cfg, load_job_data(self.cfg)
        split = read_split(self.run.dir, data)
        self.train, self.val = (rows_of(data, split, part, cfg.seed, self.device, cfg.num_workers, self.spec.prepare)
                                for part in ("train", "val"))

    def build_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """The job's own optimizer and scheduler, else those ``--optimizer`` and ``--schedule`` name."""
        steps = self.steps_per_epoch // self.cfg.grad_accum
        if self.spec.optimizers is not None:
            return self.spec.optimizers(self.cfg, self.model, steps)
        optimizer = build_optimizer(self.cfg, self.model)
        return optimizer, build_scheduler(self.cfg, optimizer, steps)

    def state_dict(self, chunk: int) -> dict[str, Any]:
        """The checkpoint payload after the last completed epoch (``epoch``, the tutorial's keys
        with the tutorial's meaning) and, after a stop inside an epoch, the batches done in the
        next one (``batch``, ``batch_loss_sum``); then what exact resume needs. It leaves the
        random streams as it found them: a checkpoint taken inside an epoch, which an
        uninterrupted run never takes, must not move them (a job's hook might draw)."""
        rng = capture_rng()
        epoch, label = self.next_epoch - 1, self.spec.model_label(self.cfg)
        cost = self.history["train_loss"][-1] if self.history.get("train_loss") else float(self.partial) / self.skip
        payload = {
            "model": label, "epoch": epoch, "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(), "cost": cost,
            "description": f"{label} 체크포인트-{chunk} (epoch {epoch + 1}/{self.cfg.epochs})",
            "chunk": chunk, "format": 1, "job": self.cfg.job, "fingerprint": self.run.fingerprint,
            "config": self.cfg.identity(), "rng": rng, "stopped_early": self.stopped_early,
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            **self.parallel.state_dict(),
        }
        if self.best is not None:
            payload["best"] = self.best
        if self.scheduler is not None:
            payload["scheduler_state_dict"] = self.scheduler.state_dict()
        if self.step.scaler.is_enabled():
            payload["scaler_state_dict"] = self.step.scaler.state_dict()
        if self.skip:
            payload.update(batch=self.skip, batch_loss_sum=self.partial, epoch_lr=self.epoch_lr)
        restore_rng(rng)
        return payload

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a payload made by :meth:`state_dict`."""
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        if self.step.scaler.is_enabled():
            self.step.scaler.load_state_dict(ckpt["scaler_state_dict"])
        restore_rng(ckpt["rng"])
        self.parallel.load_state_dict(ckpt)
        self.history = {k: v.tolist() for k, v in ckpt["history"].items()}
        self.next_epoch = int(ckpt["epoch"]) + 1
        self.stopped_early = bool(ckpt.get("stopped_early", False))
        self.best = ckpt.get("best")
        self.skip, self.partial, self.epoch_lr = int(ckpt.get("batch", 0)), ckpt.get("batch_loss_sum"), ckpt.get("epoch_lr")

    def inside(self) -> str:
        """``' and 212/421 batches of epoch 4'`` while positioned inside an epoch, else ``''``."""
        return f" and {self.skip}/{self.steps_per_epoch} batches of epoch {self.next_epoch + 1}" if self.skip else ""

    @property
    def finished(self) -> bool:
        """All epochs done, or early stopping ended the run."""
        return self.next_epoch >= self.cfg.epochs or self.stopped_early

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    def track_best(self, epoch: int) -> None:
        """Keep the best validation epoch's weights; decide early stopping. Both follow from
        the history alone, so they are identical with or without interruptions."""
        values = self.history.get(self.monitor)
        if not values:
            return
        value = values[-1]
        if self.best is None or self.better(value, self.best["value"]):
            self.best = {"epoch": epoch, "value": value, "metric": self.monitor,
                         "model_state_dict": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        patience = self.cfg.early_stopping_patience
        if patience is not None and epoch - self.best["epoch"] >= patience:
            self.stopped_early = True

    def run_epoch(self, epoch: int, on_batch: Callable[[int, torch.Tensor], bool | None] | None = None) -> dict[str, float]:
        """Train one epoch (the rest of it, after a stop inside it), validate, append to history;
        raise DivergedError on NaN/inf, EpochStopped when ``on_batch`` asks to stop."""
        cfg = self.cfg
        lr = self.epoch_lr if self.skip else self.optimizer.param_groups[0]["lr"]  # as the epoch began
        try:
            cost = self.fit(epoch, on_batch)
        except EpochStopped as cut:
            self.skip, self.partial, self.epoch_lr = cut.done, cut.total, lr
            raise
        self.skip, self.partial = 0, None
        if not math.isfinite(cost):
            raise DivergedError(f"training diverged at epoch {epoch + 1} (train loss {cost}); the last good "
                                f"checkpoint is kept; {likely_cause(cfg)}")
        val = evaluate_model(self.model, self.loss_fn, self.val, cfg.eval_batch_size, self.spec, self.step.autocast)
        row = {"epoch": float(epoch + 1), "train_loss": cost, "lr": lr, **{f"val_{k}": v for k, v in val.items()}}
        for k, v in row.items():
            self.history.setdefault(k, []).append(v)
        self.track_best(epoch)
        return row

    def fit(self, epoch: int, on_batch: Callable[[int, torch.Tensor], bool | None] | None = None) -> float:
        """Train epoch ``epoch`` (the rest of it, after a stop inside it): this process's share
        of every batch; the mean batch loss."""
        order, batch_size = self.parallel.share(self.train.order(self.cfg.seed, epoch), self.cfg.batch_size)
        batches = self.train.batches(epoch, order, batch_size, self.skip, self.steps_per_epoch)
        cost = train_epoch(self.step, batches, self.cfg.grad_accum, on_batch, self.skip, self.partial)
        return self.parallel.epoch_cost(self.model, cost)

    def save(self, chunk: int) -> PurePosixPath | None:
        """Checkpoint the state after the last completed epoch, then drop what retention allows;
        the checkpoint's name (None in a process that does not write)."""
        payload = self.state_dict(chunk)  # every process: it may be a collective
        if not self.parallel.writes:
            return None
        checkpoints = self.run.store.checkpoints
        name = checkpoints.save(payload)
        checkpoints.prune(self.cfg.keep_last, self.history.get(self.monitor, []), self.higher_is_better)
        return name

    def train_until(self, end: int, stop: Stop, progress: Progress) -> None:
        """Train epochs up to ``end`` (exclusive). A stop request ends after the current batch
        (the state to checkpoint is then inside an epoch) or, with several processes, at the
        epoch's end; early stopping ends at the epoch's end."""

        def after_batch(done: int, loss_sum: torch.Tensor) -> bool:
            progress.batch(done, loss_sum)
            return self.parallel.stops_inside_epoch and stop.requested and done < self.steps_per_epoch

        for epoch in range(self.next_epoch, end):
            try:
                row = self.run_epoch(epoch, after_batch)
            except EpochStopped:
                return
            self.next_epoch = epoch + 1
            progress.epoch_done(epoch, row["train_loss"])
            if self.parallel.agree(stop.requested) or self.stopped_early:
                return


def train_chunk(trainer: Trainer, chunk: int, resumed: bool, stop: Stop,
                progress: Callable[[int, int], Progress]) -> ChunkResult:
    """The one chunk protocol, whatever runs it: train chunk ``chunk`` (1-based) from where the
    trainer stands, checkpoint, write the history. Idempotent: a chunk its checkpoints already
    cover returns at once. ``progress(start, end)`` makes the chunk's progress reporter."""
    cfg, start, end = trainer.cfg, trainer.next_epoch, chunk_end(trainer.cfg, chunk)
    base = ChunkResult(chunk=chunk, trained=False, start_epoch=start, end_epoch=start, resumed=resumed,
                       loaded=trainer.resumed_from.name if trainer.resumed_from else None,
                       skipped_checkpoints=list(trainer.rejected))
    if start >= end or trainer.finished:
        return base
    log_start(trainer, chunk, end, resumed)
    if cfg.compile:
        trainer.model.compile()  # in place: the state_dict keys stay the model's own
    t0 = time.perf_counter()
    with progress(start, end) as reporter:
        trainer.train_until(end, stop, reporter)
    seconds = time.perf_counter() - t0
    name = trainer.save(chunk)
    if trainer.parallel.writes:
        write_history_csv(trainer.run.dir / HISTORY_FILE, trainer.history)
    return base.model_copy(update=outcome(trainer, start, seconds, name))


def outcome(trainer: Trainer, start: int, seconds: float, name: PurePosixPath | None) -> dict[str, Any]:
    """What a trained chunk adds to its result: epochs, time, checkpoint, the last history row,
    and why it stopped early."""
    out = {"trained": True, "end_epoch": trainer.next_epoch, "seconds": seconds,
           "checkpoint": name.name if name else None, "stopped_early": trainer.stopped_early,
           "samples": (trainer.next_epoch - start) * trainer.steps_per_epoch * trainer.cfg.batch_size,
           "last": {k: v[-1] for k, v in trainer.history.items()}}
    if trainer.stopped_early:
        out["early_stop"] = (f"early stopping at epoch {trainer.next_epoch}: no better {trainer.monitor} for "
                             f"{trainer.cfg.early_stopping_patience} epochs (best {trainer.best['value']:.6g} at "
                             f"epoch {trainer.best['epoch'] + 1})")
    return out


def log_start(trainer: Trainer, chunk: int, end: int, resumed: bool) -> None:
    """``chunk 3/6: training epochs 501-750``, after where a resumed chunk took its state from."""
    cfg, start, logger = trainer.cfg, trainer.next_epoch, trainer.log
    if resumed:
        skipped = f" ({len(trainer.rejected)} damaged or unfinished checkpoints skipped)" if trainer.rejected else ""
        whence = (f"{trainer.resumed_from.name}, {start} of {cfg.epochs} epochs kept{trainer.inside()}"
                  if trainer.resumed_from else "scratch: no valid checkpoint")
        logger.info("chunk %d: resuming from %s%s", chunk, whence, skipped)
    logger.info("chunk %d/%d: training epochs %d-%d", chunk, chunk_count(cfg), start + 1, end)


def log_chunk(logger: Any, cfg: TrainConfig, result: ChunkResult) -> None:
    """One line per chunk that completed an epoch: epochs, losses, speed, ETA, checkpoint; and
    why it stopped early."""
    if result.end_epoch <= result.start_epoch:
        return  # nothing to report but where it stopped (stopped())
    done, seconds, end = result.end_epoch - result.start_epoch, result.seconds, result.end_epoch
    eta = eta_seconds(done, seconds, cfg.epochs - end)
    logger.info("chunk %d: epochs %d-%d/%d, train loss %.4g, val loss %.4g, %.0f samples/s, ETA %s, wrote %s",
                result.chunk, result.start_epoch + 1, end, cfg.epochs, result.last.get("train_loss", math.nan),
                result.last.get("val_loss", math.nan), result.samples / max(seconds, 1e-9), duration(eta),
                result.checkpoint)
    if result.early_stop:
        logger.info("%s", result.early_stop)


def stopped(result: ChunkResult, signum: int, position: str, logger: Any) -> ChunkResult:
    """``result`` of a chunk that a stop request ended, saying where it stopped (``epoch
    500/1500``) and how to resume."""
    message = (f"{signal.Signals(signum).name}: saved {result.checkpoint} at {position}; "
               f"rerun the same command to resume from there")
    logger.warning(message)
    return result.model_copy(update={"stopped_by": signum, "stop_message": message})
