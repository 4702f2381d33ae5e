"""Saving the trained model the tutorial's two ways: whole model and state_dict."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.checkpoint import atomic_torch_save
from tasks.evaluation import final_trainer
from tasks.jobs.spec import TrainConfig
from tasks.policy import NO_RETRY_ON_USER_ERROR


def save_model_files(cfg: TrainConfig, run_dir: Path, fingerprint: str) -> dict[str, str]:
    """Write ``model.pt`` (``torch.save(model)``, needs this project's code to load) and
    ``model_state_dict.pt`` (plain tensors, loads with ``weights_only=True``)."""
    trainer = final_trainer(cfg, run_dir, fingerprint)
    model = trainer.model.cpu().eval()  # CPU files load anywhere; map_location moves them back
    run_dir = Path(run_dir)
    atomic_torch_save(run_dir / "model.pt", model)
    atomic_torch_save(run_dir / "model_state_dict.pt", model.state_dict())
    return {"model": str(run_dir / "model.pt"), "state_dict": str(run_dir / "model_state_dict.pt")}


@task(name="save_model", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=NO_RETRY_ON_USER_ERROR)
def save_model(cfg: TrainConfig, run_dir: Path, fingerprint: str) -> dict[str, str]:
    """Prefect task: write model.pt and model_state_dict.pt."""
    return save_model_files(cfg, run_dir, fingerprint)
