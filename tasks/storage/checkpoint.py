"""Checkpoint I/O: atomic writes, verified reads, RNG capture. Deliberately free of Prefect.

A checkpoint is two files in ``checkpoints/``:

- ``checkpoint-<k>.pt``: the tutorial's dict (``model``, ``epoch``, ``model_state_dict``,
  ``optimizer_state_dict``, ``cost``, ``description``) plus what exact resume needs. It loads
  with plain ``torch.load(path)`` (``weights_only=True``), so the tutorial's resume code works.
- ``checkpoint-<k>.json``: the manifest, written *after* the ``.pt`` is safely in place:
  sha256 and size of the ``.pt``, epoch, config fingerprint. A ``.pt`` without a matching
  manifest is treated as absent (the write did not finish), like torchtitan's metadata rule.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch

from tasks.kernel import atomic_write_bytes, sha256_file  # noqa: F401 - sha256_file: the files' hash, as manifests hold it
from tasks.storage.records import Manifest

log = logging.getLogger("trainflow.checkpoint")

#: Keys every checkpoint must carry (the tutorial's, then ours).
REQUIRED_KEYS = frozenset(
    {
        "model", "epoch", "model_state_dict", "optimizer_state_dict", "cost", "description",
        "chunk", "fingerprint", "rng", "history", "format",
    }
)
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint file is missing, damaged, or belongs to another run."""


def torch_bytes(obj: Any) -> bytes:
    """Serialise ``obj`` with ``torch.save`` into memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(path: Path, obj: Any) -> str:
    """``torch.save`` atomically; returns the sha256 of the written bytes."""
    data = torch_bytes(obj)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


# --- RNG state -----------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Torch CPU (and CUDA) generator states as tensors, which ``weights_only`` loads accept."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (CUDA only when both sides have it)."""
    # Generator states are CPU byte tensors; a checkpoint loaded with map_location="cuda" has
    # moved them to the GPU, and torch.set_rng_state refuses those.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- Checkpoints ---------------------------------------------------------------------------


def checkpoint_path(folder: Path, chunk: int) -> Path:
    """Path of chunk ``chunk``'s checkpoint (1-based, as in the tutorial)."""
    return Path(folder) / f"checkpoint-{chunk}.pt"


def manifest_path(ckpt: Path) -> Path:
    """The manifest that vouches for ``ckpt``."""
    return ckpt.with_suffix(".json")


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """``payload`` serialised, after checking it carries every required key."""
    missing = REQUIRED_KEYS - payload.keys()
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    return torch_bytes(payload)


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` as ``checkpoint-<payload['chunk']>.pt`` plus its manifest.

    Order matters: the ``.pt`` is fsynced and renamed into place first, then the manifest;
    a kill in between leaves a ``.pt`` without manifest, which readers ignore.
    """
    data = checkpoint_bytes(payload)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, int(payload["chunk"]))
    atomic_write_bytes(path, data)
    atomic_write_bytes(manifest_path(path), Manifest.of(path.name, data, payload).json_bytes())
    return path


def read_manifest(ckpt: Path) -> Manifest:
    """The manifest of ``ckpt``; CheckpointError when it is absent or unreadable."""
    mpath = manifest_path(Path(ckpt))
    try:
        return Manifest.model_validate_json(mpath.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{Path(ckpt).name}: no manifest {mpath.name} (write did not finish)") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{Path(ckpt).name}: unreadable manifest ({str(exc).splitlines()[0]})") from None


def load_checkpoint(
    path: Path, fingerprint: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read and verify one checkpoint: manifest present, sha256 and size match, keys complete,
    made by the same config (``fingerprint``). Raises :class:`CheckpointError` otherwise."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: its bytes are missing (the manifest commits an absent file)") from None
    except OSError as exc:
        raise CheckpointError(f"{path.name}: unreadable ({exc})") from None
    return verified_payload(path.name, manifest, data, fingerprint, map_location)


def foreign(name: str, manifest: Manifest, fingerprint: str | None) -> None:
    """CheckpointError when ``manifest`` belongs to another run (told without reading the bytes)."""
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise CheckpointError(f"{name}: its manifest belongs to another config/data (fingerprint "
                              f"{manifest.fingerprint[:12]}, this run {fingerprint[:12]})")


def verified_payload(name: str, manifest: Manifest, data: bytes, fingerprint: str | None = None,
                     map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload in ``data`` if it is what ``manifest`` commits (size, sha256, and the chunk,
    epoch and fingerprint it names), loads with ``weights_only=True``, has every key and was
    made by ``fingerprint``; else CheckpointError."""
    foreign(name, manifest, fingerprint)
    if len(data) != manifest.bytes:
        raise CheckpointError(f"{name}: {len(data)} bytes, manifest says {manifest.bytes} (truncated?)")
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise CheckpointError(f"{name}: sha256 mismatch (file damaged)")
    try:
        # weights_only=True: a checkpoint is data, never code (a malicious pickle is refused).
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a valid checkpoint"
        raise CheckpointError(f"{name}: not loadable with weights_only=True ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{name}: payload is {type(payload).__name__}, not a dict")
    missing = REQUIRED_KEYS - payload.keys()
    if missing:
        raise CheckpointError(f"{name}: missing keys {sorted(missing)}")
    if fingerprint is not None and payload["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{name}: made by another config/data (fingerprint {payload['fingerprint'][:12]}, "
            f"this run {fingerprint[:12]})"
        )
    if (why := manifest.agrees_with(payload)) is not None:  # e.g. an older checkpoint under a newer name
        raise CheckpointError(f"{name}: {why}")
    return payload


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """All ``checkpoint-<k>.pt`` files in ``folder`` as ``(k, path)``, newest (highest k) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def candidates(folder: Path) -> list[Path]:
    """Every checkpoint a ``.pt`` or a manifest names, newest (highest k) first."""
    chunks = {int(m.group(1)) for p in (Path(folder).iterdir() if Path(folder).is_dir() else ())
              if (m := re.match(r"^checkpoint-(\d+)\.(pt|json)$", p.name))}
    return [checkpoint_path(folder, k) for k in sorted(chunks, reverse=True)]


@dataclass(frozen=True)
class Resume:
    """The newest valid checkpoint and what was skipped to find it."""

    path: PurePosixPath | Path | None
    payload: dict[str, Any] | None
    rejected: tuple[str, ...]


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged checkpoint (and its manifest) aside into ``quarantine/``; never delete."""
    qdir = path.parent / "quarantine"
    qdir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    moved = qdir / f"{path.stem}.{stamp}{path.suffix}"
    if path.exists():
        shutil.move(str(path), moved)
    m = manifest_path(path)
    if m.exists():
        shutil.move(str(m), qdir / f"{m.stem}.{stamp}.json")
    (qdir / f"{path.stem}.{stamp}.reason.txt").write_text(reason + "\n")
    return moved


def latest_valid(
    folder: Path,
    fingerprint: str,
    map_location: str | torch.device = "cpu",
    move_aside: bool = True,
    warn: Callable[..., Any] = log.warning,
) -> Resume:
    """Newest checkpoint in ``folder`` that verifies; damaged newer ones are reported through
    ``warn`` (pass a run's logger so it reaches the Prefect UI) and moved to ``quarantine/``
    together with their manifest (a manifest whose ``.pt`` is gone too). A ``.pt`` whose
    manifest never got written is left in place (the next save of that chunk overwrites it
    atomically)."""
    rejected: list[str] = []
    for path in candidates(folder):
        try:
            return Resume(path, load_checkpoint(path, fingerprint, map_location), tuple(rejected))
        except CheckpointError as exc:
            reason = str(exc)
            rejected.append(reason)
            if not (move_aside and manifest_path(path).exists()):
                warn("skipping checkpoint: %s", reason)
                continue
            try:
                warn("skipping damaged checkpoint: %s; moved to %s", reason, quarantine(path, reason))
            except OSError as err:  # a read-only folder: leave it where it is
                warn("skipping damaged checkpoint: %s; left in place (%s)", reason, err.strerror or err)
    return Resume(None, None, tuple(rejected))


# --- Retention -----------------------------------------------------------------------------


def retention(manifests: list[Manifest], keep_last: int, values: list[float],
              higher_is_better: bool) -> list[Manifest]:
    """The manifests (oldest first) that retention removes: all but the newest ``keep_last``
    and the best by ``values`` (the monitored metric per epoch, 0-based)."""
    newest_first = list(reversed(manifests))
    keep = {id(m) for m in newest_first[:max(keep_last, 1)]}

    def value(m: Manifest) -> float:
        return values[m.epoch] if 0 <= m.epoch < len(values) else float("nan")

    scored = [m for m in newest_first if math.isfinite(value(m))]
    if scored:
        keep.add(id((max if higher_is_better else min)(scored, key=value)))
    return [m for m in newest_first if id(m) not in keep]


class Once:
    """A ``warn`` that says each message once: every chunk looks for the latest valid
    checkpoint again, and a problem that stays (a .pt without manifest, a damaged checkpoint in
    a read-only folder) is news once per run."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def wrap(self, warn: Callable[..., Any]) -> Callable[..., Any]:
        def once(message: str, *args: Any) -> None:
            if (text := message % args) not in self.said:
                self.said.add(text)
                warn("%s", text)
        return once


class LocalCheckpoints:
    """``checkpoint-<k>.pt`` + manifest in a local folder: temp file, fsync, rename, fsync of
    the folder, the manifest last. The object-store twin is :class:`tasks.storage.store.ObjectCheckpoints`."""

    def __init__(self, folder: Path):
        self.folder, self.once = Path(folder), Once()

    def save(self, payload: dict[str, Any]) -> PurePosixPath:
        return PurePosixPath(save_checkpoint(self.folder, payload).name)

    def latest_valid(self, fingerprint: str, map_location: Any = "cpu", warn: Callable[..., Any] = log.warning) -> Resume:
        found = latest_valid(self.folder, fingerprint, map_location=map_location, warn=self.once.wrap(warn))
        return Resume(PurePosixPath(found.path.name) if found.path else None, found.payload, found.rejected)

    def manifests(self) -> list[Manifest]:
        """Committed checkpoints' manifests, oldest first."""
        found = []
        for _, path in list_checkpoints(self.folder):
            try:
                found.append(read_manifest(path))
            except CheckpointError:
                continue
        return sorted(found, key=lambda m: m.position)

    def load(self, name: str, fingerprint: str | None = None) -> dict[str, Any]:
        return load_checkpoint(self.folder / name, fingerprint)

    def prune(self, keep_last: int | None, values: list[float], higher_is_better: bool) -> list[str]:
        """Apply :func:`retention`; call it only once the new checkpoint is safely written."""
        if keep_last is None:
            return []
        removed = [m.file for m in retention(self.manifests(), keep_last, values, higher_is_better)]
        for name in removed:
            manifest_path(self.folder / name).unlink(missing_ok=True)  # manifest first: a half-pruned pair reads as absent
            (self.folder / name).unlink(missing_ok=True)
        return removed
