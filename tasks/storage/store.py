"""Where a run lives: one interface, :class:`RunStore`, with two implementations.

- :class:`LocalStore`: the run folder itself. Held with an OS file lock (released by the kernel
  when the process dies, so a killed run never leaves a stale lock); checkpoints by the local
  protocol (:class:`tasks.storage.checkpoint.LocalCheckpoints`: temp file, fsync, rename).
- :class:`ObjectStore`: a run under an fsspec URL (``s3://``, ``gs://``, ``az://``). The run
  trains in a local *staging* folder, a cache that the store overrides: holding the run claims
  its :class:`Lease` (one writer across machines), then pulls the run's files (never its
  checkpoints); :meth:`ObjectStore.push` uploads what changed, ``run.json`` last, so a reader of
  the store sees "completed" only next to every output. Checkpoints are committed straight to
  the store (:class:`ObjectCheckpoints`). Every write to the store is fenced by the lease:
  checked right before it, and after the lease is lost nothing is written, ever.

Each store owns its state (lock or lease, what was synced, the manifests it has read); nothing
here is module-level. Deliberately free of Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Protocol

from filelock import FileLock, Timeout

from tasks.kernel import UserError, atomic_write_bytes, atomic_write_json, read_json, utc_now
from tasks.storage.checkpoint import (
    CheckpointError,
    LocalCheckpoints,
    Once,
    Resume,
    checkpoint_bytes,
    foreign,
    retention,
    verified_payload,
)
from tasks.storage.records import Manifest
from tasks.storage.remote import LEASE_KEY, Lease, Remote, cache_root, chunk_of, is_url

log = logging.getLogger("trainflow.store")

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


# --- checkpoints on a store ----------------------------------------------------------------------


class ObjectCheckpoints:
    """Checkpoints on a store that cannot rename: the commit protocol.

    - A save writes its bytes to a key never used before, ``checkpoint-<k>.<token>.pt``
      (create-only), then commits them with the manifest ``checkpoint-<k>.<token>.json``
      (:class:`~tasks.storage.records.Manifest`), written last, create-only (``If-None-Match: *``).
      Nothing is overwritten: a SIGTERM's mid-chunk save and the chunk's end are two keys.
      ``fence`` is called right before each of the two writes (the lease check).
    - A reader trusts only committed checkpoints, newest first, and checks size, sha256 and
      that the payload is what its manifest says (chunk, epoch, fingerprint) itself.
    - A damaged checkpoint is reported and skipped; retention deletes a manifest, then its
      bytes, deletes bytes that no manifest commits once a newer commit supersedes them, and
      moves a pair whose manifest cannot be read to ``quarantine/`` (never deleting those bytes).
    """

    def __init__(self, remote: Remote, fence: Callable[[], None] = lambda: None, lease: str | None = None):
        self.remote, self.fence, self.lease = remote, fence, lease
        self.once = Once()
        #: Parsed manifests by (key, ETag): a manifest is never rewritten, and the listing's ETag
        #: tells if its bytes changed; saves a GET per manifest per listing.
        self.read: dict[tuple[str, str], Manifest] = {}

    def save(self, payload: dict[str, Any]) -> PurePosixPath:
        data = checkpoint_bytes(payload)
        stem = f"checkpoint-{int(payload['chunk'])}.{uuid.uuid4().hex[:12]}"
        manifest = Manifest.of(f"{stem}.pt", data, payload, lease=self.lease).json_bytes()
        for key, blob in ((f"{stem}.pt", data), (f"{stem}.json", manifest)):
            self.fence()  # a writer that lost the run writes nothing more
            if not self.remote.put_new(key, blob):
                raise CheckpointError(f"{key} exists already; not overwriting it")
        return PurePosixPath(f"{stem}.pt")

    def listing(self) -> tuple[list[Manifest], list[str], list[str], set[str]]:
        """(manifests, oldest first; bytes that no manifest commits; manifests that cannot be
        read; every key)."""
        keys = self.remote.listed()
        found, unreadable = [], []
        for key in sorted(k for k in keys if k.endswith(".json") and "/" not in k):
            try:
                found.append(self.manifest(key, keys[key]).model_copy(update={"file": key[:-5] + ".pt"}))
            except (OSError, ValueError):
                unreadable.append(key)
        orphans = sorted(k for k in keys if k.endswith(".pt") and "/" not in k and k[:-3] + ".json" not in keys)
        return sorted(found, key=lambda m: m.position), orphans, unreadable, set(keys)

    def manifest(self, key: str, etag: str | None) -> Manifest:
        """The manifest at ``key``, read once while its ETag stays the same."""
        cached = self.read.get((key, etag)) if etag is not None else None
        if cached is None:
            cached = Manifest.model_validate_json(self.remote.get(key))
            if etag is not None:
                self.read[(key, etag)] = cached
        return cached

    def manifests(self) -> list[Manifest]:
        return self.listing()[0]

    def latest_valid(self, fingerprint: str, map_location: Any = "cpu", warn: Callable[..., Any] = log.warning) -> Resume:
        manifests, orphans, unreadable, keys = self.listing()
        warn = self.once.wrap(warn)
        newest = max((m.chunk for m in manifests), default=0)
        rejected = [f"{k}: no manifest (write did not finish)" for k in orphans if chunk_of(k) >= newest]
        rejected += [f"{k[:-5]}.pt: unreadable manifest {k}" for k in unreadable]
        for reason in rejected:
            warn("skipping checkpoint: %s", reason)
        for m in reversed(manifests):
            try:
                foreign(m.file, m, fingerprint)  # another run's: told without downloading it
                if m.file not in keys:
                    raise CheckpointError(f"{m.file}: its bytes are missing (the manifest commits an absent object)")
                payload = verified_payload(m.file, m, self.remote.get(m.file), fingerprint, map_location)
            except FileNotFoundError:
                rejected.append(f"{m.file}: its bytes are missing (the manifest commits an absent object)")
            except CheckpointError as exc:
                rejected.append(str(exc))
            else:
                return Resume(PurePosixPath(m.file), payload, tuple(rejected))
            warn("skipping checkpoint: %s", rejected[-1])
        return Resume(None, None, tuple(rejected))

    def load(self, name: str, fingerprint: str | None = None) -> dict[str, Any]:
        manifest = Manifest.model_validate_json(self.remote.get(name[:-3] + ".json"))
        return verified_payload(name, manifest, self.remote.get(name), fingerprint)

    def prune(self, keep_last: int | None, values: list[float], higher_is_better: bool) -> list[str]:
        """After a commit: clear what it supersedes, then apply retention."""
        manifests, orphans, unreadable, _ = self.listing()
        newest = max((m.chunk for m in manifests), default=0)
        for key in orphans:  # interrupted saves of this chunk or earlier: the newest commit supersedes them
            if chunk_of(key) <= newest:
                self.fence()
                self.remote.delete(key)
        for key in unreadable:
            self.quarantine(key)
        if keep_last is None:
            return []
        removed = [m.file for m in retention(manifests, keep_last, values, higher_is_better)]
        for name in removed:
            self.fence()
            self.remote.delete(name[:-3] + ".json")  # manifest first: a half-pruned pair reads as absent
            self.remote.delete(name)
        return removed

    def quarantine(self, manifest_key: str) -> None:
        """Move a pair whose manifest cannot be read to ``quarantine/`` (copy, then delete)."""
        for key in (manifest_key[:-5] + ".pt", manifest_key):
            self.fence()
            with contextlib.suppress(FileNotFoundError):
                self.remote.fs.copy(self.remote.path(key), self.remote.path(f"quarantine/{key}"))
                self.remote.delete(key)

# --- the stores ----------------------------------------------------------------------------------

LATEST = "latest"


class RunStore(Protocol):
    """Where one run's files live. ``folder`` is the local folder the run writes its files in
    (the run folder itself, or a staging copy); the store decides where they end up."""

    folder: Path
    url: str | None
    lease: Lease | None
    checkpoints: LocalCheckpoints | ObjectCheckpoints

    @property
    def name(self) -> str:
        """What to show a user: a path, or a URL."""

    def hold(self, wait: float = 0, pull: bool = True) -> contextlib.AbstractContextManager[None]:
        """Exclusive hold of the run (UserError naming the holder if another has it)."""

    def push(self) -> list[str]:
        """Make the store hold the folder's changed files (run.json last); their keys."""

    def read(self, key: str) -> bytes | None:
        """A run file as the store has it now, or None."""

    def create(self, key: str, data: bytes) -> None:
        """Write a run file that must not exist yet (config.json); keep it if it does."""

    def point_latest(self) -> None:
        """Make ``<job>/latest`` name this run."""

    def archive(self) -> str | None:
        """Move the run aside (``--fresh``); where it went, or None if there was nothing."""

    def check_access(self) -> None:
        """Fail in one line unless the run's parent takes writes (before any training)."""

    def release_local_copy(self) -> None:
        """Once the run is complete and no longer held: drop what this machine keeps of it only
        as a working copy (a store's staging folder; a local run folder is the run itself)."""

    def check_run_writable(self, complete: bool) -> None:
        """Fail in one line if the run's own folders would refuse a write (found only after a
        chunk has trained otherwise, three times over with the retries)."""


@contextlib.contextmanager
def folder_lock(folder: Path, wait: float, shown: str) -> Iterator[None]:
    """An OS file lock on ``folder`` (the kernel releases it when the process dies), with the
    holder's pid, host and start written beside it for the next claimant's error."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        owner = read_json(folder / OWNER_FILE) or {}
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"
        raise UserError(f"run folder {shown} is in use by another process ({who}); wait for it to finish, "
                        f"pass --wait-lock SECONDS, or use another --run-name") from None
    try:
        atomic_write_json(folder / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()})
        yield
    finally:
        lock.release()


def check_writable(folder: Path, what: str = "artifacts dir",
                   fix: str = "pass --artifacts-dir to a writable folder") -> None:
    """Fail early, in one line, when ``folder`` cannot be written (before any training)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {folder} is not writable ({exc.strerror or exc}); {fix}") from None


def archived_name(name: str) -> str:
    return f"{name}.archived-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


class LocalStore:
    """A run in a local folder (``<artifacts>/<job>/<run>``)."""

    url = None
    lease = None  # the OS lock is enough on one file system

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.checkpoints = LocalCheckpoints(self.folder / "checkpoints")

    @property
    def name(self) -> str:
        return str(self.folder)

    def hold(self, wait: float = 0, pull: bool = True) -> contextlib.AbstractContextManager[None]:
        return folder_lock(self.folder, wait, self.name)

    def push(self) -> list[str]:
        return []

    def read(self, key: str) -> bytes | None:
        try:
            return (self.folder / key).read_bytes()
        except OSError:
            return None

    def create(self, key: str, data: bytes) -> None:
        if not (self.folder / key).exists():
            atomic_write_bytes(self.folder / key, data)

    def point_latest(self) -> None:
        """A one-line file, not a symlink: TensorBoard (and any tool that walks the artifacts
        folder) would list the run twice through a symlink, and object stores have none."""
        link = self.folder.parent / LATEST
        if link.is_dir() and not link.is_symlink():
            log.warning("%s is a run folder, not a pointer; not updating it", link)
            return
        atomic_write_bytes(link, (self.folder.name + "\n").encode())

    def archive(self) -> str | None:
        if not self.folder.exists():
            return None
        with self.hold():  # never archive a folder another process is writing
            pass
        target = self.folder.with_name(archived_name(self.folder.name))
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{target.name.split('~')[0]}~{n}")
        self.folder.rename(target)
        return str(target)

    def check_access(self) -> None:
        check_writable(self.folder.parent)

    def release_local_copy(self) -> None:
        pass

    def check_run_writable(self, complete: bool) -> None:
        if complete:
            return  # only read: a finished run on a read-only share still reports its result
        for folder in (self.folder, self.folder / "checkpoints"):
            if folder.is_dir():
                check_writable(folder, "run folder" if folder == self.folder else "checkpoints folder",
                               "make it writable, then rerun the same command to resume (nothing was trained)")


class ObjectStore:
    """A run under a store URL, trained in a local staging folder (see the module docstring)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.remote = Remote(self.url)
        self.folder = staging_dir(self.url)
        self.lease: Lease | None = None
        self.checkpoints = ObjectCheckpoints(self.remote.child("checkpoints"), fence=self.fence)
        #: (size, mtime_ns) of each staged file as last pulled or pushed, by key.
        self.synced: dict[str, tuple[int, int]] = {}

    @property
    def name(self) -> str:
        return self.url

    def follow(self, token: str) -> ObjectStore:
        """Write under the lease that another process of this run holds (a rank's launcher)."""
        self.lease = Lease.follow(self.remote, token)
        self.checkpoints.lease = token
        return self

    def fence(self) -> None:
        """Right before every write to the store: LeaseLost unless this process holds the run."""
        if self.lease is not None:
            self.lease.check()

    @contextlib.contextmanager
    def hold(self, wait: float = 0, pull: bool = True) -> Iterator[None]:
        with folder_lock(self.folder, wait, self.name):
            lease = Lease(self.remote).acquire(wait)
            self.lease, self.checkpoints.lease = lease, lease.token
            try:
                if pull:
                    self.pull()
                yield
            finally:
                lease.release()
                self.lease = None

    def staged(self) -> dict[str, Path]:
        """The staging folder's files by key: all but checkpoints and dot files (the lock, the
        lease, temp files)."""
        out = {}
        for path in sorted(self.folder.rglob("*")):
            key = path.relative_to(self.folder).as_posix()
            if path.is_file() and is_staged(key):
                out[key] = path
        return out

    def pull(self) -> int:
        """Make the staging folder what the store holds (checkpoints excepted); the files fetched."""
        for path in self.staged().values():
            path.unlink()
        self.synced.clear()
        keys = [k for k in self.remote.keys() if is_staged(k)]
        for key in keys:
            path = self.folder / key
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, self.remote.get(key))
            st = path.stat()
            self.synced[key] = (st.st_size, st.st_mtime_ns)
        return len(keys)

    def push(self) -> list[str]:
        files = {k: (p, p.stat()) for k, p in self.staged().items()}
        changed = sorted((k for k, (_, st) in files.items() if self.synced.get(k) != (st.st_size, st.st_mtime_ns)),
                         key=lambda k: k == "run.json")
        for key in changed:
            path, st = files[key]
            self.fence()
            self.remote.put(key, path.read_bytes())
            self.synced[key] = (st.st_size, st.st_mtime_ns)
        return changed

    def read(self, key: str) -> bytes | None:
        try:
            return self.remote.get(key)
        except FileNotFoundError:
            return None

    def create(self, key: str, data: bytes) -> None:
        self.fence()
        self.remote.put_new(key, data)

    def point_latest(self) -> None:
        self.fence()
        self.remote.parent().put(LATEST, (self.url.rsplit("/", 1)[-1] + "\n").encode())

    def archive(self) -> str | None:
        """Copy every object under ``<run>.archived-<time>`` (on the store's side), then delete:
        a kill leaves both, never neither. Holding the lease meanwhile."""
        with self.hold(pull=False):
            keys = [k for k in self.remote.keys() if k != LEASE_KEY]
            if not keys:
                return None
            target = Remote(f"{self.remote.parent().url}/{archived_name(self.url.rsplit('/', 1)[-1])}")
            for key in keys:
                self.fence()
                self.remote.fs.copy(self.remote.path(key), target.path(key))
            for key in keys:
                self.fence()
                self.remote.delete(key)
        return target.url

    def check_access(self) -> None:
        self.remote.parent().check()
        self.folder.mkdir(parents=True, exist_ok=True)

    def release_local_copy(self) -> None:
        shutil.rmtree(self.folder.parent, ignore_errors=True)  # <cache>/runs/<hash of the URL>/<run>
        self.synced.clear()

    def check_run_writable(self, complete: bool) -> None:
        pass  # the store's own refusals surface at check_access


def open_store(artifacts_dir: Path | str, job: str, run_name: str) -> LocalStore | ObjectStore:
    """The store of run ``run_name`` of ``job`` under ``artifacts_dir`` (a folder or a URL)."""
    if is_url(artifacts_dir):
        return ObjectStore(f"{str(artifacts_dir).rstrip('/')}/{job}/{run_name}")
    return LocalStore(Path(artifacts_dir) / job / run_name)


def is_staged(key: str) -> bool:
    """Whether a run's file goes through staging: all but checkpoints and dot files."""
    return not key.startswith("checkpoints/") and not any(p.startswith(".") for p in key.split("/"))


def staging_dir(url: str) -> Path:
    """The local staging folder of the run at ``url``."""
    url = url.rstrip("/")
    return cache_root() / "runs" / hashlib.sha256(url.encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]

