"""No code runs from a file's content: every malicious file is built here, and each test checks
that the marker file its payload would create never appears."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import prunetune
from prunetune.backend.checkpoint import Checkpoint, save_checkpoint
from prunetune.backend.data import load_dataset
from prunetune.backend.errors import CheckpointError, DataError, UnsupportedModelError
from prunetune.backend.export import load_model, load_subnet, seal_record
from prunetune.backend.models import ModelRef, create_model
from prunetune.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file a payload creates when it runs; it must never exist."""
    return tmp_path / "PWNED"


@pytest.fixture
def evil_module(tmp_path: Path, marker: Path) -> Iterator[str]:
    """An importable module whose import and whose factory both create the marker."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "evil_models.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from torch import nn
            Path({str(marker)!r}).write_text("imported")

            def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
                Path({str(marker)!r}).write_text("called")
                return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(8, num_classes))
            """
        )
    )
    sys.path.insert(0, str(folder))
    yield "evil_models:factory"
    sys.path.remove(str(folder))
    sys.modules.pop("evil_models", None)


def _checkpoint_naming(tmp_path: Path, ref: dict[str, object]) -> Path:
    """A real small_cnn checkpoint whose header is edited to name ``ref``."""
    path = tmp_path / "dense.pt"
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    save_checkpoint(path, model, Checkpoint(ModelRef("small_cnn"), (1, 1, 8, 8), "digits"))
    payload = torch.load(path, weights_only=True)
    payload["model"] = ref
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "pruned"
    argv = ["prune", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--flops", "50%"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def _export_naming(tmp_path: Path, export_dir: Path, ref: dict[str, object]) -> Path:
    """A copy of ``export_dir`` whose subnet.json names ``ref``, checksum recomputed."""
    out = tmp_path / "export"
    shutil.copytree(export_dir, out)
    record = json.loads((out / "subnet.json").read_text())
    record["spec"]["model"] = ref
    (out / "subnet.json").write_text(json.dumps(seal_record(record)))
    return out


def _system(marker: Path) -> dict[str, object]:
    return {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}


@pytest.mark.parametrize("command", ["inspect", "prune", "profile"])
def test_checkpoint_naming_os_system_is_refused(
    tmp_path: Path, marker: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _checkpoint_naming(tmp_path, _system(marker))
    argv = [command, "--checkpoint", str(path), "--flops", "50%", "--out", str(tmp_path / "o")]
    argv = argv[:3] if command == "inspect" else argv
    if command == "profile":
        argv = [command, "--checkpoint", str(path), "--out", str(tmp_path / "p.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "names model 'os:system', which is not in the zoo" in err
    assert "--trust-model-code" in err and err.count("\n") == 1
    assert not marker.exists()
    # even the opt-in never calls a builtin: it is no model factory
    assert main([*argv, "--trust-model-code"]) == 2
    assert "not a Python function" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_naming_user_code_needs_model_or_trust(
    tmp_path: Path, marker: Path, evil_module: str
) -> None:
    path = _checkpoint_naming(tmp_path, {"name": evil_module, "kwargs": {"in_channels": 1}})
    with pytest.raises(CheckpointError, match=r"not in the zoo.*--model evil_models:factory"):
        load_model(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="do not fit"):  # imported: the user named it
        load_model(path, expect=ModelRef(evil_module))
    assert marker.exists()


def test_train_checkpoint_only_builds_the_given_model(
    tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _checkpoint_naming(tmp_path, _system(marker))
    argv = ["train", "--model", "small_cnn", "--checkpoint", str(path), "--out", "x.pt"]
    assert main([*argv[:-1], str(tmp_path / "x.pt")]) == 2
    assert "is for model 'os:system'" in capsys.readouterr().err
    assert not marker.exists()


def test_subnet_json_naming_code_is_refused_on_every_load(
    tmp_path: Path,
    marker: Path,
    export_dir: Path,
    evil_module: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _export_naming(tmp_path, export_dir, _system(marker))
    assert main(["estimate", "--subnet", str(out)]) == 2
    assert "--trust-model-code" in capsys.readouterr().err
    argv = ["prune", "--checkpoint", str(out), "--params", "50%", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "names model 'os:system'" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not in the zoo"):
        load_subnet(out)
    assert not marker.exists()
    # the Python API falls back to the export's own program: no import, still a model
    loaded = prunetune.load(out)
    assert loaded.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    user = _export_naming(tmp_path / "user", export_dir, {"name": evil_module, "kwargs": {}})
    assert main(["estimate", "--subnet", str(user)]) == 2
    assert prunetune.load(user).model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("os:system", "not a Python function"),
        ("builtins:eval", "not a Python function"),
        ("subprocess:run", "standard library"),
        ("shutil:rmtree", "standard library"),
        ("collections:OrderedDict", "not a torch.nn.Module subclass"),
        ("tests.cli.test_cli_trust:needs_a_path", "needs path|it takes: path"),
        ("tests.cli.test_cli_trust:returns_text", "annotated to return str"),
    ],
)
def test_model_option_is_checked_before_calling(
    name: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        create_model(name, num_classes=10, in_channels=3)
    assert main(["inspect", "--model", name]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_model_os_abort_does_not_abort() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "prunetune", "inspect", "--model", "os:abort"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "not a Python function" in done.stderr and "Traceback" not in done.stderr


def needs_a_path(path: str) -> torch.nn.Module:
    raise AssertionError("never called")


def returns_text(num_classes: int = 10) -> str:
    raise AssertionError("never called")


def _cifar_dir(tmp_path: Path, payload: object | None = None) -> Path:
    """A tiny CIFAR-10 folder (4 images a batch); ``payload`` replaces data_batch_1."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"batch_label": b"batch",
            b"labels": [int(v) for v in rng.integers(0, 10, 4)],
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"],
        }
        chosen = payload if payload is not None and name == "data_batch_1" else batch
        (folder / name).write_bytes(pickle.dumps(chosen, protocol=2))
    return folder


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batches_load_with_the_restricted_unpickler(tmp_path: Path) -> None:
    data = load_dataset("cifar10", root=_cifar_dir(tmp_path))
    assert data.image_shape == (3, 32, 32) and len(data.test) == 4


@pytest.mark.parametrize("wrap", [lambda e: e, lambda e: {b"data": e, b"labels": [1]}])
def test_crafted_cifar_batch_runs_no_code(tmp_path: Path, marker: Path, wrap: object) -> None:
    folder = _cifar_dir(tmp_path, wrap(_Exploit(marker)))  # type: ignore[operator]
    with pytest.raises(DataError, match=r"data_batch_1.*references posix.system.*refused"):
        load_dataset("cifar10", root=folder)
    assert not marker.exists()


def test_changed_onnx_and_subnet_json_are_refused_everywhere(
    tmp_path: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = tmp_path / "onnx"
    shutil.copytree(export_dir, onnx)
    data = bytearray((onnx / "model.onnx").read_bytes())
    data[-64:-32] = bytes(32)  # zero part of the last initializer
    (onnx / "model.onnx").write_bytes(bytes(data))
    edited = tmp_path / "edited"
    shutil.copytree(export_dir, edited)
    record = json.loads((edited / "subnet.json").read_text())
    record["metrics"]["flops"] = 1
    (edited / "subnet.json").write_text(json.dumps(record))
    cases = ((onnx, "model.onnx' does not match the checksum"), (edited, "own checksum"))
    for out, message in cases:
        with pytest.raises(CheckpointError, match=message):
            prunetune.load(out)
        with pytest.raises(CheckpointError, match=message):
            load_model(out)
        assert main(["estimate", "--subnet", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert main(["inspect", "--checkpoint", str(out)]) == 2
        assert message in capsys.readouterr().err
