"""FashionMNIST classification: the real data, the tutorial's LeNet, and faster, better defaults.

Data lookup, in order: ``<data>/FashionMNIST/raw/`` (torchvision's layout), Debian's
``dataset-fashion-mnist`` system copy (for the default ``data/`` only: a folder the user names
must exist), then torchvision's download into ``<data>``. Images are
decoded once into a uint8 tensor [N, 28, 28]; batches are normalised on the fly exactly as the
tutorial's ``ToTensor()`` + ``Normalize((0.5,), (0.5,))`` would, with no PIL and no workers.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.jobs.spec import DATA_DIR, JobData, JobSpec, Predictor, Tensors, TrainConfig, UserError

#: The tutorial's labels_map.
LABELS = ("T-Shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle Boot")
#: torchvision's file names -> (md5 of the official .gz, md5 of the decompressed IDX, count).
#: Debian recompresses the files, so its .gz differ from torchvision's while the content matches.
FILES = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a", 60000),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9", 60000),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a", 10000),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965", 10000),
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
log = logging.getLogger("trainflow.fashion_mnist")
HOW_TO_GET = ("get FashionMNIST with internet access (torchvision downloads it into <data>/FashionMNIST/raw), "
              "or `apt-get install dataset-fashion-mnist`, or copy the four .gz files into <data>/FashionMNIST/raw")


# --- data ----------------------------------------------------------------------------------


def _system_dirs() -> list[Path]:
    """Where Debian put the files (asks dpkg; falls back to the package's known folder)."""
    found = []
    try:
        out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10).stdout
        found = sorted({Path(line).parent for line in out.splitlines() if line.endswith("-idx3-ubyte.gz")})
    except (OSError, subprocess.SubprocessError):
        pass
    return found or [SYSTEM_DIR]


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_file_in(folder, name) for name in FILES)


def locate(data: Path, download: bool = True) -> Path:
    """The folder holding all four files: the data folder, then (for the default data folder
    only) the system copy, then a download into the data folder. A folder the user named is
    used as given: a typo must not train on other files."""
    data = Path(data)
    if data.exists() and not data.is_dir():
        raise UserError(f"--data {data} is a file; fashion_mnist needs a folder (default: data/)")
    default = data.resolve() == DATA_DIR.resolve()
    if not default and not data.is_dir():
        raise UserError(f"--data {data} does not exist; pass the folder that holds FashionMNIST/raw/, "
                        f"or leave --data out to use data/, the system copy or a download")
    for folder in (data / "FashionMNIST" / "raw", data, *(_system_dirs() if default else [])):
        if _complete(folder):
            return folder
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(root=str(data), train=True, download=True)
            FashionMNIST(root=str(data), train=False, download=True)
            log.info("downloaded FashionMNIST into %s", data / "FashionMNIST" / "raw")
        except Exception as exc:  # noqa: BLE001 - any failure means "no data": say how to get it
            raise UserError(f"FashionMNIST not found in {data} or {SYSTEM_DIR} and the download failed "
                            f"({type(exc).__name__}); {HOW_TO_GET}") from None
        if _complete(data / "FashionMNIST" / "raw"):
            return data / "FashionMNIST" / "raw"
    raise UserError(f"FashionMNIST not found in {data} or {SYSTEM_DIR}; {HOW_TO_GET}")


def read_idx(path: Path) -> torch.Tensor:
    """Decode one IDX file (optionally gzipped) after checking it: official files by md5, any
    file by its header and exact size. Returns uint8 [N] (labels) or [N, 28, 28] (images)."""
    raw = path.read_bytes()
    name = path.name.removesuffix(".gz")
    gz_md5, content_md5, official_count = FILES[name]
    official = path.suffix == ".gz" and hashlib.md5(raw).hexdigest() == gz_md5
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path} is truncated or corrupt ({exc}); delete it and get it again: {HOW_TO_GET}") from None
    dims = 3 if "images" in name else 1
    if len(raw) < 4 + 4 * dims or struct.unpack(">HBB", raw[:4]) != (0, 0x08, dims):
        raise UserError(f"{path} is not an IDX file of uint8 ({'images' if dims == 3 else 'labels'}); delete it and get it again")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    body = raw[4 + 4 * dims :]
    expected = int(torch.tensor(shape).prod())
    if len(body) != expected or (dims == 3 and shape[1:] != (28, 28)):
        raise UserError(f"{path} is truncated or corrupt (header says {shape}, {len(body)} data bytes); "
                        f"delete it and get it again")
    if shape[0] == official_count and not official and hashlib.md5(raw).hexdigest() != content_md5:
        # Full-size file whose content is not the official one: damaged.
        raise UserError(f"{path} does not match the official FashionMNIST content (md5); delete it and get it again")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load(path: Path) -> JobData:
    """Train pool (60 000 images) and the official 10 000-image test set, as uint8 tensors."""
    folder = locate(Path(path))
    parts = {name: read_idx(_file_in(folder, name)) for name in FILES}
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(parts[name].numpy().tobytes())
    pool = Tensors(parts["train-images-idx3-ubyte"], parts["train-labels-idx1-ubyte"].long())
    test = Tensors(parts["t10k-images-idx3-ubyte"], parts["t10k-labels-idx1-ubyte"].long())
    for split, t in (("train", pool), ("test", test)):
        if len(t.x) != len(t.y):
            raise UserError(f"{folder}: {split} has {len(t.x)} images but {len(t.y)} labels; get the files again")
        if len(t.y) and int(t.y.max()) >= len(LABELS):
            raise UserError(f"{folder}: {split} labels go up to {int(t.y.max())}; FashionMNIST has 10 classes")
    kind = "the system copy" if folder in _system_dirs() else "the data folder"
    return JobData(pool=pool, test=test, fingerprint=digest.hexdigest(), source=f"{folder} ({kind})")


def prepare(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28], bitwise what ToTensor + Normalize(0.5, 0.5) give."""
    # (x / 255 - 0.5) / 0.5 in two passes: x / 127.5 - 1. The same bits for all 256 values (tested):
    # 127.5 is 255 / 2 exactly, and doubling commutes with rounding. div allocates the float copy
    # (x is never modified), sub_ works in place: -11% on the data path against three passes.
    return x.unsqueeze(1).div(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)


def split_sizes(n: int) -> tuple[int, int, int]:
    """Train/validation from the training pool (9:1, 54 000 / 6 000); test is the official set."""
    val = n // 10
    return n - val, val, 0


# --- models --------------------------------------------------------------------------------


class NeuralNet(nn.Module):
    """The tutorial's LeNet: its attribute names (its state_dict loads into the tutorial's class)
    and its forward, op for op."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))  # [B,1,28,28] -> [B,6,26,26] -> [B,6,13,13]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # -> [B,16,11,11] -> [B,16,5,5]
        x = torch.flatten(x, 1)  # -> [B,400]; the tutorial's view(), which a channels_last x refuses
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # -> [B,10] logits


class BNCNN(nn.Module):
    """Two 3x3 conv blocks with BatchNorm (``small_cnn``: 16/32 channels, linear head;
    ``cnn``: 32/64 channels, a 128-unit hidden layer and dropout)."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)  # bias is redundant before BatchNorm
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden) if hidden else None
        self.fc2 = nn.Linear(hidden or c2 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # [B,1,28,28] -> [B,c1,14,14]
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # -> [B,c2,7,7]
        x = torch.flatten(x, 1)  # -> [B, c2*49]
        if self.fc1 is not None:
            x = F.relu(self.fc1(self.drop(x)))  # -> [B, hidden]
        return self.fc2(self.drop(x))  # -> [B,10] logits


class SmallCNN(BNCNN):
    """The default: 20 538 parameters, fast on one CPU thread."""

    def __init__(self):
        super().__init__(c1=16, c2=32)


class CNN(BNCNN):
    """The stronger option (``--model cnn``): 421 738 parameters."""

    def __init__(self):
        super().__init__(c1=32, c2=64, hidden=128, dropout=0.25)


MODELS: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN, "cnn": CNN, "lenet": NeuralNet}


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model named by ``cfg.model`` in channels_last layout: the same ops, only the layout,
    which makes a CPU training step of every model faster (docs/performance.md)."""
    return MODELS[cfg.model]().to(memory_format=torch.channels_last)


# --- metrics and report -------------------------------------------------------------------


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of logits [N, 10] against labels [N]."""
    return {"accuracy": float((outputs.argmax(1) == targets).double().mean())}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Predicted class per uint8 image [N, 28, 28] -> [N]. Batches of 128, as the job's
    evaluation (faster on a CPU than larger ones, with the same predictions)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(prepare(images[i : i + batch_size].to(device))).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def confusion_matrix(pred: torch.Tensor, true: torch.Tensor, classes: int = len(LABELS)) -> torch.Tensor:
    """[classes, classes] counts: row = true class, column = predicted class."""
    return torch.bincount(true * classes + pred, minlength=classes * classes).reshape(classes, classes)


def report(run_dir: Path, model: nn.Module, data: JobData, split: dict, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-class accuracy and confusion matrix on the official test set, plus two PNGs."""
    test = data.test
    pred = predict(model, test.x)
    cm = confusion_matrix(pred, test.y)
    per_class = (cm.diag().double() / cm.sum(1).clamp(min=1)).tolist()
    save_confusion_png(Path(run_dir) / "confusion_matrix.png", cm)
    save_grid_png(Path(run_dir) / "predictions.png", test.x[:16], test.y[:16], pred[:16])
    return {
        "test_accuracy": metrics["test"]["accuracy"],
        "per_class_accuracy": dict(zip(LABELS, per_class)),
        "confusion_matrix": {"labels": list(LABELS), "rows_true_cols_predicted": cm.tolist()},
    }


def save_confusion_png(path: Path, cm: torch.Tensor) -> None:
    """Confusion matrix heat map with counts."""
    from tasks.jobs.plots import new_figure, save_png

    fig = new_figure(8, 7)
    ax = fig.add_subplot()
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(10), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(10), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(10):
        for j in range(10):
            v = int(cm[i, j])
            ax.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    acc = float(cm.diag().sum()) / float(cm.sum())
    ax.set_title(f"FashionMNIST test set: accuracy {acc:.2%}")
    save_png(fig, path)


def save_grid_png(path: Path, images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor) -> None:
    """4x4 grid of test images titled 'predicted (true)', the tutorial's labels_map names (red
    when wrong). One axes showing a montage: 16 subplots cost a second of layout."""
    from tasks.jobs.plots import new_figure, save_png

    side = images.shape[-1]
    width, height, top = side + 12, side + 14, 12  # a cell: the caption, then the image
    montage = torch.full((4 * height, 4 * width), 255, dtype=torch.uint8)
    for i, image in enumerate(images[:16]):
        r, c = divmod(i, 4)
        montage[r * height + top : r * height + top + side, c * width + 6 : c * width + 6 + side] = image
    fig = new_figure(9, 10)
    ax = fig.add_subplot()
    ax.imshow(montage.numpy(), cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    for i in range(len(images[:16])):
        r, c = divmod(i, 4)
        ok = int(pred[i]) == int(true[i])
        ax.text(c * width + width / 2, r * height + top - 1, f"{LABELS[int(pred[i])]}\n(true: {LABELS[int(true[i])]})",
                ha="center", va="bottom", fontsize=9, color="black" if ok else "red")
    save_png(fig, path)


def _predict_arguments(parser: Any) -> None:
    parser.add_argument("--index", type=int, nargs="+", required=True, metavar="I",
                        help="indices of official test images (0-9999) to classify")


def _predict_inputs(args: Any, cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    test = load(Path(cfg.data)).test
    bad = [i for i in args.index if not 0 <= i < len(test)]
    if bad:
        raise UserError(f"--index {bad[0]} is out of range; the test set has images 0-{len(test) - 1}")
    idx = torch.tensor(args.index)
    return test.x[idx], [f"test image {i} (true: {LABELS[int(test.y[i])]})" for i in args.index]


def _predict_fields(outputs: torch.Tensor) -> list[dict[str, Any]]:
    probs = outputs.softmax(1)  # [N, 10]
    return [{"label": LABELS[int(p.argmax())], "class": int(p.argmax()), "probability": float(p.max())} for p in probs]


def _predict_format(labels: list[str], outputs: torch.Tensor) -> list[str]:
    return [f"{label}: {f['label']} ({f['probability']:.1%})" for label, f in zip(labels, _predict_fields(outputs))]


#: The tutorial's own recipe (its LeNet, SGD lr 1e-3, momentum 0.9, batch 128, 10 epochs), as
#: options on top of this job's defaults.
TUTORIAL_RECIPE = "--model lenet --optimizer sgd --lr 1e-3 --momentum 0.9 --schedule constant"

JOB = JobSpec(
    name="fashion_mnist",
    description="FashionMNIST (real data, official test set), CNN, cross-entropy, accuracy",
    # small_cnn + Adam + OneCycle reaches >= 91% in 10 epochs at the least CPU time
    # (docs/performance.md); TUTORIAL_RECIPE is the tutorial's, and `--model cnn --optimizer adamw
    # --lr 3e-3 --weight-decay 1e-4 --label-smoothing 0.1` is the stronger option. Evaluation in
    # batches of 128: faster on a CPU than larger batches.
    defaults=dict(
        data=DATA_DIR, model="small_cnn", epochs=10, chunk_epochs=2, lr=5e-3, batch_size=128, eval_batch_size=128,
        optimizer="adam", schedule="onecycle",
    ),
    load=load,
    build_model=build_model,
    loss=lambda cfg: nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
    models=tuple(MODELS),
    split_sizes=split_sizes,
    prepare=prepare,
    metrics=accuracy,
    monitor=("accuracy", True),
    report=report,
    model_label=lambda cfg: MODELS[cfg.model].__name__,  # the class's name: building one would draw random numbers
    data_help="folder with FashionMNIST/raw/*.gz (default data/)",
    predict=Predictor(add_arguments=_predict_arguments, inputs=_predict_inputs, format=_predict_format,
                      fields=_predict_fields),
)
