"""The generic, resumable training loop. Knows nothing about any particular job."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from tasks.checkpoint import (atomic_write_text, capture_rng, json_manifest, latest_valid, list_checkpoints,
                              manifest_path, restore_rng, save_checkpoint)
from tasks.data import load_job_data, read_split, split_tensors
from tasks.jobs import get_job
from tasks.jobs.spec import JobSpec, Tensors, TrainConfig, UserError
from tasks.policy import NO_RETRY_ON_USER_ERROR

log = logging.getLogger("trainflow.training")


class DivergedError(UserError):
    """The loss became NaN/inf: deterministic, so retrying would only fail again."""


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the end of the current epoch.
    A BaseException, so Prefect records a crash and does not retry."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class GracefulStop:
    """While active (main thread only), SIGTERM and SIGINT (Ctrl-C) only set ``signum``: the
    loop finishes the current epoch, checkpoints, then stops. A second signal goes to the
    handler that was there before (Prefect's, or Python's KeyboardInterrupt): stop at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving a checkpoint at the end of this epoch (send it again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """CUDA when available (the tutorial's rule) unless the config pins a device."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@functools.cache  # a process-wide setting: once is enough
def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks instead of unmapping them: every step allocates the
    same activations again, and fresh pages cost a page fault each (~5% of a small CNN's CPU
    step). Memory use stays at its peak. No effect on results; a no-op outside glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the reusable heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for reuse


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
    """Apply thread count (CPU), malloc policy and, on CUDA, deterministic kernels; return the device."""
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    device = resolve_device(cfg)
    if device.type == "cuda":
        deterministic_cuda()
    return device


def chunk_ends(cfg: TrainConfig) -> list[int]:
    """Exclusive end epoch of each chunk: chunk k covers epochs [ends[k-2], ends[k-1])."""
    return [min(k * cfg.chunk_epochs, cfg.epochs) for k in range(1, math.ceil(cfg.epochs / cfg.chunk_epochs) + 1)]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by the config."""
    # On CPU the plain per-parameter loop is what PyTorch picks anyway; saying so skips its
    # per-step dispatch check (~25% of a step for the 2-parameter regression), same math.
    foreach = None if next(model.parameters()).is_cuda else False
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, foreach=foreach)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)


class PlainSGD:
    """``SGD.step`` on the CPU without its wrappers (profiler scope, hooks, grad mode, dynamo
    markers, group scan: ~25 of the ~70 us of the regression's step), in two parts so that one can
    run while other shards finish: ``scale_momentum`` multiplies the momentum buffers by the
    momentum (the one part that needs no gradient), ``step`` does the rest (or all of it). Either
    way: ``_single_tensor_sgd``'s ops in its order on the same state, so SGD.step's floats bit for
    bit (tests/test_nonlinear.py checks it). Build it with ``wrap``."""

    def __init__(self, optimizer: torch.optim.SGD):
        self.optimizer = optimizer
        self._groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._scaled: set[int] = set()  # ids of the parameters whose buffer is already scaled for the next step

    @classmethod
    def wrap(cls, optimizer: torch.optim.Optimizer) -> PlainSGD | None:
        """A PlainSGD for ``optimizer``, or None where SGD.step would do anything else (another
        optimizer, maximize, foreach or fused kernels, a tensor lr, CUDA, hooks, or a ``step``
        patched by an LR scheduler or a test): then use ``optimizer.step``."""
        from torch.optim import optimizer as optim_module

        hooks = [getattr(optimizer, n, None) for n in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")]
        hooks += [getattr(optim_module, n, None) for n in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")]
        if type(optimizer) is not torch.optim.SGD or "step" in vars(optimizer) or any(h is None or h for h in hooks):
            return None
        for group in optimizer.param_groups:
            if (group["maximize"] or group["differentiable"] or group.get("fused") or group.get("foreach")
                    or any(isinstance(group[k], torch.Tensor) for k in ("lr", "momentum", "weight_decay", "dampening"))
                    or any(p.device.type != "cpu" for p in group["params"])):
                return None
        return cls(optimizer)

    def scale_momentum(self, params: list[torch.Tensor]) -> None:
        """Scale the momentum buffers of ``params`` (parameters with a gradient this step, which
        ``step`` will therefore update) ahead of ``step``."""
        state = self.optimizer.state
        with torch.no_grad():
            for p in params:
                momentum = self._groups[id(p)]["momentum"]
                buf = state[p].get("momentum_buffer") if momentum else None
                if buf is not None and id(p) not in self._scaled:
                    buf.mul_(momentum)
                    self._scaled.add(id(p))

    def step(self) -> None:
        """The update, as ``SGD.step`` does it (the buffers' scaling too, unless already done)."""
        state = self.optimizer.state
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
                weight_decay, nesterov = group["weight_decay"], group["nesterov"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if weight_decay != 0:
                        grad = grad.add(p, alpha=weight_decay)
                    if momentum != 0:
                        buf = state[p].get("momentum_buffer")
                        if buf is None:
                            buf = state[p]["momentum_buffer"] = grad.detach().clone()
                        else:
                            if id(p) not in self._scaled:
                                buf.mul_(momentum)
                            buf.add_(grad, alpha=1 - dampening)
                        grad = grad.add(buf, alpha=momentum) if nesterov else buf
                    p.add_(grad, alpha=-lr)
        self._scaled.clear()


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-batch LR schedule (None for a constant LR)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled row order of one epoch, a pure function of (seed, epoch): a resumed run
    replays exactly the order an uninterrupted run would have used."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_batches(
    data: Tensors, order: torch.Tensor, batch_size: int, prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data path of one epoch: ``(prepare(x), y)`` for each full batch of ``data`` in
    ``order`` (drop_last), x as the model takes it [B, ...], y the targets [B, ...]."""
    batches = len(order) // batch_size
    order = order[: batches * batch_size].to(data.x.device)
    # One gather per epoch, then contiguous slices: the same rows as indexing every batch, fewer
    # ops. index_select copies whole rows: ~9x faster than data.x[order] on uint8 images.
    xs, ys = data.x.index_select(0, order), data.y.index_select(0, order)  # [batches*B, ...]
    for b in range(batches):
        yield prepare(xs[b * batch_size : (b + 1) * batch_size]), ys[b * batch_size : (b + 1) * batch_size]


def cpu_slots() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache  # one pool per size for the process: new threads per epoch cost ~10% of a step
def shard_pool(workers: int) -> ThreadPoolExecutor:
    """Threads that run shards besides the calling thread."""
    return ThreadPoolExecutor(workers, thread_name_prefix="shard")


class ShardClock:
    """Whether each step's shards run on ``pool``'s threads or one after another: the floats are
    the same either way, so the clock decides. A probe times ``probe`` steps each way and keeps
    the faster until the next probe, ``period`` steps later; while threads keep winning, each wait
    doubles, up to ``max_period`` (a probe's steps in sequence cost ~60% more on an idle machine:
    ~1.4% of a LeNet epoch at a fixed 200). LeNet on 2 cores (before its batch-major conv1), ms per
    step: idle, threads 4.2 vs in sequence 6.3; with one other busy process, threads 7.2 vs 6.3
    (the scheduler's time slices outlast a shard); with three, 11.6 vs 12.5+. Keep one clock across
    epochs (``Trainer.clock``, made by ``shard_clock``)."""

    def __init__(self, pool: ThreadPoolExecutor | None, period: int = 200, probe: int = 3, max_period: int = 1600):
        self._pool, self.period, self.probe, self.max_period = pool, period, probe, max_period
        self.steps = 0
        self._probe_at = 0  # the step at which the current or next probe begins
        self._wait = period  # steps from one probe's start to the next one's
        self._parallel: bool | None = None  # the last probe's verdict
        self._times: dict[bool, list[float]] = {True: [], False: []}

    def pool(self) -> ThreadPoolExecutor | None:
        """The pool for the next step, or None: run its shards in sequence."""
        phase = self.steps - self._probe_at
        if self._pool is None or 0 <= phase < self.probe:  # probing the sequence
            return None
        return self._pool if 0 <= phase < 2 * self.probe or self._parallel else None

    def took(self, seconds: float, pool: ThreadPoolExecutor | None) -> None:
        """Record the step just run with ``pool``."""
        phase = self.steps - self._probe_at
        if self._pool is not None and 0 <= phase < 2 * self.probe:
            self._times[pool is not None].append(seconds)
            if phase == 2 * self.probe - 1:  # median: robust to one slow step (first use of a shape)
                threads, sequence = (sorted(self._times[k])[self.probe // 2] for k in (True, False))
                parallel = threads <= sequence
                # Threads won again: wait twice as long. Sequence, or a new verdict: the load
                # changes, so the base period.
                self._wait = min(2 * self._wait, self.max_period) if parallel and self._parallel else self.period
                self._parallel = parallel
                self._times = {True: [], False: []}
                self._probe_at += self._wait
        self.steps += 1


def shard_clock(shards: int, device: torch.device) -> ShardClock:
    """A clock for training in ``shards`` shards on ``device``, with a pool of threads on a CPU
    with cores to spare (on CUDA the kernels queue on one stream anyway)."""
    workers = min(shards, cpu_slots()) - 1 if device.type == "cpu" else 0
    return ShardClock(shard_pool(workers) if workers > 0 else None)


def sharded_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: list[torch.Tensor],
    shards: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    pool: ThreadPoolExecutor | None = None,
    while_waiting: Callable[[list[torch.Tensor]], None] | None = None,
) -> torch.Tensor:
    """Set each parameter's ``.grad`` to the gradient of the loss of batch ``x`` [B, ...] (as
    stored; each shard applies ``prepare`` to its rows) and ``y``, computed as ``shards`` equal
    shards (B divisible by ``shards``); return the batch loss. Shards run on ``pool``'s threads
    while this thread runs the first, or one after another without a pool; either way each
    shard runs the same single-threaded kernels and the gradients are summed in shard order,
    so the floats depend on ``shards`` alone, never on which thread ran what or how busy the
    machine was. The model must treat samples independently (``JobSpec.config`` checks).
    Once the first shard is done, ``while_waiting`` gets the parameters that will have a
    gradient, for work that needs none (with a pool: while the other shards finish)."""
    xs, ys = x.chunk(shards), y.chunk(shards)
    threads = torch.get_num_threads()

    # A mean loss over B is the mean of the shards' mean losses (equal shards); a summed loss is
    # their sum. Scaling each shard's loss scales its gradients (exactly, for a power of two).
    scale = 1 / shards if getattr(loss_fn, "reduction", "mean") == "mean" else 1

    # A model may compute its loss and gradients itself (the same floats as autograd, faster):
    # ``model.loss_and_grads(x, y, loss_fn, params, scale)``, None where it does not apply.
    own = getattr(model, "loss_and_grads", None)

    def one(i: int) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
        if torch.get_num_threads() != threads:  # a pool thread may have run another config before
            torch.set_num_threads(threads)
        x_i = prepare(xs[i])
        found = own(x_i, ys[i], loss_fn, params, scale) if own is not None else None
        if found is not None:
            return found
        loss = loss_fn(model(x_i), ys[i]) * scale
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    futures = [pool.submit(one, i) for i in range(1, shards)] if pool is not None else []
    results = [one(0)]
    if while_waiting is not None:  # without a pool too, so that ShardClock compares equal work
        while_waiting([p for p, g in zip(params, results[0][1]) if g is not None])
    results += [f.result() for f in futures] if pool is not None else [one(i) for i in range(1, shards)]
    for k, p in enumerate(params):
        grads = [g[k] for _, g in results if g[k] is not None]  # None: unused, as .backward() leaves it
        for g in grads[1:]:
            grads[0].add_(g)  # into the first shard's fresh tensor, in shard order
        p.grad = grads[0] if grads else None
    return functools.reduce(torch.add, [loss for loss, _ in results])


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    data: Tensors,
    order: torch.Tensor,
    batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    shards: int = 1,
    clock: ShardClock | None = None,
) -> float:
    """One epoch over ``data`` in ``order``, full batches only (drop_last), each batch computed in
    ``shards`` parts (see ``sharded_backward``) on threads or in sequence as ``clock`` decides
    (pass the run's clock to every epoch; default: a new one). Returns the mean batch loss (the
    tutorial's ``cost``)."""
    model.train()
    batches = len(order) // batch_size
    on_cpu = data.x.device.type == "cpu"
    # CPU: a Python float sum (float64, same order) costs less than a tensor op per batch;
    # elsewhere keep the sum on the device so there is no sync per batch.
    total: Any = 0.0 if on_cpu else torch.zeros((), dtype=torch.float64, device=data.x.device)
    # What optimizer.zero_grad(set_to_none=True) does, without its profiler scope and per-call
    # group walk: ~15% of a step for the 2-parameter regression.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    plain = PlainSGD.wrap(optimizer)
    step = plain.step if plain else optimizer.step
    # Shards run on parallel threads when that is faster, each preparing its own rows. One shard
    # goes the direct way unless the model computes its own gradients (see sharded_backward).
    clock = clock or shard_clock(shards, data.x.device)
    direct = shards == 1 and getattr(model, "loss_and_grads", None) is None
    for x, y in epoch_batches(data, order, batch_size, prepare if direct else lambda x: x):
        for p in params:
            p.grad = None
        if direct:
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            pool, t0 = clock.pool(), time.perf_counter()
            # While the other shards finish, the momentum buffers get their scaling (one of the
            # step's three passes over them; cold after the backward): ~70 us of a ~3 ms LeNet step.
            loss = sharded_backward(model, loss_fn, x, y, params, shards, prepare, pool,
                                    plain.scale_momentum if plain else None)
            clock.took(time.perf_counter() - t0, pool)
        step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() if on_cpu else loss.detach()
    return float(total) / batches


SMALL_EVAL_ELEMENTS = 1 << 16


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Tensors,
    batch_size: int,
    spec: JobSpec,
) -> dict[str, float]:
    """Loss (sample-weighted mean over all rows) and the job's metrics on ``data``."""
    if len(data) == 0:
        return {}
    if data.x.numel() <= SMALL_EVAL_ELEMENTS:
        # Small sets (the regression jobs validate every epoch) go through in one forward pass:
        # the sample-weighted mean is the same, and it saves thousands of tiny calls per run.
        batch_size = len(data)
    model.eval()
    outputs, loss_sum = [], 0.0
    for start in range(0, len(data), batch_size):
        x, y = spec.prepare(data.x[start : start + batch_size]), data.y[start : start + batch_size]
        out = model(x)
        loss_sum += float(loss_fn(out, y)) * len(y)
        outputs.append(out)
    out = torch.cat(outputs)
    return {"loss": loss_sum / len(data), **spec.metrics(out, data.y)}


def _to(t: Tensors, device: torch.device) -> Tensors:
    return Tensors(t.x.to(device), t.y.to(device))


class Trainer:
    """Model, optimizer and data of one run, positioned at the latest valid checkpoint."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, fingerprint: str, logger: Any = log):
        self.cfg, self.run_dir, self.fingerprint, self.log = cfg, Path(run_dir), fingerprint, logger
        self.spec = get_job(cfg.job)
        self.device = setup_torch(cfg)
        data = load_job_data(cfg)
        split = read_split(self.run_dir, data)
        self.train = _to(split_tensors(data, split, "train"), self.device)
        self.val = _to(split_tensors(data, split, "val"), self.device)
        self.loss_fn = self.spec.loss(cfg).to(self.device)
        torch.manual_seed(cfg.seed)  # model init is part of the seeded, reproducible run
        self.model = self.spec.build_model(cfg).to(self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.steps_per_epoch = len(self.train) // cfg.batch_size
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.clock = shard_clock(cfg.shards or 1, self.device)  # across this chunk's epochs: probes get rarer
        self.history: dict[str, list[float]] = {}
        self.next_epoch = 0
        self.stopped_early = False
        metric, self.higher_is_better = self.spec.monitor
        self.monitor = f"val_{metric}"
        self.best: dict[str, Any] | None = None  # {"epoch", "value", "model_state_dict"}
        found = latest_valid(self.run_dir / "checkpoints", fingerprint, map_location=self.device, warn=logger.warning)
        self.resumed_from = found.path
        if found.payload is not None:
            self._restore(found.payload)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        restore_rng(ckpt["rng"])
        self.history = {k: v.tolist() for k, v in ckpt["history"].items()}
        self.next_epoch = int(ckpt["epoch"]) + 1
        self.stopped_early = bool(ckpt.get("stopped_early", False))
        self.best = ckpt.get("best")

    @property
    def finished(self) -> bool:
        """All epochs done, or early stopping ended the run."""
        return self.next_epoch >= self.cfg.epochs or self.stopped_early

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    def _track_best(self, epoch: int) -> None:
        """Keep the best validation epoch's weights; decide early stopping. Both follow from
        the history alone, so they are identical with or without interruptions."""
        values = self.history.get(self.monitor)
        if not values:
            return
        value = values[-1]
        if self.best is None or self._better(value, self.best["value"]):
            self.best = {"epoch": epoch, "value": value, "metric": self.monitor,
                         "model_state_dict": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        patience = self.cfg.early_stopping_patience
        if patience is not None and epoch - self.best["epoch"] >= patience:
            self.stopped_early = True

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch, validate, append to history; raise DivergedError on NaN/inf."""
        cfg = self.cfg
        order = epoch_order(cfg.seed, epoch, len(self.train))
        lr = self.optimizer.param_groups[0]["lr"]
        cost = train_epoch(self.model, self.optimizer, self.scheduler, self.loss_fn, self.train, order,
                           cfg.batch_size, self.spec.prepare, cfg.shards or 1, self.clock)
        if not math.isfinite(cost):
            raise DivergedError(
                f"training diverged at epoch {epoch + 1} (train loss {cost}); the last good checkpoint is kept; "
                f"lower --lr (now {cfg.lr})"
            )
        val = evaluate_model(self.model, self.loss_fn, self.val, cfg.eval_batch_size, self.spec)
        row = {"epoch": float(epoch + 1), "train_loss": cost, "lr": lr, **{f"val_{k}": v for k, v in val.items()}}
        for k, v in row.items():
            self.history.setdefault(k, []).append(v)
        self._track_best(epoch)
        return row

    def save(self, chunk: int, cost: float) -> Path:
        """Checkpoint after the last completed epoch (``self.next_epoch - 1``)."""
        epoch = self.next_epoch - 1
        label = self.spec.model_label(self.cfg)
        payload = {
            # The tutorial's keys, with the tutorial's meaning.
            "model": label,
            "epoch": epoch,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "cost": cost,
            "description": f"{label} 체크포인트-{chunk} (epoch {epoch + 1}/{self.cfg.epochs})",
            # What exact resume needs on top.
            "chunk": chunk,
            "format": 1,
            "job": self.cfg.job,
            "fingerprint": self.fingerprint,
            "config": self.cfg.identity(),
            "rng": capture_rng(),
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            "stopped_early": self.stopped_early,
        }
        if self.best is not None:
            payload["best"] = self.best
        if self.scheduler is not None:
            payload["scheduler_state_dict"] = self.scheduler.state_dict()
        return save_checkpoint(self.run_dir / "checkpoints", payload)


def write_history_csv(path: Path, history: dict[str, list[float]]) -> None:
    """Per-epoch history as CSV (``epoch`` as an integer, the rest as floats)."""
    cols = list(history)
    lines = [",".join(cols)]
    for i in range(len(history["epoch"])):
        lines.append(",".join(str(int(history[c][i])) if c == "epoch" else repr(history[c][i]) for c in cols))
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_chunk(cfg: TrainConfig, run_dir: Path, fingerprint: str, chunk: int, logger: Any = log) -> dict[str, Any]:
    """Train chunk ``chunk`` (1-based) from the latest valid checkpoint and end by writing
    ``checkpoint-<chunk>.pt``. Idempotent: a chunk already covered returns at once.

    ``checkpoint-<k>.pt`` normally holds the state at the end of chunk k; after a SIGTERM it
    holds a mid-chunk state, which the next attempt continues and then overwrites."""
    end = chunk_ends(cfg)[chunk - 1]
    trainer = Trainer(cfg, run_dir, fingerprint, logger)  # reports skipped checkpoints, once
    if trainer.next_epoch >= end or trainer.finished:
        return {"chunk": chunk, "skipped": True, "epoch": trainer.next_epoch}
    start = trainer.next_epoch
    if trainer.resumed_from is not None:
        logger.info("chunk %d: continuing from %s at epoch %d (%d epochs saved, not redone)",
                    chunk, trainer.resumed_from.name, start + 1, start)
    t0 = time.perf_counter()
    row: dict[str, float] = {}
    with GracefulStop() as stop:
        for epoch in range(start, end):
            row = trainer.run_epoch(epoch)
            trainer.next_epoch = epoch + 1
            if stop.signum is not None or trainer.stopped_early:
                break
        seconds = time.perf_counter() - t0
        path = trainer.save(chunk, row["train_loss"])
        write_history_csv(Path(run_dir) / "history.csv", trainer.history)
    prune_checkpoints(Path(run_dir) / "checkpoints", cfg.keep_last, trainer)
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        message = (f"{name}: saved {path.name} at epoch {trainer.next_epoch}/{cfg.epochs}; "
                   f"rerun the same command to resume from there")
        logger.warning(message)
        raise StopRequested(stop.signum, message)
    done = trainer.next_epoch - start
    samples = done * trainer.steps_per_epoch * cfg.batch_size
    logger.info(
        "chunk %d: epochs %d-%d/%d, train loss %.4g, val loss %.4g, %.0f samples/s, ETA %.0fs, wrote %s",
        chunk, start + 1, trainer.next_epoch, cfg.epochs, row["train_loss"], row.get("val_loss", float("nan")),
        samples / max(seconds, 1e-9), (cfg.epochs - trainer.next_epoch) * seconds / max(done, 1), path.name,
    )
    if trainer.stopped_early:
        logger.info("early stopping at epoch %d: no better %s for %d epochs (best %.6g at epoch %d)",
                    trainer.next_epoch, trainer.monitor, cfg.early_stopping_patience, trainer.best["value"],
                    trainer.best["epoch"] + 1)
    return {"chunk": chunk, "skipped": False, "start_epoch": start, "end_epoch": trainer.next_epoch,
            "seconds": seconds, "resumed_from": trainer.resumed_from.name if trainer.resumed_from else None,
            **row, "checkpoint": path.name, "stopped_early": trainer.stopped_early}


def prune_checkpoints(folder: Path, keep_last: int | None, trainer: Trainer) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoints plus the best one; runs only after the new
    checkpoint is safely written, and never removes the newest or the best."""
    if keep_last is None:
        return []
    found = list_checkpoints(folder)  # newest first
    keep = {p for _, p in found[:keep_last]}
    if found:
        keep.add(found[0][1])
    values = trainer.history.get(trainer.monitor)
    if values:
        def at(path: Path) -> float:
            epoch = int(json_manifest(path).get("epoch", -1))
            return values[epoch] if 0 <= epoch < len(values) else float("nan")

        scored = [(at(p), p) for _, p in found if math.isfinite(at(p))]
        if scored:
            best = (max if trainer.higher_is_better else min)(scored, key=lambda vp: vp[0])[1]
            keep.add(best)
    removed = []
    for _, path in found:
        if path not in keep:
            manifest_path(path).unlink(missing_ok=True)  # manifest first: a half-pruned pair reads as absent
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@task(name="train_chunk", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE,
      retry_condition_fn=NO_RETRY_ON_USER_ERROR, task_run_name="train_chunk-{chunk}")
def train_chunk(cfg: TrainConfig, run_dir: Path, fingerprint: str, chunk: int) -> dict[str, Any]:
    """Prefect task: one checkpointed chunk; a retry resumes from the latest valid checkpoint."""
    from prefect import get_run_logger

    return run_chunk(cfg, run_dir, fingerprint, chunk, get_run_logger())
