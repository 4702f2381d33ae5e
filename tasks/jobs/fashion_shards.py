"""FashionMNIST streamed from shards: the ``fashion_mnist`` job (its models, loss, normalisation,
accuracy and defaults) on the real images stored as WebDataset tar shards (``000123.png`` and
``000123.cls`` per image) in a folder or on a store, read through :class:`Shards`.

Write the shards once (a folder, or a store URL: ``s3://bucket/fashion``), then train:

    python -m tasks.jobs.fashion_shards s3://bucket/fashion
    python flows/train_flow.py --job tasks.jobs.fashion_shards:JOB --data s3://bucket/fashion --num-workers 2

A job by import path, not a built-in one: its data exists only once written, so it stays out of
the jobs that run without ``--job``, of the deployments and of the per-job tests.
"""

from __future__ import annotations

import argparse
import hashlib
import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from tasks.jobs import fashion_mnist
from tasks.jobs.shards import Shards, write_shards
from tasks.jobs.spec import DATA_DIR, JobData, Tensors

#: The default --data: shards written by ``python -m tasks.jobs.fashion_shards`` (no argument).
SHARDS_DIR = DATA_DIR / "fashion_mnist_shards"


def decode(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's PNG -> uint8 [28, 28] (the tensor job's stored form), its class -> a long."""
    image = pil_to_tensor(Image.open(io.BytesIO(sample["png"])))  # [1, 28, 28] uint8
    return image[0], torch.tensor(int(sample["cls"]))


def load(path: str | Path, decode: Callable[[dict[str, Any]], Any] = decode) -> JobData:
    """The training shards (``<path>/train``, split 54 000 / 6 000 by whole shards) and the
    official test set (``<path>/test``)."""
    train, test = (Shards(f"{str(path).rstrip('/')}/{part}", decode) for part in ("train", "test"))
    fingerprint = hashlib.sha256(f"{train.fingerprint} {test.fingerprint}".encode()).hexdigest()
    return JobData(pool=train, test=test, fingerprint=fingerprint, source=str(path))


def samples(images: Tensors) -> Iterator[dict[str, Any]]:
    """Each image as a WebDataset sample: a lossless PNG and its class, keyed by its index."""
    for i in range(len(images)):
        png = io.BytesIO()
        Image.fromarray(images.x[i].numpy()).save(png, format="PNG")  # uint8 [28, 28]: 8-bit grey, lossless
        yield {"__key__": f"{i:06d}", "png": png.getvalue(), "cls": str(int(images.y[i])).encode()}


def write(location: str | Path, data: Path = DATA_DIR, per_shard: int = 5_000) -> None:
    """The real FashionMNIST (found as the ``fashion_mnist`` job finds it, in ``data``) as shards
    at ``location``: ``train/`` (60 000 images, 12 shards) and ``test/`` (10 000, 2 shards)."""
    found = fashion_mnist.load(Path(data))
    for part, images in (("train", found.pool), ("test", found.test)):
        write_shards(samples(images), f"{str(location).rstrip('/')}/{part}", per_shard, prefix=part)


JOB = replace(
    fashion_mnist.JOB,
    name="fashion_shards",
    description="FashionMNIST streamed from WebDataset shards (a folder or s3://), CNN, cross-entropy, accuracy",
    defaults={**fashion_mnist.JOB.defaults, "data": SHARDS_DIR},
    load=load,
    report=None,  # the tensor job's report reads its test set as tensors
    predict=None,
    data_help="folder or URL with train/ and test/ shards (python -m tasks.jobs.fashion_shards LOCATION)",
    streams=True,
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the real FashionMNIST as WebDataset shards")
    parser.add_argument("location", nargs="?", default=str(SHARDS_DIR), help="a folder or URL (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="where FashionMNIST is (as --data of fashion_mnist)")
    parser.add_argument("--per-shard", type=int, default=5_000, help="images per shard (default: %(default)s)")
    args = parser.parse_args()
    write(args.location, args.data, args.per_shard)
    print(f"wrote FashionMNIST shards to {args.location}")
