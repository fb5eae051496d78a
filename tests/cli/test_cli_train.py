"""``prunetune train``: a checkpoint on success; one-line errors, exit 2, no files on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunetune.backend.checkpoint import load_checkpoint
from prunetune.cli import main


def test_train_writes_a_loadable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dense.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "1", "--out", str(out)]) == 0
    _, info = load_checkpoint(out)
    assert info.dataset == "digits" and 0.0 <= info.metrics["test_acc"] <= 1.0
    assert "epoch 1/1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet9"], "unknown model 'resnet9'; valid names: mobilenetv2"),
        (["--model", "small_cnn", "--dataset", "svhn"], "unknown dataset 'svhn'"),
        (
            ["--model", "small_cnn", "--dataset", "mnist", "--data-dir", "/no/such"],
            "does not exist",
        ),
        (["--model", "small_cnn", "--out", "/proc/prunetune/x.pt"], "is not writable"),
        (["--model", "small_cnn", "--epochs", "0"], "epochs must be a positive"),
    ],
)
def test_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "dense.pt")]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("prunetune train: error:")
    assert list(tmp_path.iterdir()) == []


def test_malformed_mnist_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
    (data / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01junk")
    out = tmp_path / "out" / "dense.pt"
    argv = ["train", "--model", "small_cnn", "--dataset", "mnist", "--data-dir", str(data)]
    assert main([*argv, "--out", str(out)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not out.parent.exists()


def test_checkpoint_of_another_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "a.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "0.1", "--out", str(first)]) == 0
    second = tmp_path / "b.pt"
    argv = ["train", "--model", "resnet20", "--checkpoint", str(first), "--out", str(second)]
    assert main(argv) == 2
    assert "is for model 'small_cnn', not 'resnet20'" in capsys.readouterr().err
    assert not second.exists()


def test_train_takes_the_users_loss_metric_output_and_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "seg.pt"
    argv = ["train", "--model", "tests.factories:TinySegNet", "--dataset",
            "tests.factories:blob_datasets", "--loss", "tests.factories:blob_loss",
            "--metric", "miou", "--output", "out", "--ignore-index", "255", "--device", "cpu",
            "--precision", "bf16", "--epochs", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "on cpu" in err and "test miou " in err
    _, info = load_checkpoint(out, trust_model_code=True)
    assert 0.0 < info.metrics["test_acc"] <= 1.0  # the metric the task names: mean IoU


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:<index>"),
        (["--metric", "nosuch.module:Metric"], "metric"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_bad_task_or_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "dense.pt"
    assert main(["train", "--model", "small_cnn", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
