"""Streaming shards: a map-style Dataset over tar shards in a folder or on a store (an fsspec URL,
``s3://bucket/prefix``), read with bounded memory (docs/jobs.md, "Streaming shards").

- **Format**: WebDataset's. Each shard is a POSIX tar file; a sample is the files that share a key
  (a name up to its first dot: ``000123.png`` and ``000123.cls``), one after the other. Beside the
  shards, ``index.json`` lists them in order with their sample counts, sizes and sha256:
  :func:`write_shards` writes both; for shards written with ``tar`` or webdataset's
  ``ShardWriter``, ``python -m tasks.jobs.shards index LOCATION`` writes the index.
- **Reading**: item ``i`` is sample ``i`` of the shards in the index's order, as the job's
  ``decode(sample)`` makes it (``sample``: ``{"__key__", "__url__", extension: bytes, ...}``). A
  process keeps at most ``window + 1`` shards open and reads a sample's files with one ``pread``
  each. A shard on a store is downloaded once per machine into a cache folder (checked against
  its sha256, renamed into place whole, the least recently used evicted beyond ``cache_shards``);
  a local one is checked once per machine, in place.
- **Order**: :meth:`Shards.locality` groups rows by shard (windows of ``window`` shards, in a seeded
  order); the engine uses it for each epoch's order and the split (tasks/engine/rows.py).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import torch
from filelock import FileLock
from torch.utils.data import Dataset

from tasks.kernel import UserError, atomic_write_text, cache_root, own_line, sha256_file

INDEX = "index.json"


class ShardUnavailable(RuntimeError):
    """A store failed to give a shard (no answer, an error of its own): not the data's fault, so
    retried as the store's other errors are; the retry resumes from the last checkpoint."""

    def __init__(self, message: str):
        super().__init__(own_line(message, type(self).__name__))  # raised again from a loader worker


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the index lists it."""

    name: str
    samples: int
    size: int
    sha256: str


def fs_of(location: str) -> tuple[Any, str]:
    """The fsspec file system of a local path or a store URL, and the path on it (this process's
    own instance: a forked loader worker gets a new one)."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(location, use_listings_cache=False)
    except ImportError as exc:
        raise UserError(f"{location} needs the {exc.name} package: pip install -e '.[s3]' (or gcsfs, adlfs)") from None


@contextlib.contextmanager
def reading(url: str, fix: str) -> Iterator[None]:
    """Errors while reading ``url``: a missing object is bad input (naming ``fix``), any other
    failure of the store a :class:`ShardUnavailable`."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{url} does not exist; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - the store's failure, retried like its other errors
        text = (str(exc).splitlines() or [""])[0]
        raise ShardUnavailable(f"{url} could not be read ({type(exc).__name__}: {text})") from exc


def reindex(location: str) -> str:
    return f"index the folder again: python -m tasks.jobs.shards index {location}"


def read_index(location: str) -> list[ShardInfo]:
    """The shards that ``location/index.json`` lists, each checked to exist with its size (one
    listing): a missing or truncated shard is named before anything trains."""
    url = f"{location}/{INDEX}"
    with reading(url, f"write the shards with tasks.jobs.shards.write_shards, or {reindex(location)}"):
        fs, root = fs_of(location)
        blob = fs.cat_file(f"{root}/{INDEX}")
        sizes = {Path(e["name"]).name: e["size"] for e in fs.ls(root, detail=True)}
    try:
        shards = [ShardInfo(**s) for s in json.loads(blob)["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{url} is not a shard index ({type(exc).__name__}: {exc}); {reindex(location)}") from None
    for s in shards:
        if s.name not in sizes:
            raise UserError(f"shard {location}/{s.name} is missing ({INDEX} lists it); upload it again, or "
                            f"{reindex(location)}")
        if sizes[s.name] != s.size:
            raise UserError(f"shard {location}/{s.name} has {sizes[s.name]} bytes, {INDEX} says {s.size} "
                            f"(truncated or replaced); write it again, or if it changed on purpose, {reindex(location)}")
    return shards


def key_of(name: str) -> tuple[str, str]:
    """WebDataset's rule: ``dir/000123.seg.png`` -> key ``dir/000123``, extension ``seg.png``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def samples_in(url: str, path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Each sample of the tar file at ``path`` (the shard ``url``): its key and, per extension,
    where its bytes lie (offset, size). Every sample must have the same extensions."""
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: the offsets are the file's
            files = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"shard {url} is not a readable tar file ({exc}); write it again") from None
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for member in files:
        key, ext = key_of(member.name)
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = (member.offset_data, member.size)
    twice = next((k for k, n in Counter(key for key, _ in samples).items() if n > 1), None)
    if twice is not None:
        raise UserError(f"shard {url}: the files of sample {twice!r} are not next to each other; write the shard "
                        f"with each sample's files together (tar them in key order)")
    odd = next((s for s in samples if s[1].keys() != samples[0][1].keys()), None)
    if odd is not None:
        raise UserError(f"shard {url}: sample {odd[0]!r} has files {sorted(odd[1])}, sample {samples[0][0]!r} "
                        f"{sorted(samples[0][1])}; every sample needs the same files")
    return samples


def damaged(url: str, info: ShardInfo, location: str) -> UserError:
    return UserError(f"shard {url} is damaged: its sha256 is not {INDEX}'s ({info.sha256[:12]}...); write or "
                     f"upload it again, or if it changed on purpose, {reindex(location)}")


def download(url: str, info: ShardInfo, target: Path, location: str) -> None:
    """Copy the shard at ``url`` to ``target`` (whole or not at all), checking its sha256."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    digest = hashlib.sha256()
    try:
        with reading(url, f"upload it again, or {reindex(location)}"):
            fs, path = fs_of(url)
            with fs.open(path, "rb") as source, open(tmp, "wb") as out:
                while block := source.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != info.sha256:
            raise damaged(url, info, location)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def evict(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used shards of the cache (a reader that has one
    open keeps reading it; one that needs it again downloads it again)."""

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return float("inf")  # just evicted by another process

    for old in sorted(folder.glob("*.tar"), key=used)[:-keep]:
        old.unlink(missing_ok=True)


def cached(url: str, info: ShardInfo, location: str, keep: int) -> BinaryIO:
    """The shard at ``url`` on a store, open from this machine's cache (downloaded once by one
    process, the others wait on its lock)."""
    folder = cache_root() / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{info.sha256}.tar"
    for _ in range(3):
        with FileLock(f"{target}.lock"):
            if not target.exists():
                download(url, info, target, location)
                evict(folder, keep)
        try:
            os.utime(target)  # most recently used
            return open(target, "rb")
        except FileNotFoundError:
            continue  # evicted since: fetch it again
    raise ShardUnavailable(f"{url}: evicted from {folder} as soon as it was fetched; raise cache_shards")


def verified(url: str, info: ShardInfo, location: str) -> BinaryIO:
    """The local shard at ``url``, open, its sha256 checked once per machine (a mark in the cache
    records the file's size and time as checked)."""
    path = Path(url)
    with reading(url, f"restore it, or {reindex(location)}"):
        stat = path.stat()
    mark = cache_root() / "shards" / f"{info.sha256}.checked"
    mark.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"
    with FileLock(f"{mark}.lock"):
        if not (mark.exists() and mark.read_text() == stamp):
            if sha256_file(path) != info.sha256:
                raise damaged(url, info, location)
            atomic_write_text(mark, stamp)
    return open(path, "rb")


class OpenShard:
    """One shard's file, open, and where each sample's bytes lie in it."""

    def __init__(self, url: str, file: BinaryIO):
        self.url, self.file = url, file
        self.samples = samples_in(url, Path(file.name))

    def sample(self, j: int) -> dict[str, Any]:
        key, files = self.samples[j]
        # pread: no file position, so processes that share the descriptor (forked) never interfere
        return {"__key__": key, "__url__": self.url,
                **{ext: os.pread(self.file.fileno(), size, offset) for ext, (offset, size) in files.items()}}


class Shards(Dataset):
    """The samples of the shards at ``location`` (a folder or a store URL holding ``index.json``),
    each item ``decode(sample)``. ``window``: shards whose samples each epoch mixes (and that a
    loader process keeps open, plus one); ``cache_shards``: shards a machine keeps downloaded."""

    def __init__(self, location: str | Path, decode: Callable[[dict[str, Any]], Any], window: int = 1,
                 cache_shards: int = 8):
        self.location, self.decode = str(location).rstrip("/"), decode
        self.window, self.cache_shards = window, max(cache_shards, window + 1)
        self.shards = read_index(self.location)
        self.offsets = list(itertools.accumulate((s.samples for s in self.shards), initial=0))
        self.fingerprint = hashlib.sha256(json.dumps([asdict(s) for s in self.shards]).encode()).hexdigest()
        self.open: OrderedDict[int, OpenShard] = OrderedDict()  # least recently used first
        self.pid = os.getpid()  # whose files ``open`` holds

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> Any:
        s = bisect.bisect_right(self.offsets, index) - 1
        return self.decode(self.shard(s).sample(index - self.offsets[s]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "open": OrderedDict()}  # open files stay with their process

    def url(self, s: int) -> str:
        return f"{self.location}/{self.shards[s].name}"

    def shard(self, s: int) -> OpenShard:
        """Shard ``s``, open (at most ``window + 1`` in this process)."""
        if self.pid != os.getpid():  # a forked loader worker: files of its own, not its parent's
            self.open, self.pid = OrderedDict(), os.getpid()
        if s in self.open:
            self.open.move_to_end(s)
            return self.open[s]
        while len(self.open) > self.window:
            self.open.popitem(last=False)[1].file.close()
        info, url = self.shards[s], self.url(s)
        if "://" in self.location:
            shard = OpenShard(url, cached(url, info, self.location, self.cache_shards))
        else:
            shard = OpenShard(url, verified(url, info, self.location))
        if len(shard.samples) != info.samples:
            raise UserError(f"shard {url} holds {len(shard.samples)} samples, {INDEX} says {info.samples}; "
                            f"{reindex(self.location)}")
        self.open[s] = shard
        return shard

    def locality(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The positions of ``indices`` (item numbers) grouped by shard: windows of ``window``
        shards in an order drawn from ``generator``, each window's items in their order in
        ``indices`` (a stable sort)."""
        shard = torch.searchsorted(torch.tensor(self.offsets), indices, right=True) - 1
        place = torch.empty(len(self.shards), dtype=torch.long)
        place[torch.randperm(len(self.shards), generator=generator)] = torch.arange(len(self.shards))
        return torch.argsort(place[shard] // self.window, stable=True)


# --- writing shards -------------------------------------------------------------------------


def write_shard(samples: list[dict[str, Any]], url: str) -> ShardInfo:
    """One tar shard of ``samples`` (``__key__`` and bytes per extension) at ``url``; the same
    samples always give the same bytes (no times, owners or modes of this machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:  # POSIX.1-2001
            for sample in samples:
                for ext, blob in sample.items():
                    if ext.startswith("__"):
                        continue
                    member = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    member.size, member.mode = len(blob), 0o644
                    tar.addfile(member, fileobj=io.BytesIO(blob))
        info = ShardInfo(url.rsplit("/", 1)[-1], len(samples), path.stat().st_size, sha256_file(path))
        if "://" in url:
            fs, target = fs_of(url)
            fs.put_file(str(path), target)
        else:
            shutil.move(path, url)  # a rename where the folders share a file system
    return info


def write_index(location: str, shards: list[ShardInfo]) -> None:
    fs, root = fs_of(location)
    fs.pipe_file(f"{root}/{INDEX}", json.dumps({"format": "webdataset", "shards": [asdict(s) for s in shards]},
                                               indent=1).encode())


def write_shards(samples: Iterable[dict[str, Any]], location: str | Path, per_shard: int,
                 prefix: str = "shard") -> list[ShardInfo]:
    """Write ``samples`` (dicts: ``__key__``, and the bytes of each file by extension, e.g.
    ``{"__key__": "000123", "png": ..., "cls": b"3"}``) as shards of ``per_shard`` samples,
    ``<prefix>-000000.tar``, ..., then their ``index.json``, to a folder or a store URL."""
    location = str(location).rstrip("/")
    fs, root = fs_of(location)
    fs.makedirs(root, exist_ok=True)
    shards, it = [], iter(samples)
    while group := list(itertools.islice(it, per_shard)):
        shards.append(write_shard(group, f"{location}/{prefix}-{len(shards):06d}.tar"))
    write_index(location, shards)
    return shards


def index_shards(location: str | Path) -> list[ShardInfo]:
    """Index the ``*.tar`` shards at ``location`` (in name order) into its ``index.json``: shards
    written with ``tar`` or webdataset's ShardWriter. Each is read once (a copy in a temporary
    folder when on a store)."""
    location = str(location).rstrip("/")
    fs, root = fs_of(location)
    shards = []
    for name in sorted(Path(p).name for p in fs.ls(root, detail=False) if p.endswith(".tar")):
        url = f"{location}/{name}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name if "://" in location else Path(root) / name
            if "://" in location:
                fs.get_file(f"{root}/{name}", str(path))
            shards.append(ShardInfo(name, len(samples_in(url, path)), path.stat().st_size, sha256_file(path)))
    write_index(location, shards)
    return shards


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write index.json for the *.tar shards of a folder or store URL")
    parser.add_argument("command", choices=["index"])
    parser.add_argument("location", help="a folder or a URL (s3://bucket/prefix) that holds the shards")
    found = index_shards(parser.parse_args().location)
    print(f"indexed {len(found)} shards, {sum(s.samples for s in found)} samples")
