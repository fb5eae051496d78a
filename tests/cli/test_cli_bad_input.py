"""Bad numbers and bad files: each refused at entry with one line that says what happened."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunetune.backend.data import load_dataset
from prunetune.backend.errors import DataError
from prunetune.backend.export import ExportParityError, export_subnet
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef, create_model
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.train import DivergedError, TrainConfig, train
from prunetune.cli import main
from prunetune.cli.commands.estimate import implausible_latency
from prunetune.search._config import SearchConfig

FAST_PROFILE = ["--grid", "2", "--repeats", "1", "--calibration-subnets", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def profile_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "small_cnn.json"
    argv = ["profile", "--model", "small_cnn", "--input-shape", "1,1,8,8", *FAST_PROFILE]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert message in last, err
    assert "Traceback" not in err
    # ours is one line; argparse's own errors add its usage lines above
    assert err.count("\n") == 1 or last.startswith(f"prunetune {argv[0]}: error: argument")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--model", "small_cnn", "--flops", "-5%"], "must have a positive limit"),
        (["prune", "--model", "small_cnn", "--flops", "nan%"], "must have a positive limit"),
        (["inspect", "--model", "small_cnn", "--num-classes", "-3"], "at least 1, got '-3'"),
        (["inspect", "--model", "small_cnn", "--num-classes", "0"], "at least 1, got '0'"),
        (["train", "--model", "small_cnn", "--lr", "nan"], "lr must be a positive finite"),
        (["train", "--model", "small_cnn", "--lr", "-1"], "lr must be a positive finite"),
        (["train", "--model", "small_cnn", "--weight-decay", "-5e-4"], "weight_decay must be"),
        (["train", "--model", "small_cnn", "--epochs", "inf"], "epochs must be a positive"),
        (["search", "--model", "small_cnn", "--flops", "50%", "--dense-epochs", "nan"], "finite"),
        (["search", "--name", "nosuch", "--resume"], "nothing to resume"),
    ],
)
def test_bad_numbers_and_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    extra = {"prune": ["--out", str(tmp_path / "o")], "train": ["--out", str(tmp_path / "x.pt")]}
    extra["search"] = ["--runs-dir", str(tmp_path / "runs")]
    _one_line_error(capsys, [*argv, *extra.get(argv[0], [])], message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty (0 bytes)"), (b"hello, I am text\n", "is not a PyTorch file")],
)
def test_text_or_empty_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "dense.pt"
    path.write_bytes(content)
    _one_line_error(capsys, ["inspect", "--checkpoint", str(path)], message)


def test_checkpoint_given_as_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dense.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "0.05", "--out", str(path)]) == 0
    argv = ["inspect", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--profile", str(path)]
    _one_line_error(capsys, argv, "is not a latency profile: it is binary")


def _first_time(data: dict[str, object], value: float) -> None:
    ms = next(iter(data["tables"].values()))["ms"]  # type: ignore[attr-defined]
    row = ms[0] if isinstance(ms[0], list) else ms
    row[0] = value


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: _first_time(d, 1e300), "above 1e+06 ms"),
        (lambda d: _first_time(d, -1.0), "negative or non-finite"),
        (lambda d: d.update(model_ms=-2.0), "'model_ms' must be a positive"),
        (lambda d: d["calibration"][0].update(ms=1e300), "'calibration' times"),
    ],
)
def test_implausible_profile_times(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    profile_json: Path,
    edit: object,
    message: str,
) -> None:
    data = json.loads(profile_json.read_text())
    edit(data)  # type: ignore[operator]
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    argv = ["inspect", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--profile", str(path)]
    _one_line_error(capsys, argv, message)


def test_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mnist.gz"
    path.write_bytes(b"x")
    argv = ["train", "--model", "small_cnn", "--dataset", "mnist", "--data-dir", str(path)]
    _one_line_error(capsys, [*argv, "--out", str(tmp_path / "x.pt")], "is a file, not a directory")


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_labels_outside_the_classes(tmp_path: Path) -> None:
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1] * 19 + [200]))
    with pytest.raises(
        DataError, match=r"mnist labels must be 0\.\.9, but 1 are outside \(e\.g\. 200\)"
    ):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"distill": "no"}, "distill must be true or false, got 'no'"),
        ({"pareto": 1}, "pareto must be true or false"),
        ({"trials": "8"}, "trials must be an integer"),
        ({"model": 3}, "model must be a string"),
        ({"finetune_epochs": float("inf")}, "finetune_epochs must be a finite number"),
    ],
)
def test_yaml_values_of_the_wrong_type(setting: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchConfig.from_mapping({"model": "small_cnn", "flops": "50%", **setting})


def test_binary_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "search.yaml"
    config.write_bytes(b"PK\x03\x04\xff\xfe binary")
    argv = ["search", "--config", str(config), "--runs-dir", str(tmp_path / "runs")]
    _one_line_error(capsys, argv, "is not YAML: it is binary, not text")


def test_config_file_distill_no(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "search.yaml"
    config.write_text('model: small_cnn\nflops: 50%\ndistill: "no"\n')
    argv = ["search", "--config", str(config), "--runs-dir", str(tmp_path / "runs")]
    _one_line_error(capsys, argv, "distill must be true or false")
    assert not (tmp_path / "runs").exists()


def test_nan_loss_stops_training_before_the_weights_break(digits: object) -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    poisoned = torch.nn.Sequential(model, _NanAfter(steps=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        DivergedError, match=r"the loss became nan at step 4 .*lower the learning rate"
    ):
        train(poisoned, digits, TrainConfig(epochs=1, batch_size=64))  # type: ignore[arg-type]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())


class _NanAfter(torch.nn.Module):
    """Passes its input through for ``steps`` training calls, then returns NaN."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps -= 1
            if self.steps < 0:
                return x * math.nan
        return x


def test_export_refuses_a_nan_model_and_writes_strict_json(tmp_path: Path) -> None:
    ref = ModelRef("small_cnn", {"num_classes": 10, "in_channels": 1})
    dense = ref.build().eval()
    graph = ChannelGraph.trace(dense, torch.zeros(1, 1, 8, 8))
    spec = SubnetSpec.from_widths(graph, ref, graph.dense_widths())
    out = export_subnet(tmp_path / "ok", dense, spec, metrics={"latency_ms": math.nan})
    text = (out / "subnet.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"subnet.json holds {constant}")

    assert json.loads(text, parse_constant=refuse)["metrics"]["latency_ms"] is None
    with torch.no_grad():
        next(dense.parameters()).fill_(math.nan)
    with pytest.raises(ExportParityError, match="non-finite outputs"):
        export_subnet(tmp_path / "nan", dense, spec)
    assert not (tmp_path / "nan").exists()


def test_estimate_warns_when_a_smaller_subnet_is_predicted_slower() -> None:
    dense = {"flops": 100.0, "latency_ms": 1.0}
    line = implausible_latency({"flops": 47.5, "latency_ms": 1.1}, dense)
    assert line is not None and "47.5% of the FLOPs, slower than the dense model" in line
    assert "--threads 1 on a quiet machine" in line
    assert implausible_latency({"flops": 47.5, "latency_ms": 0.6}, dense) is None
    assert implausible_latency({"flops": 47.5}, {"flops": 100.0}) is None
