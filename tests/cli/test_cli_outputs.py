"""Never destroy what the user had: outputs only replace their own kind, stale temporaries of a
killed run are cleared, and a full disk is one line with nothing half-written."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prunetune.backend.io import clear_stale_temporaries
from prunetune.cli import main
from prunetune.search import _run
from prunetune.search._cluster import ClusterInfo

PRUNE = ["prune", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--flops", "50%"]


def _one_line(capsys: pytest.CaptureFixture[str], message: str) -> None:
    """The error is the last line on stderr (progress lines come before it), and one line."""
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert message in last and last.startswith("prunetune ") and "Traceback" not in err, err


def test_prune_out_refuses_a_folder_of_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main([*PRUNE, "--out", str(out)]) == 2
    _one_line(capsys, "holds files that are not a prunetune export (thesis.tex)")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert main([*PRUNE, "--out", str(out), "--overwrite"]) == 0
    assert (out / "subnet.json").is_file() and not (out / "thesis.tex").exists()
    # over its own earlier export, and into an empty folder, no flag is needed
    assert main([*PRUNE, "--out", str(out)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*PRUNE, "--out", str(empty)]) == 0
    # an export the user added a file to is no longer only an export
    (empty / "notes.txt").write_text("mine")
    assert main([*PRUNE, "--out", str(empty)]) == 2
    assert (empty / "notes.txt").exists()


@pytest.mark.parametrize("command", ["train", "profile"])
def test_file_outputs_refuse_an_existing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "precious.bin"
    out.write_text("keep me")
    argv = [command, "--model", "small_cnn", "--out", str(out)]
    assert main(argv) == 2
    _one_line(capsys, "exists; pass --overwrite to replace it")
    assert out.read_text() == "keep me"


def test_train_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "dense.pt"
    out.write_text("old")
    assert main(["train", "--model", "small_cnn", "--epochs", "0.05", "--out", str(out)]) == 2
    argv = ["train", "--model", "small_cnn", "--epochs", "0.05", "--out", str(out), "--overwrite"]
    assert main(argv) == 0
    assert out.read_bytes()[:2] == b"PK"


def test_stale_temporaries_of_a_killed_write_are_cleared(tmp_path: Path) -> None:
    stale = [tmp_path / ".pruned.k3j_x9ab", tmp_path / ".pruned.old.abcdefgh"]
    for folder in stale:
        folder.mkdir()
        (folder / "weights.pt").write_bytes(b"half")
    (tmp_path / ".dense.pt.q1w2e3r4").write_bytes(b"half")
    mine = tmp_path / ".pruned.conf"
    mine.write_text("a user's hidden file")
    assert main([*PRUNE, "--out", str(tmp_path / "pruned")]) == 0
    assert not any(p.exists() for p in stale)
    assert (tmp_path / ".dense.pt.q1w2e3r4").exists()  # another target's: not this write's
    assert clear_stale_temporaries(tmp_path) == [tmp_path / ".dense.pt.q1w2e3r4"]
    assert mine.exists()


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != ".pytest_cache")


def test_full_disk_in_train_and_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "save", _no_space)
    out = tmp_path / "dense.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "0.05", "--out", str(out)]) == 2
    _one_line(capsys, "No space left on device; nothing was written (free some space")
    assert main([*PRUNE, "--out", str(tmp_path / "pruned")]) == 2
    _one_line(capsys, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_during_a_search_and_stale_best_cleared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = tmp_path / "dense.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "0.05", "--out", str(dense)]) == 0
    run_dir = tmp_path / "runs" / "full"
    (run_dir / ".best.a1b2c3d4").mkdir(parents=True)  # a kill -9 during the final export

    @contextlib.contextmanager
    def no_ray(address: str | None) -> Iterator[ClusterInfo]:
        yield ClusterInfo("local", 1, 2.0, 0.0, 2.0, 0.0)

    class FullDiskTuner:
        def fit(self) -> None:
            assert not (run_dir / ".best.a1b2c3d4").exists()
            _no_space()

    monkeypatch.setattr(_run, "ray_session", no_ray)
    monkeypatch.setattr(_run, "make_tuner", lambda *args: FullDiskTuner())
    argv = ["search", "--checkpoint", str(dense), "--flops", "50%", "--trials", "2"]
    argv += ["--spaces", "ratios", "--name", "full", "--runs-dir", str(tmp_path / "runs")]
    capsys.readouterr()
    assert main(argv) == 2
    _one_line(capsys, "No space left on device; no result was exported, the trials so far are kept")
    assert not (run_dir / "best").exists() and _hidden(run_dir) == []
