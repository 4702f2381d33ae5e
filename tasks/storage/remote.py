"""Object storage below the stores: a folder on a store (:class:`Remote`, through fsspec URLs:
``s3://``, ``gs://``, ``az://``), the lease that keeps one writer per run across machines
(:class:`Lease`), and local copies of data and finished runs fetched from a store. Free of
Prefect and of the project's other storage modules."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.kernel import UserError, atomic_write_bytes, cache_root

log = logging.getLogger("trainflow.store")

SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"),
           "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}
#: The lease object of a run on a store.
LEASE_KEY = ".lease"

def is_url(location: Any) -> bool:
    """A store URL (``s3://bucket/x``), not a local path."""
    return "://" in str(location)


class StoreUnreachable(RuntimeError):
    """The store does not answer (no connection, a timeout): not bad input, so exit 1."""


def unreachable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a failure to reach the store at all."""
    while exc is not None:
        if any(c.__name__ in ("ConnectionError", "TimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                              "ConnectTimeoutError", "ReadTimeoutError") for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def store_error(url: str, exc: BaseException) -> Exception:
    """The one-line error for a store that refuses us (no bucket, no or refused credentials: a
    UserError) or does not answer (StoreUnreachable)."""
    text = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    if unreachable(exc):
        return StoreUnreachable(f"the store at {url} is unreachable ({text}); rerun when it is back")
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


def chunk_of(key: str) -> int:
    """``checkpoint-3.ab12cd34ef56.pt`` -> 3 (0 for other names)."""
    try:
        return int(key.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return 0


# --- the lease: one writer per run, across machines ----------------------------------------------


class LeaseLost(RuntimeError):
    """This process no longer holds the run's lease: another may own the run. Not bad input
    (exit 1), and never retried: a retry could not get the lease back."""


#: The lease's lifetime in seconds without a renewal (documented in docs/storage.md).
LEASE_SECONDS = "TRAINFLOW_LEASE_SECONDS"


def lease_seconds() -> float:
    """``$TRAINFLOW_LEASE_SECONDS``, else 60: how long a holder that stopped renewing (dead,
    stopped, cut off) keeps other machines off the run."""
    try:
        return max(float(os.environ.get(LEASE_SECONDS, "60")), 3.0)
    except ValueError:
        raise UserError(f"${LEASE_SECONDS} must be a number of seconds (got {os.environ[LEASE_SECONDS]!r})") from None


@functools.cache
def boot_id() -> str | None:
    """This machine's identity for this boot (Linux), so a lease's pid is only judged where it lives."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def dead_here(held: dict[str, Any]) -> bool:
    """A lease written on this machine, in this boot, by a process that no longer exists: a
    SIGKILLed run, rerun at once, need not wait for its lease to expire."""
    if boot_id() is None or held.get("boot") != boot_id() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class Lease:
    """Exclusive hold of a run on a store, across machines: the object ``<run>/.lease``.

    Claimed with a create-only write; renewed every ``ttl / 3`` s by compare-and-swap
    (``If-Match`` on its ETag). A holder that died stops blocking once its ``expires`` passes, and
    a claimant takes an expired lease over by compare-and-swap too, so of two claimants one wins.
    :meth:`check` fences every write: the lease must not have run out by this clock and must
    still carry this holder's token on the store; once lost, it is lost for good. Expiry is
    judged by the claimant's clock: machines must agree within seconds (NTP).

    A rank of a multi-process chunk writes under its launcher's lease: :meth:`follow` checks the
    same token without renewing it."""

    def __init__(self, remote: Remote, ttl: float | None = None, token: str | None = None):
        self.remote, self.ttl = remote, ttl or lease_seconds()
        self.token, self.tag, self.lost, self.failing = token or uuid.uuid4().hex, None, None, None
        self.expires = 0.0  # when the lease this holder last wrote runs out (this clock)
        self.stop = threading.Event()
        self.renews = token is None

    @classmethod
    def follow(cls, remote: Remote, token: str) -> Lease:
        """The lease another process of this run holds and renews, as ``token`` names it."""
        lease = cls(remote, token=token)
        lease.expires = float("inf")  # judged by the store's copy (check)
        return lease

    def body(self) -> bytes:
        expires = time.time() + self.ttl
        return json.dumps({"token": self.token, "host": socket.gethostname(), "boot": boot_id(), "pid": os.getpid(),
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
        threading.Thread(target=self.renew, name="trainflow-lease", daemon=True).start()
        return self

    def renew(self) -> None:
        """Every ``ttl / 3`` s, move the expiry on by compare-and-swap. A failed write is
        retried each second while the lease lasts; it is lost once another holds it or it expired."""
        while not self.stop.wait(self.ttl / 3 if self.failing is None else 1.0):
            if self.lost is not None:
                return
            try:
                if self.write(IfMatch=self.tag):
                    self.failing = None
                else:  # refused: taken over, unless the lease is still ours (then retry)
                    ours = self.holder()[0].get("token") == self.token
                    self.failing = "the renewal was refused" if ours else "the lease was taken over"
            except Exception as exc:  # noqa: BLE001 - the store may be back in a moment
                self.failing = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if self.failing is not None and (self.failing == "the lease was taken over" or time.time() + 5 >= self.expires):
                self.lose(self.failing)
                return

    def lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.error("lost the lease on %s (%s); this process writes nothing more to that run", self.remote.url, why)

    def check(self) -> None:
        """Fence a write: raise LeaseLost unless this lease still holds the run, now."""
        if self.lost is None and time.time() >= self.expires:
            self.lose("it ran out before this write (the process was stopped or the store unreachable)")
        if self.lost is None:
            held, _ = self.holder()
            if held.get("token") != self.token:
                self.lose("the lease was taken over")
            elif float(held.get("expires", 0)) <= time.time():
                self.lose("it expired")
        if self.lost is not None:
            raise LeaseLost(f"lost the lease on {self.remote.url} ({self.lost}); another process may own the run, "
                            f"so this one wrote nothing more; rerun the same command to resume from the run's "
                            f"latest checkpoint")

    def release(self) -> None:
        self.stop.set()
        try:
            if self.renews and self.lost is None and self.holder()[0].get("token") == self.token:
                self.remote.delete(LEASE_KEY)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the lease on %s (%s); it expires within %.0f s", self.remote.url, exc, self.ttl)



# --- local copies of what is on a store ---------------------------------------------------------


def fetch_data(url: str) -> Path:
    """A local copy of the data at ``url`` (a file, or a folder), fetched again when the
    store's copy changes (a file's ETag or size; a folder's keys and their ETags)."""
    remote = Remote(url)
    try:
        info = remote.fs.info(remote.root)
        # A folder has no ETag of its own: its listing (one LIST per 1 000 keys) is its version.
        listing = remote.listed() if info.get("type") == "directory" else None
    except FileNotFoundError:
        raise UserError(f"data {url} does not exist; pass --data to a file or folder on the store") from None
    except Exception as exc:  # noqa: BLE001
        raise store_error(url, exc) from None
    version = json.dumps([url, info.get("ETag"), info.get("size"), listing], default=str, sort_keys=True)
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
