"""Benchmark: a dense small CNN trained by ``prunetune train`` on the MNIST test set.

The 10,000 MNIST test images are split 8,000 / 2,000 (seeded); the model trains on the 8,000
(with 10% of them held out for validation) and is scored on the 2,000 it never saw. The last line
printed is one JSON object with the figures.

    python scripts/bench_train_mnist.py --data-dir ../shared/data/mnist-t10k
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prunetune.backend.checkpoint import load_checkpoint

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


def main() -> int:
    """Train through the CLI, read the checkpoint's held-out accuracy, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "dense.pt"
        command = [
            sys.executable, "-m", "prunetune.cli", "train", "--model", args.model,
            "--dataset", "mnist", "--data-dir", str(args.data_dir),
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--out", str(out),
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        _, info = load_checkpoint(out)
    figures = {
        "benchmark": "train_mnist",
        "model": args.model,
        "epochs": args.epochs,
        "test_acc": round(info.metrics["test_acc"], 4),
        "val_acc": round(info.metrics["val_acc"], 4),
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(figures))
    return 0 if figures["test_acc"] >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
