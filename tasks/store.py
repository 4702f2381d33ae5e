"""Where a run's files live: a local folder, or an fsspec URL (``s3://``, ``gs://``, ``az://``).
Deliberately free of Prefect.

A run on object storage trains in a local *staging* folder, a cache that the store overrides:
holding the run (:class:`tasks.run.hold`) claims its :class:`Lease`, then pulls the run's
files (never its checkpoints) from the store; each save of ``run.json`` pushes what changed,
``run.json`` last, so a reader of the store sees "completed" only next to every output. The
staging folder holds the run's URL in ``.remote``: code handed a run folder finds the store
through :func:`remote_of` and needs nothing else.

Checkpoints never pass through staging. :class:`LocalCheckpoints` keeps the local protocol
(tasks/checkpoint.py: temp file, fsync, rename, fsync of the folder); :class:`ObjectCheckpoints`
has a commit protocol for stores that cannot rename. Both answer the same calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from tasks.checkpoint import (
    CheckpointError,
    Resume,
    atomic_write_bytes,
    checkpoint_bytes,
    json_manifest,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    manifest_for,
    prune_checkpoints,
    retention,
    save_checkpoint,
    verified_payload,
)
from tasks.jobs.spec import UserError

log = logging.getLogger("trainflow.store")

#: URL scheme -> (fsspec package, pip extra).
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"),
           "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}
#: In a staging folder: the URL of its run on the store.
REMOTE_FILE = ".remote"
#: The lease object of a run on a store.
LEASE_KEY = ".lease"


def is_url(location: Any) -> bool:
    """A store URL (``s3://bucket/x``), not a local path."""
    return "://" in str(location)


def store_error(url: str, exc: BaseException) -> UserError:
    """The one-line error for a store that refuses us: no bucket, no or refused credentials."""
    text = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{url}: the bucket does not exist ({text}); create it, or fix --artifacts-dir")
    return UserError(f"{url}: access failed ({type(exc).__name__}: {text}); set credentials the usual way "
                     f"(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; a custom endpoint in "
                     f"AWS_ENDPOINT_URL) and rerun")


class Remote:
    """A folder on a store; keys are POSIX paths relative to ``url``."""

    def __init__(self, url: str):
        import fsspec.core

        self.url = str(url).rstrip("/")
        scheme = self.url.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise UserError(f"unknown URL scheme {scheme}:// in {url}; use a local folder, s3://, gs:// or az://")
        package, extra = SCHEMES[scheme]
        try:
            # No listings cache: other machines write the same prefix; a stale listing would hide them.
            self.fs, self.root = fsspec.core.url_to_fs(self.url, use_listings_cache=False, skip_instance_cache=True)
        except ImportError:
            raise UserError(f"{url} needs the {package} package: pip install -e '.[{extra}]'") from None

    def path(self, key: str = "") -> str:
        return f"{self.root}/{key}" if key else self.root

    def child(self, key: str) -> Remote:
        return Remote(f"{self.url}/{key}")

    def parent(self) -> Remote:
        return Remote(self.url.rsplit("/", 1)[0])

    def put(self, key: str, data: bytes, **conditions: str) -> None:
        """Write ``key`` whole (a store replaces an object atomically); ``IfMatch=etag`` makes it
        a compare-and-swap (S3 answers 412, an OSError)."""
        self.fs.pipe_file(self.path(key), data, **conditions)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (``If-None-Match: *``); False if it did."""
        try:
            self.fs.pipe_file(self.path(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def etag(self, key: str) -> str | None:
        info = self.fs.info(self.path(key))
        return info.get("ETag") or info.get("etag")

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, relative to this folder, sorted."""
        return sorted(self.listed(prefix))

    def listed(self, prefix: str = "") -> dict[str, str | None]:
        """Every key under ``prefix``, relative to this folder, with its ETag as the listing
        gives it (None where the store gives none): one LIST request per 1 000 keys."""
        try:
            found = self.fs.find(self.path(prefix), detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(self.root) + 1:]: info.get("ETag") or info.get("etag") for p, info in found.items()
                if p.startswith(self.root + "/")}

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def check(self) -> None:
        """Fail in one line unless the bucket exists and takes a write (a probe object)."""
        probe = f".write-test-{uuid.uuid4().hex[:12]}"
        try:
            self.put(probe, b"")
            self.delete(probe)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes one line
            raise store_error(self.url, exc) from None


def remote_of(run_dir: Path) -> Remote | None:
    """The store of a staging folder (None for a local run)."""
    try:
        return Remote((Path(run_dir) / REMOTE_FILE).read_text().strip())
    except FileNotFoundError:
        return None


# --- checkpoints -------------------------------------------------------------------------------


class LocalCheckpoints:
    """``checkpoint-<k>.pt`` + manifest in a local folder (tasks/checkpoint.py's protocol)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, payload: dict[str, Any]) -> PurePosixPath:
        return PurePosixPath(save_checkpoint(self.folder, payload).name)

    def latest_valid(self, fingerprint: str, map_location: Any = "cpu", warn: Callable[..., Any] = log.warning) -> Resume:
        return latest_valid(self.folder, fingerprint, map_location=map_location, warn=warn)

    def manifests(self) -> list[dict[str, Any]]:
        """Committed checkpoints' manifests, oldest epoch first."""
        found = [json_manifest(p) for _, p in list_checkpoints(self.folder)]
        return sorted((m for m in found if "epoch" in m), key=lambda m: (int(m["epoch"]), int(m["chunk"])))

    def load(self, name: str, fingerprint: str | None = None) -> dict[str, Any]:
        return load_checkpoint(self.folder / name, fingerprint)

    def prune(self, keep_last: int | None, values: list[float], higher_is_better: bool) -> list[str]:
        return [p.name for p in prune_checkpoints(self.folder, keep_last, values, higher_is_better)]


#: Parsed manifests by (path on the store, ETag): see ObjectCheckpoints.manifest.
MANIFESTS: dict[tuple[str, str], dict[str, Any]] = {}


class ObjectCheckpoints:
    """Checkpoints on a store that cannot rename: the commit protocol.

    - A save writes its bytes to a key never used before, ``checkpoint-<k>.<token>.pt``
      (create-only), then commits them with the manifest ``checkpoint-<k>.<token>.json``
      (sha256, size, epoch, fingerprint), written last, create-only (``If-None-Match: *``).
      Nothing is overwritten: a SIGTERM's mid-chunk save and the chunk's end are two keys.
    - A reader trusts only committed checkpoints, newest epoch first, and checks size and
      sha256 itself (a store may not). Bytes without a manifest are a save a kill interrupted.
    - A damaged checkpoint is skipped, not moved (a store cannot rename). Retention deletes a
      manifest, then its bytes, and clears interrupted saves older than the newest commit.
    """

    def __init__(self, remote: Remote, lease: Lease | None = None):
        self.remote, self.lease = remote, lease

    def save(self, payload: dict[str, Any]) -> PurePosixPath:
        data = checkpoint_bytes(payload)
        stem = f"checkpoint-{int(payload['chunk'])}.{uuid.uuid4().hex[:12]}"
        if self.lease is not None:
            self.lease.check()  # a writer that lost the run commits nothing more
        manifest = json.dumps(manifest_for(f"{stem}.pt", data, payload), indent=2).encode()
        for key, blob in ((f"{stem}.pt", data), (f"{stem}.json", manifest)):
            if not self.remote.put_new(key, blob):
                raise CheckpointError(f"{key} exists already; not overwriting it")
        return PurePosixPath(f"{stem}.pt")

    def listing(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(manifests whose bytes exist, oldest epoch first; bytes without a manifest)."""
        keys = self.remote.listed()
        found = []
        for key in sorted(k for k in keys if k.endswith(".json")):
            try:
                found.append({**self.manifest(key, keys[key]), "file": key[:-5] + ".pt"})
            except (OSError, ValueError):
                continue  # unreadable: not a commit
        committed = {m["file"] for m in found}
        orphans = sorted(k for k in keys if k.endswith(".pt") and k not in committed)
        found = [m for m in found if m["file"] in keys and "epoch" in m]
        return sorted(found, key=lambda m: (int(m["epoch"]), int(m.get("batch", 0)), int(m.get("chunk", 0)))), orphans

    def manifest(self, key: str, etag: str | None) -> dict[str, Any]:
        """The manifest at ``key``, read once per process: a manifest is never rewritten, and the
        listing's ETag tells if its bytes changed. Saves a GET per manifest per listing (two
        listings a chunk, and a run without --keep-last keeps every manifest)."""
        if etag is None or (cached := MANIFESTS.get((self.remote.path(key), etag))) is None:
            cached = json.loads(self.remote.get(key))
            if etag is not None:
                MANIFESTS[(self.remote.path(key), etag)] = cached
        return cached

    def manifests(self) -> list[dict[str, Any]]:
        return self.listing()[0]

    def latest_valid(self, fingerprint: str, map_location: Any = "cpu", warn: Callable[..., Any] = log.warning) -> Resume:
        manifests, orphans = self.listing()
        newest = max((int(m.get("chunk", 0)) for m in manifests), default=0)
        rejected = [f"{k}: no manifest (write did not finish)" for k in orphans if chunk_of(k) >= newest]
        for reason in rejected:
            warn("skipping checkpoint: %s", reason)
        for m in reversed(manifests):
            try:
                if m.get("fingerprint") != fingerprint:  # another run's: verified without downloading it
                    verified_payload(m["file"], m, b"", fingerprint)
                payload = verified_payload(m["file"], m, self.remote.get(m["file"]), fingerprint, map_location)
            except FileNotFoundError:
                rejected.append(f"{m['file']}: bytes missing")
            except CheckpointError as exc:
                rejected.append(str(exc))
            else:
                return Resume(PurePosixPath(m["file"]), payload, tuple(rejected))
            warn("skipping checkpoint: %s", rejected[-1])
        return Resume(None, None, tuple(rejected))

    def load(self, name: str, fingerprint: str | None = None) -> dict[str, Any]:
        manifest = json.loads(self.remote.get(name[:-3] + ".json"))
        return verified_payload(name, manifest, self.remote.get(name), fingerprint)

    def prune(self, keep_last: int | None, values: list[float], higher_is_better: bool) -> list[str]:
        manifests, orphans = self.listing()
        newest = max((int(m.get("chunk", 0)) for m in manifests), default=0)
        for key in orphans:  # interrupted saves that a later commit superseded
            if chunk_of(key) < newest:
                self.remote.delete(key)
        if keep_last is None:
            return []
        removed = [m["file"] for m in retention(manifests, keep_last, values, higher_is_better)]
        for name in removed:
            self.remote.delete(name[:-3] + ".json")  # manifest first: a half-pruned pair reads as absent
            self.remote.delete(name)
        return removed


def chunk_of(key: str) -> int:
    """``checkpoint-3.ab12cd34ef56.pt`` -> 3 (0 for other names)."""
    try:
        return int(key.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return 0


def checkpoints_for(run_dir: Path) -> LocalCheckpoints | ObjectCheckpoints:
    """The checkpoint store of a run folder: its ``checkpoints/`` folder, or on its store."""
    remote = remote_of(run_dir)
    if remote is None:
        return LocalCheckpoints(Path(run_dir) / "checkpoints")
    return ObjectCheckpoints(remote.child("checkpoints"), HELD.get(remote.url))


# --- the lease: one writer per run, across machines ----------------------------------------------


def boot_id() -> str | None:
    """This machine's identity for this boot (Linux), so a lease's pid is only judged where it lives."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


BOOT_ID = boot_id()


def dead_here(held: dict[str, Any]) -> bool:
    """A lease written on this machine, in this boot, by a process that no longer exists: a
    SIGKILLed run, rerun at once, need not wait for its lease to expire."""
    if BOOT_ID is None or held.get("boot") != BOOT_ID or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


#: Leases this process holds, by run URL (a checkpoint commit checks its run's).
HELD: dict[str, Lease] = {}


class Lease:
    """Exclusive hold of a run on a store, across machines: the object ``<run>/.lease``.

    Claimed with a create-only write; renewed every ``ttl / 3`` s by compare-and-swap
    (``If-Match`` on its ETag). A holder that died stops blocking once its ``expires`` passes, and
    a claimant takes an expired lease over by compare-and-swap too, so of two claimants one wins.
    A holder that cannot renew in time has lost the run: :meth:`check` then refuses commits.
    Expiry is judged by the claimant's clock: machines must agree within seconds (NTP)."""

    def __init__(self, remote: Remote, ttl: float = 60.0):
        self.remote, self.ttl = remote, ttl
        self.token, self.tag, self.lost, self.failing = uuid.uuid4().hex, None, None, None
        self.expires = 0.0  # when the lease this holder last wrote runs out (this clock)
        self.stop = threading.Event()

    def body(self) -> bytes:
        expires = time.time() + self.ttl
        return json.dumps({"token": self.token, "host": socket.gethostname(), "boot": BOOT_ID, "pid": os.getpid(),
                           "expires": expires, "expires_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))}
                          ).encode()

    def write(self, **conditions: str) -> bool:
        """Write a fresh lease body: create-only without ``conditions``; False if refused."""
        body = self.body()
        if conditions:
            try:
                self.remote.put(LEASE_KEY, body, **conditions)
            except OSError:
                return False
        elif not self.remote.put_new(LEASE_KEY, body):
            return False
        self.tag, self.expires = self.remote.etag(LEASE_KEY), json.loads(body)["expires"]
        return True

    def holder(self) -> tuple[dict[str, Any], str | None]:
        """The lease as it is now, and its ETag ({} and None when there is none)."""
        try:
            tag = self.remote.etag(LEASE_KEY)
            return json.loads(self.remote.get(LEASE_KEY)), tag
        except FileNotFoundError:
            return {}, None

    def try_acquire(self) -> dict[str, Any] | None:
        """Claim the lease: None on success, else who holds it."""
        if self.write():
            return None
        held, tag = self.holder()
        if tag is not None and (float(held.get("expires", 0)) <= time.time() or dead_here(held)) and self.write(IfMatch=tag):
            return None  # it expired, or its holder died on this machine; the compare-and-swap makes one claimant win
        return held if tag is not None else {}

    def acquire(self, wait: float = 0) -> Lease:
        deadline = time.monotonic() + wait
        while (held := self.try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise UserError(f"run {self.remote.url} is in use by another process (pid {held.get('pid', '?')} on "
                                f"{held.get('host', '?')}, lease until {held.get('expires_utc', '?')}); wait for it "
                                f"to finish, pass --wait-lock SECONDS, or use another --run-name")
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.1)))
        HELD[self.remote.url] = self
        threading.Thread(target=self.renew, name="trainflow-lease", daemon=True).start()
        return self

    def renew(self) -> None:
        """Every ``ttl / 3`` s, move the expiry on by compare-and-swap. A failed write is
        retried each second while the lease lasts; it is lost once another holds it or it expired."""
        while not self.stop.wait(self.ttl / 3 if self.failing is None else 1.0):
            try:
                if self.write(IfMatch=self.tag):
                    self.failing = None
                else:  # refused: taken over, unless the lease is still ours (then retry)
                    ours = self.holder()[0].get("token") == self.token
                    self.failing = "the renewal was refused" if ours else "the lease was taken over"
            except Exception as exc:  # noqa: BLE001 - the store may be back in a moment
                self.failing = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if self.failing is not None and (self.failing == "the lease was taken over" or time.time() + 5 >= self.expires):
                self.lost = self.failing
                log.error("lost the lease on %s (%s); this process commits nothing more to that run",
                          self.remote.url, self.lost)
                return

    def check(self) -> None:
        if self.lost is not None:
            raise UserError(f"lost the lease on {self.remote.url} ({self.lost}); another worker may own the run, so "
                            f"nothing more is committed; rerun to resume from its latest checkpoint")

    def release(self) -> None:
        self.stop.set()
        HELD.pop(self.remote.url, None)
        try:
            if self.lost is None and self.holder()[0].get("token") == self.token:
                self.remote.delete(LEASE_KEY)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the lease on %s (%s); it expires within %.0f s", self.remote.url, exc, self.ttl)


# --- staging -------------------------------------------------------------------------------------

#: (size, mtime_ns) of each staged file as last pulled or pushed, by staging folder and key.
SYNCED: dict[Path, dict[str, tuple[int, int]]] = {}


def cache_root() -> Path:
    """Staging folders and downloaded data: ``$TRAINFLOW_CACHE``, else ~/.cache/trainflow."""
    if os.environ.get("TRAINFLOW_CACHE"):
        return Path(os.environ["TRAINFLOW_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainflow"


def staging_dir(url: str) -> Path:
    """The local staging folder of the run at ``url``."""
    url = url.rstrip("/")
    return cache_root() / "runs" / hashlib.sha256(url.encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]


def is_staged(key: str) -> bool:
    """Whether a run's file goes through staging: all but checkpoints and dot files (the lock,
    the pointer, the lease, temp files)."""
    return not key.startswith("checkpoints/") and not any(p.startswith(".") for p in key.split("/"))


def staged(run_dir: Path) -> dict[str, Path]:
    """A staging folder's files by key."""
    paths = sorted(Path(run_dir).rglob("*"))
    return {k: p for p in paths if p.is_file() and is_staged(k := p.relative_to(run_dir).as_posix())}


def pull(run_dir: Path, remote: Remote) -> int:
    """Make the staging folder what the store holds (checkpoints excepted); returns the files fetched."""
    for path in staged(run_dir).values():
        path.unlink()
    synced = SYNCED.setdefault(Path(run_dir), {})
    synced.clear()
    keys = [k for k in remote.keys() if is_staged(k)]
    for key in keys:
        path = Path(run_dir) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, remote.get(key))
        st = path.stat()
        synced[key] = (st.st_size, st.st_mtime_ns)
    return len(keys)


def push(run_dir: Path) -> list[str]:
    """Upload the staged files changed since the last pull or push, ``run.json`` last; returns
    their keys. A no-op for a local run."""
    remote = remote_of(run_dir)
    if remote is None:
        return []
    synced = SYNCED.setdefault(Path(run_dir), {})
    files = {k: (p, p.stat()) for k, p in staged(run_dir).items()}
    changed = sorted((k for k, (_, st) in files.items() if synced.get(k) != (st.st_size, st.st_mtime_ns)),
                     key=lambda k: k == "run.json")
    for key in changed:
        path, st = files[key]
        remote.put(key, path.read_bytes())
        synced[key] = (st.st_size, st.st_mtime_ns)
    return changed


def fetch_data(url: str) -> Path:
    """A local copy of the data at ``url`` (a file, or a folder), fetched again when the
    store's copy changes (its ETag or size)."""
    remote = Remote(url)
    try:
        info = remote.fs.info(remote.root)
    except FileNotFoundError:
        raise UserError(f"data {url} does not exist; pass --data to a file or folder on the store") from None
    except Exception as exc:  # noqa: BLE001
        raise store_error(url, exc) from None
    version = json.dumps([url, info.get("ETag"), info.get("size")], default=str)
    local = cache_root() / "data" / hashlib.sha256(version.encode()).hexdigest()[:16] / url.rstrip("/").rsplit("/", 1)[-1]
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:12]}.tmp")
        remote.fs.get(remote.root, str(tmp), recursive=info.get("type") == "directory")
        tmp.rename(local)
    return local


def fetch_run(url: str, names: tuple[str, ...] = ("config.json", "model_state_dict.pt")) -> Path:
    """A local copy of a finished run's ``names`` on a store (``<job>/latest`` is followed), for
    reading only (predictions): the run's own staging folder is never touched."""
    remote = Remote(url)
    if remote.url.endswith("/latest"):
        try:
            name = remote.get("").decode().strip()
        except FileNotFoundError:
            raise UserError(f"{url} does not exist: no run of that job on the store yet") from None
        remote = remote.parent().child(name)
    local = cache_root() / "fetched" / hashlib.sha256(remote.url.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            atomic_write_bytes(local / name, remote.get(name))
        except FileNotFoundError:
            (local / name).unlink(missing_ok=True)  # the caller says what is missing, and why
    return local
