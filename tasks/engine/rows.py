"""Where the loop reads its batches: one interface, two implementations.

- :class:`TensorRows`, the fast path for data held as two tensors: one gather per epoch, then
  contiguous slices.
- :class:`DatasetRows`, for a job that gives a map-style ``torch.utils.data.Dataset`` (the
  tutorials' way): a ``DataLoader`` with ``--num-workers`` processes fetches the items.

Both give the epoch's order (a pure function of seed and epoch; for ``Shards``, grouped by shard)
and take the batch to start from, so a run resumed inside an epoch fetches only the batches it has
not trained on. The items of a Dataset are fetched with torch's, ``random``'s and numpy's global
generators seeded from (seed, epoch, item index) (:func:`sample_seed`): random augmentation is
then the same whichever worker fetches an item and however many workers there are, and the same
after a resume.
"""

from __future__ import annotations

import gc
import hashlib
import random
import traceback
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from tasks.jobs.shards import Shards, ShardUnavailable
from tasks.jobs.spec import JobData, Tensors
from tasks.kernel import UserError, own_line

#: The "epoch" of the items that evaluation fetches (each item's draws then repeat every evaluation).
EVALUATION = -1


class Rows(Protocol):
    """One part (train, val or test) of a job's data, as the loop reads it."""

    def __len__(self) -> int: ...

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The rows of this part (positions) in ``epoch``'s order: a pure function of (seed, epoch)."""

    def batches(self, epoch: int, order: torch.Tensor, batch_size: int, start: int, count: int) -> Iterator[Any]:
        """Batches ``start`` .. ``count - 1`` of ``order`` (rows of this part), ``batch_size`` rows each."""

    def in_order(self, batch_size: int) -> Iterator[Any]:
        """Every row once, in index order, for evaluation (the last batch may be short)."""

    def example(self, k: int) -> torch.Tensor | None:
        """The first ``k`` inputs as stored (before the job's ``prepare``), on the CPU; None when
        a batch is not ``(x, y)``."""

    def close(self) -> None:
        """Stop what fetches the rows (loader workers); the rows are not read again."""


def prepared(batch: Any, prepare: Any) -> Any:
    """``(prepare(x), *rest)`` for a tuple or list batch; any other batch (a dict) as it is."""
    if isinstance(batch, (tuple, list)):
        return (prepare(batch[0]), *batch[1:])
    return batch


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` (tensors, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order: a resumed run draws the order an uninterrupted one did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of ``n`` rows in one epoch, a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


class TensorRows:
    """Rows held as two tensors on the training device."""

    def __init__(self, tensors: Tensors, device: torch.device, prepare: Any):
        self.x, self.y, self.prepare = tensors.x.to(device), tensors.y.to(device), prepare

    def __len__(self) -> int:
        return len(self.x)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        return epoch_order(seed, epoch, len(self))

    def batches(self, epoch: int, order: torch.Tensor, batch_size: int, start: int, count: int) -> Iterator[Any]:
        order = order[start * batch_size : count * batch_size].to(self.x.device)
        # One gather per epoch, then contiguous slices: the same rows as indexing every batch, fewer
        # ops. index_select copies whole rows, much faster than x[order] on uint8 images.
        xs, ys = self.x.index_select(0, order), self.y.index_select(0, order)  # [batches*B, ...]
        for b in range(count - start):
            yield self.prepare(xs[b * batch_size : (b + 1) * batch_size]), ys[b * batch_size : (b + 1) * batch_size]

    def in_order(self, batch_size: int) -> Iterator[Any]:
        for start in range(0, len(self), batch_size):
            yield self.prepare(self.x[start : start + batch_size]), self.y[start : start + batch_size]

    def example(self, k: int) -> torch.Tensor | None:
        return self.x[:k].clone().cpu()

    def close(self) -> None:
        pass


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s random draws in ``epoch``: a hash, so that neighbouring items
    and epochs get unrelated streams (64 bits; numpy's legacy seed takes the low 32)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SeededItems(Dataset):
    """``dataset`` indexed by ``(epoch, index)`` keys: item ``index``, fetched with torch's,
    ``random``'s and numpy's global generators seeded by :func:`sample_seed`. Torch's stream is
    put back afterwards: in the training process (``--num-workers 0``) it is the training's own
    (dropout's, the checkpoint's). ``random``'s and numpy's are left as the item left them: the
    loop draws from neither, and saving numpy's costs more than most items (docs/performance.md).
    Errors name the item."""

    def __init__(self, dataset: Dataset, seed: int, part: str):
        self.dataset, self.seed, self.part = dataset, seed, part

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        training_stream = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(s)  # the CPU generator's alone: far cheaper (docs/performance.md)
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            return index, self.dataset[index]
        except ShardUnavailable:
            raise  # the store's failure, not the item's: retried as the store's other errors are
        except UserError as exc:  # the data's own one-line message (a damaged shard)
            raise ItemError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the job's own code: name the item (and its file)
            raise ItemError(f"item {index} of the {self.part} set{file_of(self.dataset, index)}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}; fix the dataset or its transform") from None
        finally:
            torch.set_rng_state(training_stream)


def file_of(dataset: Dataset, index: int) -> str:
    """`` (path)`` of item ``index`` in a dataset that lists its files as torchvision's
    ``DatasetFolder`` and ``ImageFolder`` do (``samples``: (path, class) pairs), else ``''``."""
    try:
        return f" ({dataset.samples[index][0]})"
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""


class ItemError(UserError):
    """A dataset item could not be fetched or batched. Raised in a loader worker, the DataLoader
    re-raises it in the main process with the worker's traceback as its message: only the line
    of our own message is kept."""

    def __init__(self, message: str):
        super().__init__(own_line(message, type(self).__name__))


def collate(part: str):
    """default_collate for items keyed by index; an item whose shape differs from the batch's
    first is named."""

    def batch(keyed: list[tuple[int, Any]]) -> Any:
        items = [item for _, item in keyed]
        try:
            return default_collate(items)
        except (RuntimeError, TypeError) as exc:
            first = shapes(items[0])
            odd = next((i for i, item in keyed if shapes(item) != first), None)
            where = f"item {odd} of the {part} set has shapes {shapes(dict(keyed)[odd])}, item {keyed[0][0]} {first}" \
                if odd is not None else f"items of the {part} set do not batch ({str(exc).splitlines()[0]})"
            raise ItemError(f"{where}; every item must have the same shapes (resize or pad in the transform)") from None

    return batch


def shapes(item: Any) -> Any:
    """The shapes (and types) of an item's parts, to compare items."""
    if isinstance(item, torch.Tensor):
        return tuple(item.shape)
    if isinstance(item, (tuple, list)):
        return tuple(shapes(i) for i in item)
    if isinstance(item, dict):
        return {k: shapes(v) for k, v in item.items()}
    return type(item).__name__


class Plan(Sampler):
    """The loader's batch sampler: the rows to fetch next, in batches keyed by (epoch, index),
    set before each pass (it runs in the main process, so persistent workers see every new
    plan). The keys are made a batch at a time: an epoch's are never all in memory at once."""

    def __init__(self) -> None:
        self.epoch, self.rows, self.size = EVALUATION, torch.zeros(0, dtype=torch.long), 1

    def set(self, epoch: int, rows: torch.Tensor, size: int) -> None:
        self.epoch, self.rows, self.size = epoch, rows, size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(0, len(self.rows), self.size):
            yield [(self.epoch, i) for i in self.rows[b : b + self.size].tolist()]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.size)


class DatasetRows:
    """Rows ``indices`` of a map-style Dataset, fetched by one DataLoader (persistent workers,
    pinned memory on CUDA) for training and evaluation alike."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, seed: int, part: str, device: torch.device,
                 workers: int, prepare: Any):
        self.dataset, self.indices, self.device, self.prepare = dataset, indices, device, prepare
        self.plan, pin = Plan(), device.type == "cuda"
        self.loader = DataLoader(SeededItems(dataset, seed, part), batch_sampler=self.plan, num_workers=workers,
                                 collate_fn=collate(part), pin_memory=pin, persistent_workers=workers > 0,
                                 generator=torch.Generator())  # its base seed must not draw from the global stream
        self.non_blocking = pin

    def __len__(self) -> int:
        return len(self.indices)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(len(self), generator=generator)
        if isinstance(self.dataset, Shards):  # a shard (or a window of them) after the other
            order = order[self.dataset.locality(self.indices[order], generator)]
        return order

    def fetch(self, epoch: int, rows: torch.Tensor, batch_size: int) -> Iterator[Any]:
        """Items ``rows`` of ``epoch`` in batches, on the device, through the job's ``prepare``."""
        self.plan.set(epoch, rows, batch_size)
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches, None)
            except ItemError as exc:
                # Raised anew, without the traceback through the loader's iterator: that would
                # keep the iterator, and so its workers, alive as long as the error is kept.
                error = ItemError(str(exc))
            else:
                if batch is None:
                    return
                yield prepared(to_device(batch, self.device, self.non_blocking), self.prepare)
                continue
            # The run ends here: free the loader now. Its iterator (and so its workers) is also
            # held by the worker error's reference cycle through the loader's frames: collect it.
            del batches
            self.loader = None
            gc.collect()
            raise error

    def batches(self, epoch: int, order: torch.Tensor, batch_size: int, start: int, count: int) -> Iterator[Any]:
        return self.fetch(epoch, self.indices[order[start * batch_size : count * batch_size]], batch_size)

    def in_order(self, batch_size: int) -> Iterator[Any]:
        return self.fetch(EVALUATION, self.indices, batch_size)

    def example(self, k: int) -> torch.Tensor | None:
        self.plan.set(EVALUATION, self.indices[:k], k)
        batch = next(iter(self.loader))
        return batch[0] if isinstance(batch, (tuple, list)) else None

    def close(self) -> None:
        # The DataLoader's persistent iterator, the only holder of the workers, shuts them down
        # when it is freed: with the loader, once no batch generator is left open (train_epoch
        # and evaluate_model close theirs), and no cycle holds it (an error's, collected here).
        workers, self.loader = self.loader is not None and self.loader.num_workers > 0, None
        if workers:
            gc.collect()


def release_frames(error: BaseException | None) -> None:
    """Clear the locals of the frames ``error`` and the errors chained to it went through (a
    loader's iterator among them), so that keeping the error (Prefect keeps a failed task's)
    does not keep them."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def rows_of(data: JobData, split: dict[str, torch.Tensor], part: str, seed: int, device: torch.device,
            workers: int, prepare: Any) -> Rows:
    """Part ``part`` of a job's data (its fixed test or validation set when it has one)."""
    fixed = {"test": data.test, "val": data.val}.get(part)
    source = fixed if fixed is not None else data.pool
    if part != "train" and fixed is None and data.eval_pool is not None:
        source = data.eval_pool
    if isinstance(source, Tensors):
        rows = source if fixed is not None else Tensors(source.x[split[part]], source.y[split[part]])
        return TensorRows(rows, device, prepare)
    return DatasetRows(source, split[part], seed, part, device, workers, prepare)


def first(rows: Rows, k: int) -> Any:
    """The first ``k`` rows as one batch (checks and the exported model's example input)."""
    return next(iter(rows.in_order(k)))


def head(data: JobData, k: int, prepare: Any) -> Any:
    """The pool's first ``k`` rows as one batch, on the CPU, fetched in this process."""
    if isinstance(data.pool, Tensors):
        return prepare(data.pool.x[:k]), data.pool.y[:k]
    rows = DatasetRows(data.pool, torch.arange(min(k, len(data.pool))), 0, "pool", torch.device("cpu"), 0, prepare)
    return first(rows, k)
