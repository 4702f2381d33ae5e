"""Checkpoint I/O: atomic writes, verification on load, fallback past damaged files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import tasks.storage.checkpoint as ck
from tasks.storage.records import Manifest
from tests.helpers import FP
from tests.helpers import checkpoint_payload as payload


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for k in (1, 2, 3):
        ck.save_checkpoint(tmp_path, payload(k))
    return tmp_path


def test_roundtrip_and_manifest(folder: Path) -> None:
    got = ck.latest_valid(folder, FP)
    assert got.path.name == "checkpoint-3.pt" and got.rejected == ()
    assert torch.equal(got.payload["model_state_dict"]["w"], torch.full((2,), 3.0))
    manifest = json.loads((folder / "checkpoint-3.json").read_text())
    assert manifest["sha256"] == ck.sha256_file(folder / "checkpoint-3.pt") and manifest["epoch"] == 29
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def zero(p: Path) -> None:
    p.write_bytes(b"")


def bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, zero, bitflip], ids=["truncated", "zero-length", "bit-flipped"])
def test_damaged_newest_is_skipped_and_moved_aside(folder: Path, damage, caplog) -> None:
    damage(folder / "checkpoint-3.pt")
    got = ck.latest_valid(folder, FP)
    assert got.path.name == "checkpoint-2.pt"
    assert len(got.rejected) == 1 and "checkpoint-3.pt" in got.rejected[0]
    assert not (folder / "checkpoint-3.pt").exists()
    moved = list((folder / "quarantine").glob("checkpoint-3.*.pt"))
    assert len(moved) == 1  # moved aside, not deleted
    assert sum("checkpoint-3.pt" in r.getMessage() for r in caplog.records) == 1  # reported once
    assert ck.latest_valid(folder, FP).rejected == ()  # and not again


def commit(path: Path, chunk: int) -> None:
    """A manifest that vouches for whatever bytes ``path`` holds (as an attacker could write)."""
    data = path.read_bytes()
    manifest = Manifest(file=path.name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), chunk=chunk,
                        epoch=10 * chunk - 1, fingerprint=FP, cost=0.0)
    path.with_suffix(".json").write_bytes(manifest.json_bytes())


def test_wrong_keys_and_other_config_are_rejected(folder: Path) -> None:
    # Valid torch file with a matching manifest, but not our format / not our run.
    bad = {"model_state_dict": {}}
    ck.atomic_torch_save(folder / "checkpoint-4.pt", bad)
    commit(folder / "checkpoint-4.pt", 4)
    ck.save_checkpoint(folder, payload(5, fingerprint="0" * 64))
    got = ck.latest_valid(folder, FP)
    assert got.path.name == "checkpoint-3.pt"
    assert any("another config" in r for r in got.rejected) and any("missing keys" in r for r in got.rejected)


def test_pt_without_manifest_counts_as_unfinished(folder: Path) -> None:
    (folder / "checkpoint-3.json").unlink()  # killed between the two renames
    got = ck.latest_valid(folder, FP)
    assert got.path.name == "checkpoint-2.pt"
    assert (folder / "checkpoint-3.pt").exists()  # left for the next save to replace


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(folder: Path, tmp_path: Path) -> None:
    Evil.marker = tmp_path / "pwned"
    evil = folder / "checkpoint-9.pt"
    with open(evil, "wb") as f:
        torch.save({"model_state_dict": Evil()}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    commit(evil, 9)
    got = ck.latest_valid(folder, FP)
    assert got.path.name == "checkpoint-3.pt"
    assert any("weights_only" in r for r in got.rejected)
    assert not Evil.marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(folder / "quarantine" / next(p.name for p in (folder / "quarantine").glob("checkpoint-9.*.pt")), weights_only=False)
    assert Evil.marker.exists()


def test_failed_write_leaves_previous_checkpoint_intact(folder: Path, monkeypatch) -> None:
    before = (folder / "checkpoint-3.pt").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        ck.save_checkpoint(folder, {**payload(3), "cost": 9.0})
    monkeypatch.undo()
    assert (folder / "checkpoint-3.pt").read_bytes() == before
    assert ck.latest_valid(folder, FP).path.name == "checkpoint-3.pt"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_rng_roundtrip() -> None:
    state = ck.capture_rng()
    a = torch.rand(3)
    ck.restore_rng(state)
    assert torch.equal(torch.rand(3), a)
