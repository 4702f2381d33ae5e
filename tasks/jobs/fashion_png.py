"""FashionMNIST as image files, the tutorials' way: ``torchvision.datasets.ImageFolder`` with
random crop and flip, read through trainflow's Dataset path (a DataLoader, ``--num-workers``).

Export the real images once (from the same files the ``fashion_mnist`` job reads), to a folder
or a store, in ImageFolder's layout ``DEST/{train,test}/<k>_<label>/<index>.png``::

    python -m tasks.jobs.fashion_png export data/fashion_png            # or s3://bucket/fashion_png

then train: ``python flows/train_flow.py --job tasks.jobs.fashion_png:JOB`` (``--data`` another
folder or the ``s3://`` URL; a URL is fetched once into trainflow's cache, docs/jobs.md).

A job by import path, not in the registry: every registered job gets a daily deployment
(deployments/prefect.yaml is generated from the registry), which this one cannot run before
the export; and it is written as a user's own Dataset job would be.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.jobs import fashion_mnist
from tasks.jobs.spec import DATA_DIR, JobData, JobSpec, TrainConfig, UserError

DEFAULT_DIR = DATA_DIR / "fashion_png"
#: Folder names sort in label order: ImageFolder numbers classes by sorted folder name.
CLASSES = tuple(f"{k}_{name.replace(' ', '_')}" for k, name in enumerate(fashion_mnist.LABELS))


# --- export ---------------------------------------------------------------------------------


def write_pngs(images: torch.Tensor, labels: torch.Tensor, folder: Path, limit: int | None = None) -> int:
    """``folder/<class>/<index>.png`` for every image, or the first ``limit`` of each class; the count."""
    from PIL import Image

    rows = [int(i) for k in range(len(CLASSES)) for i in (labels == k).nonzero().flatten()[:limit]]
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in rows:  # zero-padded: a class folder lists in the official order
        Image.fromarray(images[i].numpy(), mode="L").save(folder / CLASSES[int(labels[i])] / f"{i:05d}.png")
    return len(rows)


def export(dest: str, source: Path = DATA_DIR, limit: int | None = None) -> str:
    """The real FashionMNIST (found as the fashion_mnist job finds it) as PNG files at ``dest``,
    a local folder or a store URL (written locally, then uploaded with fsspec's ``put``)."""
    data = fashion_mnist.load(Path(source))  # the checked uint8 tensors
    if "://" not in dest:
        write_parts(data, Path(dest), limit)
        return dest
    import fsspec.core  # a job reaches a store through fsspec, not through trainflow's storage layer

    with tempfile.TemporaryDirectory(prefix="fashion_png-") as tmp:
        write_parts(data, Path(tmp), limit)
        try:
            fs, root = fsspec.core.url_to_fs(dest)
            fs.put(f"{tmp}/", root, recursive=True)
        except (ImportError, ValueError, OSError) as exc:  # no extra, a bad URL, the store refused
            raise UserError(f"could not write the images to {dest} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the URL, the bucket and "
                            f"the credentials (pip install -e '.[s3]' for s3://)") from None
    return dest


def write_parts(data: JobData, dest: Path, limit: int | None) -> None:
    for part, rows in (("train", data.pool), ("test", data.test)):
        write_pngs(rows.x, rows.y, dest / part, limit)


# --- data ------------------------------------------------------------------------------------


def gray(path: str) -> Any:
    """ImageFolder's loader for one-channel images (its default converts to RGB)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def transform(augment: bool, pad: int = 2) -> Any:
    """The tutorial's ToTensor + Normalize(0.5, 0.5), after a random crop (of the image padded by
    ``pad`` pixels) and a random horizontal flip when ``augment``."""
    from torchvision import transforms  # imported by this job only: not on every command's start

    randomly = [transforms.RandomCrop(28, padding=pad), transforms.RandomHorizontalFlip()] if augment else []
    return transforms.Compose([*randomly, transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


def folder_of(root: Path, part: str) -> Any:
    """``root/part`` as an ImageFolder without augmentation; a UserError naming the fix."""
    if not (root / part).is_dir():
        raise UserError(f"{root / part} does not exist; write the images first: python -m tasks.jobs.fashion_png "
                        f"export {root}")
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(root / part), loader=gray, transform=transform(augment=False))
    except FileNotFoundError as exc:  # a class folder without images
        raise UserError(f"{root / part}: {str(exc).split('. ')[0]}; export the images again "
                        f"(python -m tasks.jobs.fashion_png export {root})") from None
    if tuple(dataset.classes) != CLASSES:
        raise UserError(f"{root / part} has the class folders {dataset.classes}; expected {list(CLASSES)} "
                        f"(python -m tasks.jobs.fashion_png export {root})")
    return dataset


def fingerprint(datasets: list[Any]) -> str:
    """sha256 of every file's name and bytes, in ImageFolder's order."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for path, label in dataset.samples:
            digest.update(f"{Path(path).relative_to(dataset.root)}:{label}\n".encode())
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def load(path: Path) -> JobData:
    """The training images (augmented; plain for validation) and the official test set."""
    root = Path(path)
    plain, test = folder_of(root, "train"), folder_of(root, "test")
    augmented = copy.copy(plain)  # the same files, listed once
    augmented.transform = transform(augment=True)
    return JobData(pool=augmented, eval_pool=plain, test=test, fingerprint=fingerprint([plain, test]))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The batch in the layout the models train fastest in on a CPU (docs/performance.md)."""
    return x.contiguous(memory_format=torch.channels_last)


# --- model and job ---------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Blocks of 3x3 conv (no bias: BatchNorm follows), BatchNorm, ReLU and 2x2 max-pooling, then
    dropout and one linear layer: each block halves the image and the next one's convolution
    costs less per channel, so a third block adds depth for little time on a CPU."""

    def __init__(self, channels: tuple[int, ...], dropout: float):
        super().__init__()
        blocks, c_in = [], 1
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)  # [B,1,28,28] -> [B,c,28/2^k,28/2^k]
        side = 28 // 2 ** len(channels)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(c_in * side * side, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.flatten(self.features(x), 1)))  # -> [B,10] logits


#: model name -> (channels per block, dropout); ``cnn`` is fashion_mnist's (32/64, a 128-unit hidden layer).
MODELS: dict[str, tuple[tuple[int, ...], float] | None] = {"cnn": None, "cnn3": ((16, 32, 64), 0.2)}


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model in channels_last layout (faster on a CPU, docs/performance.md)."""
    model = fashion_mnist.CNN() if MODELS[cfg.model] is None else ConvNet(*MODELS[cfg.model])
    return model.to(memory_format=torch.channels_last)


JOB = JobSpec(
    name="fashion_png",
    description="FashionMNIST as PNG files (ImageFolder), random crop and flip, through a DataLoader; CNN, accuracy",
    defaults=dict(data=DEFAULT_DIR, model="cnn", epochs=30, chunk_epochs=5, lr=3e-3, batch_size=128,
                  eval_batch_size=128, optimizer="adamw", weight_decay=1e-4, schedule="onecycle",
                  label_smoothing=0.1),
    load=load,
    build_model=build_model,
    loss=lambda cfg: nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
    models=tuple(MODELS),
    split_sizes=fashion_mnist.split_sizes,
    prepare=channels_last,
    metrics=fashion_mnist.accuracy,
    monitor=("accuracy", True),
    data_help="folder (or s3:// URL) with train/ and test/ in ImageFolder layout (python -m tasks.jobs.fashion_png "
              "export DEST writes it)",
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.jobs.fashion_png", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the real FashionMNIST as PNG files in ImageFolder layout")
    e.add_argument("dest", help="a local folder or a store URL (s3://bucket/prefix)")
    e.add_argument("--source", type=Path, default=DATA_DIR, help="where the fashion_mnist job finds the IDX files")
    e.add_argument("--limit", type=int, help="only the first N images of each class (tests, smoke runs)")
    a = p.parse_args(argv)
    try:
        print(f"wrote FashionMNIST as PNG files to {export(a.dest, a.source, a.limit)}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
