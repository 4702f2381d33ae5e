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
    from tasks.training import PlainSGD, epoch_order, train_epoch

    data = load(CSV_PATH).pool
    train = Tensors(data.x[:160], data.y[:160])
    torch.manual_seed(3)
    ours, theirs = CustomModel(), CustomModel()
    theirs.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    opt_ours, opt_theirs = (torch.optim.SGD(m.parameters(), lr=1e-3) for m in (ours, theirs))
    assert PlainSGD.wrap(opt_ours) is not None
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
    for kwargs in ({"foreach": True}, {"fused": True}, {"maximize": True}, {"lr": torch.tensor(0.1)}):
        assert PlainSGD.wrap(torch.optim.SGD(params, **{"lr": 0.1, **kwargs})) is None, kwargs
    assert PlainSGD.wrap(torch.optim.Adam(params, lr=0.1)) is None
    hooked = torch.optim.SGD(params, lr=0.1)
    hooked.register_step_post_hook(lambda *a: None)
    assert PlainSGD.wrap(hooked) is None
    scheduled = torch.optim.SGD(params, lr=0.1)
    torch.optim.lr_scheduler.StepLR(scheduled, step_size=1)  # wraps scheduled.step
    assert PlainSGD.wrap(scheduled) is None


@pytest.mark.parametrize("options", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
                                     {"momentum": 0.5, "dampening": 0.1, "weight_decay": 1e-2}])
def test_plain_sgd_with_momentum_is_bit_identical_to_sgd_step(options: dict) -> None:
    """With momentum, weight decay, Nesterov or dampening, and with the momentum buffers scaled
    ahead of the step (as sharded training does while the other shards finish) or inside it:
    the same parameters and optimizer state as ``SGD.step``, bit for bit; an unused parameter
    (no gradient) is left alone by both."""
    from torch import nn

    from tasks.training import PlainSGD

    torch.manual_seed(0)
    ours, theirs = (nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 1), nn.Linear(3, 3)]) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    opt_ours, opt_theirs = (torch.optim.SGD(m.parameters(), lr=0.05, foreach=False, **options) for m in (ours, theirs))
    plain = PlainSGD.wrap(opt_ours)
    assert plain is not None
    for step in range(30):
        x, y = torch.randn(16, 5), torch.randn(16, 1)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model[1](torch.tanh(model[0](x))), y).backward()  # model[2] unused
        if step % 3:
            plain.scale_momentum([p for p in ours.parameters() if p.grad is not None])
        plain.step()
        opt_theirs.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    ours_state, theirs_state = opt_ours.state_dict()["state"], opt_theirs.state_dict()["state"]
    assert ours_state.keys() == theirs_state.keys() == {0, 1, 2, 3}  # no buffer for the unused layer
    assert all(torch.equal(ours_state[k]["momentum_buffer"], theirs_state[k]["momentum_buffer"]) for k in ours_state)
