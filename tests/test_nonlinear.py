"""The nonlinear job: committed data, tutorial fidelity, and the accuracy goal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.jobs.nonlinear import CSV_PATH, CustomDataset, CustomModel, generate_csv_text, load
from tests.conftest import run_cli


def test_committed_csv_is_what_the_generator_makes() -> None:
    assert CSV_PATH.read_text() == generate_csv_text()
    rows = CSV_PATH.read_text().splitlines()[1:]
    xs = [float(r.split(",")[0]) for r in rows]
    assert len(rows) == 200 and xs[0] == -10.0 and xs[-1] == 9.9
    for r in rows:
        x, y = map(float, r.split(","))
        assert 0.01 - 0.005 <= y - (3.1 * x * x - 1.7 * x) <= 0.99 + 0.005


def test_features_match_the_tutorial_dataset() -> None:
    ours, tutorial = load(CSV_PATH).pool, CustomDataset(CSV_PATH)
    for i in (0, 57, 199):
        x, y = tutorial[i]
        assert torch.equal(ours.x[i], x) and torch.equal(ours.y[i], y)


def test_state_dict_keys_are_the_tutorials() -> None:
    assert list(CustomModel().state_dict()) == ["layer.weight", "layer.bias"]


@pytest.mark.slow
def test_default_run_fits_the_curve(prefect_api: str, tmp_path: Path) -> None:
    """The full default recipe: 10 000 epochs, 10 checkpoints, near the least-squares optimum."""
    proc = run_cli(["--job", "nonlinear", "--artifacts-dir", str(tmp_path)], prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "nonlinear").glob("run-*")  # not the `latest` pointer
    m = json.loads((run_dir / "metrics.json").read_text())
    assert abs(m["weights"][0] - 3.1) < 0.05 and abs(m["weights"][1] + 1.7) < 0.05
    assert m["test_mse_over_optimum"] <= 1.10
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == sorted(f"checkpoint-{k}.pt" for k in range(1, 11))
    split = json.loads((run_dir / "split.json").read_text())["sizes"]
    assert split == {"train": 160, "val": 20, "test": 20}
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 10_001 and history[0].startswith("epoch,train_loss")
    # The tutorial's own loading code works on the outputs.
    model = torch.load(run_dir / "model.pt", weights_only=False)  # the explicit full-model load
    sd = CustomModel()
    sd.load_state_dict(torch.load(run_dir / "model_state_dict.pt"))
    x = torch.FloatTensor([[1, 1], [25, 5], [121, 11]])
    with torch.no_grad():
        assert torch.equal(model(x), sd(x))
        assert torch.allclose(model(x).flatten(), torch.tensor([1.9154, 69.4928, 356.8351]), atol=0.5)


def test_train_epoch_fast_sgd_step_is_bit_identical_to_torch_optim() -> None:
    """train_epoch's plain-SGD step (no torch.optim wrappers) gives exactly what
    ``optimizer.step()`` gives, and is not used where SGD.step would do anything else."""
    from tasks.jobs.spec import Tensors
    from tasks.training import epoch_order, plain_sgd_step, train_epoch

    data = load(CSV_PATH).pool
    train = Tensors(data.x[:160], data.y[:160])
    torch.manual_seed(3)
    ours, theirs = CustomModel(), CustomModel()
    theirs.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    opt_ours, opt_theirs = (torch.optim.SGD(m.parameters(), lr=1e-3) for m in (ours, theirs))
    assert plain_sgd_step(opt_ours) is not None
    loss_fn = torch.nn.MSELoss()
    for epoch in range(20):
        order = epoch_order(0, epoch, 160)
        train_epoch(ours, opt_ours, None, loss_fn, train, order, 16)
        for b in range(10):  # the reference: torch.optim's own step on the same batches
            idx = order[b * 16 : (b + 1) * 16]
            opt_theirs.zero_grad()
            loss_fn(theirs(train.x[idx]), train.y[idx]).backward()
            opt_theirs.step()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert all(ours.state_dict()[k].ne(v).all() for k, v in start.items())  # it did train

    params = list(CustomModel().parameters())
    assert plain_sgd_step(torch.optim.SGD(params, lr=0.1, momentum=0.9)) is None
    assert plain_sgd_step(torch.optim.SGD(params, lr=0.1, weight_decay=1e-4)) is None
    assert plain_sgd_step(torch.optim.SGD(params, lr=0.1, foreach=True)) is None
    assert plain_sgd_step(torch.optim.Adam(params, lr=0.1)) is None
    hooked = torch.optim.SGD(params, lr=0.1)
    hooked.register_step_post_hook(lambda *a: None)
    assert plain_sgd_step(hooked) is None
    scheduled = torch.optim.SGD(params, lr=0.1)
    torch.optim.lr_scheduler.StepLR(scheduled, step_size=1)  # wraps scheduled.step
    assert plain_sgd_step(scheduled) is None
