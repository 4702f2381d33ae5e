"""FashionMNIST: data lookup and checks on tiny real-format files, outputs, and the accuracy goal."""

from __future__ import annotations

import gzip
import re
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks.jobs.fashion_mnist as fm
from flows.train_flow import main, train_flow
from tasks.jobs.spec import UserError
from tests.benchmark import TutorialNeuralNet
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return fm.make_test_data(tmp_path_factory.mktemp("fmnist"))


def raw(folder: Path) -> Path:
    return folder / "FashionMNIST" / "raw"


def test_tiny_files_decode_and_normalise_like_torchvision(tiny: Path, tmp_path: Path) -> None:
    from torchvision import datasets, transforms

    data = fm.load(tiny)
    assert data.pool.x.shape == (600, 28, 28) and data.pool.x.dtype == torch.uint8 and data.test.x.shape == (200, 28, 28)
    # torchvision reads the extracted files; its per-sample transform is the tutorial's.
    (tmp_path / "FashionMNIST" / "raw").mkdir(parents=True)
    for f in raw(tiny).iterdir():
        (tmp_path / "FashionMNIST" / "raw" / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ds = datasets.FashionMNIST(str(tmp_path), train=False, download=False, transform=tf)
    batch = fm.prepare(data.test.x[:50])  # [50, 1, 28, 28]
    for i in range(50):
        x, y = ds[i]
        assert torch.equal(batch[i], x) and y == int(data.test.y[i])
    every_value = torch.arange(28 * 28).remainder(256).to(torch.uint8).view(1, 28, 28)  # all 256 pixel values
    assert torch.equal(fm.prepare(every_value)[0], tf(every_value[0].numpy()))


def test_lookup_order_data_folder_then_system_copy(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    assert fm.locate(tiny) == raw(tiny)
    monkeypatch.setattr(fm, "_system_dirs", lambda: [raw(tiny)])
    assert fm.locate(tmp_path / "empty", download=False) == raw(tiny)


def test_download_is_the_last_resort(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """With no local or system copy, torchvision's download fills <data>/FashionMNIST/raw."""
    import torchvision.datasets

    calls = []

    class FakeDownload:
        def __init__(self, root: str, train: bool, download: bool):
            calls.append((root, train, download))
            dest = Path(root) / "FashionMNIST" / "raw"
            dest.mkdir(parents=True, exist_ok=True)
            for f in raw(tiny).iterdir():
                (dest / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(fm, "_system_dirs", lambda: [tmp_path / "no-system-copy"])
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)
    assert fm.locate(tmp_path / "d") == raw(tmp_path / "d")
    assert calls == [(str(tmp_path / "d"), True, True), (str(tmp_path / "d"), False, True)]


def test_no_data_anywhere_says_how_to_get_it(tmp_path: Path, monkeypatch, capsys) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Name or service not known")

    monkeypatch.setattr(fm, "_system_dirs", lambda: [tmp_path / "none"])
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    code = main(["--job", "fashion_mnist", "--data", str(tmp_path / "d"), "--artifacts-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "download failed" in err and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: gzip.compress(gzip.decompress(b)[:-100]), "truncated or corrupt (header says"),
    (lambda b: gzip.compress(b"\x00\x00\x08\x07" + gzip.decompress(b)[4:]), "not an IDX file"),
])
def test_damaged_files_get_a_clear_error(damage, expected: str, tiny: Path, tmp_path: Path) -> None:
    folder = raw(tmp_path)
    folder.mkdir(parents=True)
    for f in raw(tiny).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    target = folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(UserError, match=re.escape(expected)):
        fm.load(tmp_path)


def test_lenet_state_dict_loads_into_the_tutorials_class() -> None:
    ours = fm.NeuralNet()
    theirs = TutorialNeuralNet()
    theirs.load_state_dict(ours.state_dict())
    x = fm.prepare(torch.randint(0, 255, (4, 28, 28), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x.contiguous()), atol=1e-6)


def test_lenet_computes_the_tutorials_outputs_and_gradients(monkeypatch) -> None:
    """Our forward pools before its relus: outputs and every gradient identical to the tutorial's
    bit for bit, including on flat background, where pooling windows are full of ties. Training
    on the CPU (batch-major conv1 and pool) sums conv1's gradient in another order: equal up to
    float rounding, and evaluation still gives the same bits."""
    torch.manual_seed(0)
    ours = fm.NeuralNet().to(memory_format=torch.channels_last)
    theirs = TutorialNeuralNet().to(memory_format=torch.channels_last)
    theirs.load_state_dict(ours.state_dict())
    images = torch.randint(0, 255, (64, 28, 28), dtype=torch.uint8)
    images[:, :8] = 0  # blank rows: ties, and conv outputs that are just the bias
    images[:, :, -6:] = 255
    x, y = fm.prepare(images), torch.randint(0, 10, (64,))

    def tutorial_order(x: torch.Tensor) -> torch.Tensor:  # its forward; reshape: x is channels_last
        x = F.max_pool2d(F.relu(theirs.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(theirs.conv2(x)), 2)
        x = F.relu(theirs.fc1(x.reshape(x.shape[0], -1)))
        return theirs.fc3(F.relu(theirs.fc2(x)))

    def outputs_and_grads(forward, model: nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = forward(x)
        return out, torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))

    theirs_out, theirs_grads = outputs_and_grads(tutorial_order, theirs)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs_out)
    for batch_major in (False, True):
        monkeypatch.setattr(fm.NeuralNet, "batch_major", batch_major)
        out, ours_grads = outputs_and_grads(ours, ours)
        same = (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)) if batch_major else torch.equal
        assert same(out, theirs_out)
        for (name, _), a, b in zip(ours.named_parameters(), ours_grads, theirs_grads):
            assert same(a, b), name


def train_tiny_lenet(cfg, train, shards: int, epochs: int) -> tuple[list[float], nn.Module, torch.optim.Optimizer]:
    """Train from seed 0 in batches of ``cfg.batch_size`` as a run's chunk does (one shard clock for
    all its epochs); returns each epoch's loss, the model and its optimizer."""
    from tasks import training

    torch.manual_seed(0)
    model = fm.build_model(cfg)
    opt = training.build_optimizer(cfg, model)
    clock = training.shard_clock(shards, torch.device("cpu"))
    losses = [training.train_epoch(model, opt, None, nn.CrossEntropyLoss(), train,
                                   training.epoch_order(0, epoch, len(train)), cfg.batch_size, fm.prepare, shards, clock)
              for epoch in range(epochs)]
    return losses, model, opt


def test_lenet_graph_gives_autograds_loss_and_gradients_bit_for_bit() -> None:
    """LeNet's TorchScript training graph runs autograd's kernels in its order: the same loss and
    gradients bit for bit (pool ties included), for a whole batch and a half-batch shard's scaled
    loss; anything it does not cover is left to autograd (None)."""
    torch.manual_seed(0)
    model = fm.build_model(fm.JOB.config(model="lenet"))
    params = list(model.parameters())
    images = torch.randint(0, 255, (64, 28, 28), dtype=torch.uint8)
    images[:, :8] = 0  # ties in the pools
    x, y = fm.prepare(images), torch.randint(0, 10, (64,))
    for loss_fn, scale in ((nn.CrossEntropyLoss(), 1.0), (nn.CrossEntropyLoss(), 0.5),
                           (nn.CrossEntropyLoss(ignore_index=3), 0.5)):
        loss = loss_fn(model(x), y) * scale
        expected = torch.autograd.grad(loss, params)
        got_loss, got = model.loss_and_grads(x, y, loss_fn, params, scale)
        assert torch.equal(got_loss, loss.detach())
        for (name, _), a, b in zip(model.named_parameters(), got, expected, strict=True):
            assert torch.equal(a, b), name

    ce = nn.CrossEntropyLoss()
    assert model.loss_and_grads(x, y, nn.CrossEntropyLoss(label_smoothing=0.1), params) is None
    assert model.loss_and_grads(x, y, nn.CrossEntropyLoss(weight=torch.ones(10)), params) is None
    assert model.loss_and_grads(x, y, nn.CrossEntropyLoss(reduction="sum"), params) is None
    assert model.loss_and_grads(x, y, nn.MSELoss(), params) is None
    assert model.loss_and_grads(x, y, ce, params[:-2]) is None  # fc3 frozen
    with torch.no_grad():
        assert model.loss_and_grads(x, y, ce, params) is None
    handle = model.fc2.register_forward_hook(lambda *args: None)
    assert model.loss_and_grads(x, y, ce, params) is None
    handle.remove()
    handle = params[4].register_hook(lambda grad: grad)
    assert model.loss_and_grads(x, y, ce, params) is None
    handle.remove()
    assert model.loss_and_grads(x, y, ce, params) is not None


def test_lenet_trains_to_the_same_floats_with_or_without_its_graph(tiny: Path, monkeypatch) -> None:
    """Where TorchScript fails (or is gone from a later torch), LeNet trains through autograd, with
    a warning, to the same weights bit for bit: in two shards on two threads and in one."""
    from tasks import training

    cfg = fm.JOB.config(model="lenet", optimizer="sgd", lr=0.05, momentum=0.9, schedule="constant", batch_size=32)
    training.setup_torch(cfg)
    train = fm.load(tiny).pool

    def weights(shards: int) -> dict[str, torch.Tensor]:
        return train_tiny_lenet(cfg, train, shards, epochs=2)[1].state_dict()

    monkeypatch.setattr(training, "cpu_slots", lambda: 2)
    with_graph = {shards: weights(shards) for shards in (2, 1)}

    def broken(fn):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", broken)
    fm._script.cache_clear()
    warnings = []
    monkeypatch.setattr(fm.log, "warning", lambda msg, *args: warnings.append(msg % args))
    try:
        without = {shards: weights(shards) for shards in (2, 1)}
    finally:
        fm._script.cache_clear()
    assert warnings == ["LeNet trains through autograd: TorchScript failed (RuntimeError: no TorchScript here)"]
    for shards in (2, 1):
        assert all(torch.equal(with_graph[shards][k], without[shards][k]) for k in without[shards]), shards


def test_tutorial_recipe_is_reproducible_from_the_command_line() -> None:
    from flows.train_flow import build_configs

    (cfg,) = build_configs("fashion_mnist", {"model": "lenet", "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9,
                                             "batch_size": 128, "epochs": 10, "schedule": "constant"})
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.batch_size, cfg.epochs) == ("lenet", "sgd", 1e-3, 0.9, 128, 10)


def test_lenet_trains_in_two_shards_by_default_and_batchnorm_models_in_one() -> None:
    assert fm.JOB.config(model="lenet").shards == 2
    assert fm.JOB.config().shards == 1 and fm.JOB.config(model="cnn").shards == 1
    assert fm.JOB.config(model="lenet", shards=1).shards == 1
    # One shard is how runs trained before shards existed: their identity (fingerprint) is unchanged.
    assert "shards" not in fm.JOB.config(model="lenet", shards=1).identity()
    assert fm.JOB.config(model="lenet").identity()["shards"] == 2
    with pytest.raises(UserError, match=r"cnn has bn1 \(BatchNorm2d\), so use --shards 1"):
        fm.JOB.config(model="cnn", shards=2)


def test_sharded_training_gives_the_same_floats_in_parallel_and_in_sequence(tiny: Path, monkeypatch) -> None:
    """Two shards on two threads, or one after the other (a 1-core machine, or CUDA): the same
    weights, optimizer state and losses bit for bit, over 3 epochs; and a step's gradient is the
    whole batch's up to float rounding (the gradient of a mean loss is the mean of the shards')."""
    from tasks import training

    cfg = fm.JOB.config(model="lenet", optimizer="sgd", lr=0.05, momentum=0.9, schedule="constant", batch_size=32)
    training.setup_torch(cfg)  # one intra-op thread, as in a run (the floats depend on it)
    train = fm.load(tiny).pool  # 600 images: 18 batches of 32 per epoch

    def run(shards: int, cores: int) -> tuple[list[float], dict, dict]:
        monkeypatch.setattr(training, "cpu_slots", lambda: cores)
        losses, model, opt = train_tiny_lenet(cfg, train, shards, epochs=3)
        return losses, model.state_dict(), opt.state_dict()["state"]

    parallel, in_sequence = run(2, cores=2), run(2, cores=1)
    assert parallel[0] == in_sequence[0]
    for a, b in ((parallel[1], in_sequence[1]), *((parallel[2][k], in_sequence[2][k]) for k in parallel[2])):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert parallel[0][-1] < parallel[0][0]  # it learns

    torch.manual_seed(0)
    model = fm.build_model(cfg)
    params = list(model.parameters())
    x, y = train.x[:32], train.y[:32]
    loss = training.sharded_backward(model, nn.CrossEntropyLoss(), x, y, params, 2, fm.prepare)
    sharded = [p.grad for p in params]
    whole_loss = nn.CrossEntropyLoss()(model(fm.prepare(x)), y)
    whole = torch.autograd.grad(whole_loss, params)
    assert loss.item() == pytest.approx(whole_loss.item(), rel=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), sharded, whole):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_shard_clock_keeps_whichever_way_was_faster_at_the_last_probe() -> None:
    from tasks.training import ShardClock

    pool = object()
    clock = ShardClock(pool, period=10, probe=3, max_period=40)  # type: ignore[arg-type]

    def run(steps: int, threads: float, sequence: float) -> list[bool]:
        used = []
        for _ in range(steps):
            p = clock.pool()
            used.append(p is pool)
            clock.took(threads if p is pool else sequence, p)
        return used

    # A probe: 3 steps in sequence, 3 on threads, then the faster way until the next probe.
    assert run(10, threads=1.0, sequence=2.0) == [False] * 3 + [True] * 7
    # Threads win again and again: the next probe comes 20 steps on, then 40 (max_period).
    assert run(20, threads=1.0, sequence=2.0) == [False] * 3 + [True] * 17
    assert run(40, threads=1.0, sequence=2.0) == [False] * 3 + [True] * 37
    assert run(40, threads=1.0, sequence=2.0) == [False] * 3 + [True] * 37
    # The sequence wins (load): probes every 10 steps again, each keeping the sequence.
    assert run(40, threads=3.0, sequence=2.0) == ([False] * 3 + [True] * 3 + [False] * 4) * 4
    # Threads win again: back to threads at once, and the waits grow from 10 again.
    assert run(30, threads=1.0, sequence=2.0) == [False] * 3 + [True] * 7 + [False] * 3 + [True] * 17
    assert ShardClock(None).pool() is None


def test_lenet_in_shards_resumes_bit_exact_after_an_exception_in_chunk_2(tiny: Path, prefect_api: str,
                                                                          tmp_path: Path, monkeypatch) -> None:
    from tests.conftest import assert_same_tensors, fail_once_at, state_dict

    args = {"job": "fashion_mnist", "data": str(tiny), "model": "lenet", "optimizer": "sgd", "lr": 0.05,
            "momentum": 0.9, "schedule": "constant", "batch_size": 32, "epochs": 4, "chunk_epochs": 2, "run_name": "r"}
    ref = Path(train_flow(artifacts_dir=str(tmp_path / "ref"), **args)["fashion_mnist"]["run_dir"])
    assert json.loads((ref / "config.json").read_text())["identity"]["shards"] == 2
    calls = fail_once_at(monkeypatch, 3)
    run_dir = Path(train_flow(artifacts_dir=str(tmp_path / "flaky"), **args)["fashion_mnist"]["run_dir"])
    assert calls == [0, 1, 2, 3, 2, 3]
    assert_same_tensors(state_dict(run_dir / "model_state_dict.pt"), state_dict(ref / "model_state_dict.pt"))
    for name in ("metrics.json", "history.csv"):
        assert (run_dir / name).read_text() == (ref / name).read_text(), name


def test_run_on_tiny_data_writes_metrics_and_pngs(tiny: Path, prefect_api: str, tmp_path: Path) -> None:
    result = train_flow(job="fashion_mnist", data=str(tiny), epochs=4, chunk_epochs=2, batch_size=32,
                        artifacts_dir=str(tmp_path))["fashion_mnist"]
    run_dir = Path(result["run_dir"])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test"]["rows"] == 200 and 0 <= m["test_accuracy"] <= 1
    assert list(m["per_class_accuracy"]) == list(fm.LABELS)
    cm = torch.tensor(m["confusion_matrix"]["rows_true_cols_predicted"])
    assert cm.shape == (10, 10) and int(cm.sum()) == 200
    assert abs(float(cm.diag().sum()) / 200 - m["test_accuracy"]) < 1e-9
    split = json.loads((run_dir / "split.json").read_text())
    assert split["sizes"] == {"train": 540, "val": 60, "test": 200} and split["test_source"] == "test_set"
    import matplotlib.image

    for png in ("confusion_matrix.png", "predictions.png"):
        img = matplotlib.image.imread(run_dir / png)
        assert img.shape[0] >= 400 and img.shape[1] >= 400
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["checkpoint-1.pt", "checkpoint-2.pt"]


@pytest.mark.slow
def test_default_config_reaches_the_accuracy_goal_on_real_data(prefect_api: str, tmp_path: Path) -> None:
    """The real FashionMNIST (CI installs Debian's dataset-fashion-mnist), the default config,
    10 epochs on CPU: at least 91.0% on the official 10 000-image test set."""
    data = fm.locate(fm.DATA_DIR, download=True)  # fails loudly (no skip) when the data is missing
    assert data.exists()
    proc = run_cli(["--job", "fashion_mnist", "--artifacts-dir", str(tmp_path)], prefect_api, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "fashion_mnist").iterdir() if p.name.startswith("run-")]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test"]["rows"] == 10_000 and m["epochs"] == 10
    assert m["test_accuracy"] >= 0.910, m["test_accuracy"]
    assert len(list((run_dir / "checkpoints").glob("checkpoint-*.pt"))) == 5


def test_predict_classifies_test_images_by_index(tiny: Path, prefect_api: str, tmp_path: Path) -> None:
    from flows.predict_flow import predict

    result = train_flow(job="fashion_mnist", data=str(tiny), epochs=2, chunk_epochs=2, batch_size=32,
                        artifacts_dir=str(tmp_path))["fashion_mnist"]
    rows = predict(result["run_dir"], {"index": [0, 5]})
    true = fm.load(tiny).test.y
    assert [r["input"] for r in rows] == [f"test image {i} (true: {fm.LABELS[int(true[i])]})" for i in (0, 5)]
    assert all(r["text"].split(": ")[-1].split(" (")[0] in fm.LABELS for r in rows)
    with pytest.raises(UserError, match="--index 200 is out of range"):
        predict(result["run_dir"], {"index": [200]})
