"""The wheel installs one import name, ``prunetune``, and works from a fresh environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path = REPO) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_adds_only_prunetune_and_runs_from_a_fresh_venv(tmp_path: Path) -> None:
    # build from a copy: setuptools reuses build/ in the source tree, where files removed since
    # an earlier build would still be packed
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--quiet",
        "-w",
        tmp_path / "dist",
        source,
    )
    (wheel,) = (tmp_path / "dist").glob("prunetune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"prunetune"}
    for layer in ("backend", "estimators", "spaces", "search", "cli", "api"):
        assert f"prunetune/{layer}/__init__.py" in names, f"the wheel lacks prunetune.{layer}"

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    before = set(os.listdir(site))
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel)
    added = set(os.listdir(site)) - before
    assert {a for a in added if not a.endswith(".dist-info")} == {"prunetune"}, added

    # the dependencies (torch, ray, ...) come from this environment's site-packages, appended
    # after the fresh one's: prunetune itself must be the wheel's copy, not this checkout
    (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = run(python, "-c", "import prunetune.backend.spec as m, prunetune; print(m.__file__)")
    assert where.strip().startswith(str(site)), where
    run(python, "-c", "import prunetune; prunetune.prune; prunetune.run_search")
    help_text = run(fresh / "bin" / "prunetune", "--help", cwd=tmp_path)
    assert "search" in help_text and "prune" in help_text
    for absent in ("backend", "search", "spaces", "estimators"):
        probe = f"import importlib.util as u; print(u.find_spec({absent!r}) is None)"
        assert run(python, "-c", probe, cwd=tmp_path).strip() == "True", absent
