"""Images per second: the built-ins' in-memory path against streamed loading, on MNIST.

Three figures on the MNIST test set (``../shared/data/mnist-t10k``; its 10,000 images split as
every search splits them):

- ``in_memory``: one pass of :class:`TensorLoader` batches (sliced tensors, the built-ins' path);
- ``imagefolder_w0`` / ``imagefolder_w2``: the same training images written once as PNG files
  and read back with torchvision's ``ImageFolder`` (decode + ``ToTensor`` + ``Normalize``)
  through a ``DataLoader`` with 0 and 2 worker processes: the ``--dataset imagefolder`` path;
- ``train``: images per second of one epoch of ``train()`` (small_cnn, batch 128) on the
  in-memory path, the loop every built-in search runs; ``--only-train`` prints just it, so the
  same script measures an older checkout (``PYTHONPATH=<old>/src``) for comparison.

Usage::

    PYTHONPATH=src python scripts/bench_loader.py [--data-dir ../shared/data/mnist-t10k]

Prints one JSON line. Each figure is the best of ``--rounds`` passes (a shared machine's slow
spells hit single passes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from prunetune.backend.data import TensorLoader, load_dataset
from prunetune.backend.models import create_model
from prunetune.backend.train import TrainConfig, train

BATCH = 128


def best_rate(count: int, run: Any, rounds: int) -> float:
    """Images per second of the fastest of ``rounds`` runs of ``run()`` over ``count`` images."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return count / best


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist-t10k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", root=args.data_dir, seed=0)
    n = len(data.train)
    out: dict[str, Any] = {"benchmark": "loader", "images": n, "batch": BATCH, "threads": 1}

    def one_epoch() -> None:
        torch.manual_seed(0)
        model = create_model("small_cnn", num_classes=10, in_channels=1)
        train(model, data, TrainConfig(epochs=1, batch_size=BATCH))

    out["train"] = round(best_rate(n, one_epoch, args.rounds))
    if not args.only_train:
        out["in_memory"] = round(
            best_rate(n, lambda: [b for b in TensorLoader(data.train, BATCH, True)], args.rounds)
        )
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as folder:
            out.update(_streamed(data.train, Path(folder), args.rounds))
    print(json.dumps(out), flush=True)


def _streamed(split: Any, root: Path, rounds: int) -> dict[str, int]:
    """The split as PNG class folders, read back through ImageFolder and DataLoader workers."""
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    pixels = split.x[:, 0]
    pixels = ((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).to(torch.uint8)
    for index, (image, label) in enumerate(zip(pixels.numpy(), split.y.tolist(), strict=True)):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")
    tf = transforms.Compose(
        [transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize((0.13,), (0.31,))]
    )
    dataset = datasets.ImageFolder(str(root), transform=tf)
    rates = {}
    for workers in (0, 2):
        loader = DataLoader(dataset, BATCH, shuffle=True, num_workers=workers)
        rates[f"imagefolder_w{workers}"] = round(
            best_rate(len(dataset), lambda loader=loader: [b for b in loader], rounds)
        )
    return rates


if __name__ == "__main__":
    main()
