"""FashionMNIST: data lookup and checks on tiny real-format files, outputs, and the accuracy goal."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks.jobs.fashion_mnist as fm
from flows.train_flow import main, train_flow
from tasks.engine.rows import TensorRows, epoch_order
from tasks.kernel import UserError
from tests.helpers import run_cli, write_tiny_fashion_mnist


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


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
    monkeypatch.setattr(fm, "DATA_DIR", tmp_path / "empty")  # the default data folder, without the files
    assert fm.locate(tmp_path / "empty", download=False) == raw(tiny)


def test_a_data_folder_the_user_names_is_used_as_given(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A typo in --data is bad input, never a silent run on the system copy (which exists here)."""
    from flows.train_flow import main

    monkeypatch.setattr(fm, "_system_dirs", lambda: [raw(tiny)])
    code = main(["--job", "fashion_mnist", "--data", str(tmp_path / "typo"), "--artifacts-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"error: --data {tmp_path / 'typo'} does not exist; pass the folder"), err
    assert not (tmp_path / "a").exists()
    (tmp_path / "named").mkdir()  # exists, holds no files: not the system copy either
    with pytest.raises(fm.UserError, match="FashionMNIST not found"):
        fm.locate(tmp_path / "named", download=False)


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
    (tmp_path / "d").mkdir()
    assert fm.locate(tmp_path / "d") == raw(tmp_path / "d")
    assert calls == [(str(tmp_path / "d"), True, True), (str(tmp_path / "d"), False, True)]


def test_no_data_anywhere_says_how_to_get_it(tmp_path: Path, monkeypatch, capsys) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Name or service not known")

    monkeypatch.setattr(fm, "_system_dirs", lambda: [tmp_path / "none"])
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    (tmp_path / "d").mkdir()
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


class TutorialNeuralNet(nn.Module):
    """The tutorial's LeNet as published (shared/seeds/003), for comparison."""

    def __init__(self):
        super(TutorialNeuralNet, self).__init__()  # noqa: UP008 - as published
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x

    def num_flat_features(self, x):
        size = x.size()[1:]
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


def test_lenet_is_the_tutorials_class_in_training_and_in_evaluation() -> None:
    """Our LeNet's state_dict loads into the tutorial's class, and both give the same outputs
    and gradients bit for bit, with gradients on (training) and off (evaluation), including
    pooling windows full of ties."""
    torch.manual_seed(0)
    ours, theirs = fm.NeuralNet(), TutorialNeuralNet()
    theirs.load_state_dict(ours.state_dict())
    images = torch.randint(0, 255, (64, 28, 28), dtype=torch.uint8)
    images[:, :8] = 0  # blank rows: ties, and conv outputs that are just the bias
    x = fm.prepare(images).contiguous()  # the tutorial's view() needs the plain layout
    y = torch.randint(0, 10, (64,))
    grads = []
    for model in (ours, theirs):
        loss = F.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_tutorial_recipe_from_the_command_line_trains_like_the_tutorials_loop(tiny: Path) -> None:
    """The README's command line for the tutorial's recipe gives its optimizer, and our epoch
    gives the weights of the tutorial's loop (zero_grad, forward, loss, backward, step) over the
    same batches, bit for bit."""
    from flows.train_flow import build_configs, parser
    from tasks.engine import training

    args = vars(parser().parse_args(["--job", "fashion_mnist", *fm.TUTORIAL_RECIPE.split()]))
    (cfg,) = build_configs(args.pop("job"), args)
    data = fm.load(tiny).pool
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(fm.build_model(cfg))
    ours, theirs = models
    order, cpu = epoch_order(0, 0, len(data)), torch.device("cpu")
    step = training.Step(cfg, ours, training.build_optimizer(cfg, ours), None,
                         training.textbook_loss(nn.CrossEntropyLoss()), cpu)
    training.train_epoch(step, TensorRows(data, cpu, fm.prepare).batches(0, order, cfg.batch_size, 0,
                                                                         len(order) // cfg.batch_size))
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.001, momentum=0.9)  # the tutorial's
    criterion = nn.CrossEntropyLoss()
    for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        optimizer.zero_grad()
        loss = criterion(theirs(fm.prepare(data.x[idx])), data.y[idx])
        loss.backward()
        optimizer.step()
    assert cfg.batch_size == 128 and cfg.epochs == 10
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


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
    summary = (run_dir / "summary.md").read_text()  # the whole matrix, as a table
    assert "## confusion_matrix (rows: true, columns: predicted)" in summary and "..." not in summary
    assert f"| {fm.LABELS[9]} | " + " | ".join(str(int(v)) for v in cm[9]) + " |" in summary
    split = json.loads((run_dir / "split.json").read_text())
    assert split["sizes"] == {"train": 540, "val": 60, "test": 200} and split["test_source"] == "test_set"
    import matplotlib.image

    for png in ("confusion_matrix.png", "predictions.png"):
        img = matplotlib.image.imread(run_dir / png)
        assert img.shape[0] >= 400 and img.shape[1] >= 400
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["checkpoint-1.pt", "checkpoint-2.pt"]
    # model.pt2 takes what a user has, uint8 images [N, 28, 28], and classifies as the model does.
    images = fm.load(tiny).test.x[:8]
    model = torch.load(run_dir / "model.pt", weights_only=False).eval()
    with torch.no_grad():
        expected = model(fm.prepare(images))
        exported = torch.export.load(run_dir / "model.pt2").module()(images)
    # The program's weights are contiguous, the model's channels_last: other conv kernels, the same classes.
    assert torch.allclose(exported, expected, rtol=1e-4, atol=1e-5) and torch.equal(exported.argmax(1), expected.argmax(1))
    # About the model's size: its example input is two images, not the training set they are cut from.
    assert (run_dir / "model.pt2").stat().st_size < (run_dir / "model_state_dict.pt").stat().st_size + 100_000


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole default recipe on the real data, on however few cores CI has
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
    # The files actually used are on record (here the data folder or the system copy).
    source = json.loads((run_dir / "run.json").read_text())["data_source"]
    assert source == f"{data} (the {'system copy' if data in fm._system_dirs() else 'data folder'})"


def test_predict_classifies_test_images_by_index(tiny: Path, prefect_api: str, tmp_path: Path) -> None:
    from flows.predict_flow import predict

    result = train_flow(job="fashion_mnist", data=str(tiny), epochs=2, chunk_epochs=2, batch_size=32,
                        artifacts_dir=str(tmp_path))["fashion_mnist"]
    rows = predict(result["run_dir"], {"index": [0, 5]})
    true = fm.load(tiny).test.y
    assert [r["input"] for r in rows] == [f"test image {i} (true: {fm.LABELS[int(true[i])]})" for i in (0, 5)]
    assert all(r["text"].split(": ")[-1].split(" (")[0] in fm.LABELS for r in rows)
    # --json's rows say what the text says: the label, its class and probability
    assert all(r["text"].endswith(f": {r['label']} ({r['probability']:.1%})") and fm.LABELS[r["class"]] == r["label"]
               for r in rows)
    with pytest.raises(UserError, match="--index 200 is out of range"):
        predict(result["run_dir"], {"index": [200]})
