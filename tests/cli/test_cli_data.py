"""The command line with data from a factory and from an image folder (bad data: one line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunetune.cli import main
from tests.backend.test_datasources import write_image_folder


def test_the_cli_trains_on_a_factory_and_refuses_bad_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dense.pt"
    code = main(["train", "--model", "small_cnn", "--dataset", "tests.factories:digits_datasets",
                 "--workers", "0", "--epochs", "1", "--out", str(out)])  # fmt: skip
    assert code == 0 and out.is_file()
    assert "tests.factories:digits_datasets: 1294 train / 144 val" in capsys.readouterr().err
    root = write_image_folder(tmp_path / "pets", splits=("train",))
    code = main(["train", "--model", "small_cnn", "--dataset", "imagefolder", "--data-dir",
                 str(root), "--out", str(tmp_path / "x.pt")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no val/ folder" in err[0]
