"""Saving the trained model the tutorial's two ways (whole model and state_dict), plus a
``torch.export`` program (``model.pt2``) that loads without this project's code."""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import Callable

import torch

from tasks.engine.evaluation import final_trainer
from tasks.kernel import atomic_write_bytes
from tasks.storage.checkpoint import atomic_torch_save
from tasks.storage.run import Run

log = logging.getLogger("trainflow.export")
EXPORTED_FILE = "model.pt2"


class Prepared(torch.nn.Module):
    """The job's ``prepare`` then the model: what ``model.pt2`` runs, so that it takes the data as
    the job stores it (fashion_mnist: uint8 images [N, 28, 28], 0..255), not a normalised copy that
    a user would have to reproduce exactly."""

    def __init__(self, prepare: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module):
        super().__init__()
        self.prepare, self.model = prepare, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(x))


def export_program(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """``torch.export`` the model (input: a batch like ``example``; any batch size) and
    ``torch.export.save`` it: loads with ``torch.export.load(path).module()``, with no project
    code and no pickled classes."""
    try:
        batch = torch.export.Dim("batch", min=1)
        # Plain (contiguous) weights: torch.export.save warns about channels_last ones ("No
        # complete tensor found in the group"), and the program is meant to load anywhere.
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(program, buf)
    except Exception as exc:  # noqa: BLE001 - a model torch.export cannot trace still has model.pt
        log.warning("could not export %s: %s: %s", path.name, type(exc).__name__, str(exc).splitlines()[0])
        return None
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def save_model_files(run: Run) -> dict[str, str]:
    """Write ``model.pt`` (``torch.save(model)``, needs this project's code to load) and
    ``model_state_dict.pt`` (plain tensors, loads with ``weights_only=True``)."""
    cfg, run_dir = run.cfg, run.dir
    with final_trainer(run) as trainer:
        # Stored form; two rows: a batch size export keeps dynamic. A copy: the program saves
        # its example input, and a view would save the whole training set it is cut from. A job
        # with its own step (several inputs, dict batches) has no single input to export with.
        example = trainer.train.example(2) if trainer.spec.step is None else None
    model = trainer.model.cpu().eval()  # CPU files load anywhere; map_location moves them back
    atomic_torch_save(run_dir / "model.pt", model)
    atomic_torch_save(run_dir / "model_state_dict.pt", model.state_dict())
    files = {"model": str(run_dir / "model.pt"), "state_dict": str(run_dir / "model_state_dict.pt")}
    program = Prepared(trainer.spec.prepare, model)
    if example is not None and (exported := export_program(program, example, run_dir / EXPORTED_FILE)):
        files["exported"] = exported
    if cfg.save_best and trainer.best is not None:
        best = {k: v.cpu() for k, v in trainer.best["model_state_dict"].items()}
        atomic_torch_save(run_dir / "model_best_state_dict.pt", best)
        files["best_state_dict"] = str(run_dir / "model_best_state_dict.pt")
    return files

