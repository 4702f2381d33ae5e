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
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

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


def fsync_dir(folder: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The temp file is in the same folder (a rename is atomic only within one file system) and is
    created by a plain open(), so it gets the usual mode (mkstemp's 0600 would hide files from the
    other users of shared storage); its random name keeps concurrent writers apart."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")  # TEMP_NAME
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


#: The temp files of :func:`atomic_write_bytes`: debris once the writer was killed mid-write.
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def remove_debris(folders: list[Path]) -> list[Path]:
    """Delete the temp files that killed writers left in ``folders``. Call it only while holding
    the folder's lock: then no live writer owns one of them."""
    removed = []
    for folder in folders:
        for path in Path(folder).glob(".*.tmp"):
            if TEMP_NAME.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write a UTF-8 text file (JSON, CSV, markdown)."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


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


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def manifest_for(name: str, data: bytes, payload: dict[str, Any]) -> dict[str, Any]:
    """The manifest that commits checkpoint ``name`` holding ``data`` (``payload`` serialised)."""
    return {
        "file": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "chunk": int(payload["chunk"]),
        "epoch": int(payload["epoch"]),
        "batch": int(payload.get("batch", 0)),  # batches of the next epoch done (a stop inside it)
        "fingerprint": payload["fingerprint"],
        "cost": float(payload["cost"]),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
    atomic_write_json(manifest_path(path), manifest_for(path.name, data, payload))
    return path


def json_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of ``ckpt`` as a dict ({} when absent or unreadable)."""
    try:
        return json.loads(manifest_path(Path(ckpt)).read_text())
    except (OSError, ValueError):
        return {}


def load_checkpoint(
    path: Path, fingerprint: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read and verify one checkpoint: manifest present, sha256 and size match, keys complete,
    made by the same config (``fingerprint``). Raises :class:`CheckpointError` otherwise."""
    path = Path(path)
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no manifest {mpath.name} (write did not finish)") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path.name}: unreadable manifest ({exc})") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path.name}: unreadable ({exc})") from None
    return verified_payload(path.name, manifest, data, fingerprint, map_location)


def verified_payload(name: str, manifest: dict[str, Any], data: bytes, fingerprint: str | None = None,
                     map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload in ``data`` if it is what ``manifest`` commits (size, sha256), loads with
    ``weights_only=True``, has every key and was made by ``fingerprint``; else CheckpointError."""
    if fingerprint is not None and manifest.get("fingerprint", fingerprint) != fingerprint:
        raise CheckpointError(f"{name}: its manifest belongs to another config/data (fingerprint "
                              f"{str(manifest.get('fingerprint'))[:12]}, this run {fingerprint[:12]})")
    if len(data) != manifest.get("bytes"):
        raise CheckpointError(f"{name}: {len(data)} bytes, manifest says {manifest.get('bytes')} (truncated?)")
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
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


@dataclass(frozen=True)
class Resume:
    """The newest valid checkpoint and what was skipped to find it."""

    path: Path | None
    payload: dict[str, Any] | None
    rejected: tuple[str, ...]


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged checkpoint (and its manifest) aside into ``quarantine/``; never delete."""
    qdir = path.parent / "quarantine"
    qdir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    moved = qdir / f"{path.stem}.{stamp}{path.suffix}"
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
    """Newest checkpoint in ``folder`` that verifies; damaged newer ones are reported once
    through ``warn`` (pass a run's logger so it reaches the Prefect UI) and moved to
    ``quarantine/``. A ``.pt`` whose manifest never got written is left in place (the next
    save of that chunk overwrites it atomically)."""
    rejected: list[str] = []
    for _, path in list_checkpoints(folder):
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


def retention(manifests: list[dict[str, Any]], keep_last: int, values: list[float],
              higher_is_better: bool) -> list[dict[str, Any]]:
    """The manifests (oldest epoch first) that retention removes: all but the newest
    ``keep_last`` and the best by ``values`` (the monitored metric per epoch, 0-based)."""
    newest_first = list(reversed(manifests))
    keep = {id(m) for m in newest_first[:max(keep_last, 1)]}

    def value(m: dict[str, Any]) -> float:
        epoch = int(m.get("epoch", -1))
        return values[epoch] if 0 <= epoch < len(values) else float("nan")

    scored = [m for m in newest_first if math.isfinite(value(m))]
    if scored:
        keep.add(id((max if higher_is_better else min)(scored, key=value)))
    return [m for m in newest_first if id(m) not in keep]


def prune_checkpoints(folder: Path, keep_last: int | None, values: list[float], higher_is_better: bool) -> list[Path]:
    """Apply :func:`retention` to ``folder``; call it only once the new checkpoint is safely
    written. Never removes the newest or the best. Returns what was removed."""
    if keep_last is None:
        return []
    found = [{**json_manifest(path), "path": path} for _, path in reversed(list_checkpoints(folder))]
    removed = [m["path"] for m in retention(found, keep_last, values, higher_is_better)]
    for path in removed:
        manifest_path(path).unlink(missing_ok=True)  # manifest first: a half-pruned pair reads as absent
        path.unlink(missing_ok=True)
    return removed
