"""Every code block of the README runs as written: the Python block is executed, every shell
command is checked against the parser it reaches (prunetune's, the Makefile's targets, the
scripts), and the prunetune commands run in order with small settings (``slow``)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from prunetune.cli import build_parser, main
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


_ILLUSTRATION = "<!-- illustration:"


def _blocks(language: str, illustrations: bool = False) -> list[str]:
    """The README's code blocks in ``language``: those that run here, or (``illustrations``)
    those marked ``<!-- illustration: needs ... -->`` for lack of the user's data or a GPU."""
    found = re.findall(rf"(<!-- illustration:[^\n]*-->\n)?```{language}\n(.*?)```", README, re.S)
    return [code for marker, code in found if bool(marker) == illustrations]


def _commands() -> list[list[str]]:
    """The shell commands of the README, continuations joined, comments dropped, in order."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_the_readme_has_code_to_check() -> None:
    assert len(_blocks("python")) == 2 and len(_commands()) >= 15
    assert len(_blocks("python", illustrations=True)) == 2


@pytest.mark.parametrize("index", range(len(_blocks("python", illustrations=True))))
def test_illustrations_compile_and_call_real_arguments(index: int) -> None:
    """What cannot run here (your data, a GPU) still parses, and every keyword it passes to a
    ``prunetune`` function exists in that function's signature."""
    import ast
    import inspect

    import prunetune

    code = _blocks("python", illustrations=True)[index]
    tree = ast.parse(code)
    calls = 0
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "prunetune":
            accepted = inspect.signature(getattr(prunetune, func.attr)).parameters
            for keyword in node.keywords:  # type: ignore[attr-defined]
                assert keyword.arg in accepted, f"prunetune.{func.attr} takes no {keyword.arg}"
            calls += 1
    assert calls >= 1


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the blocks write under runs/, as a user's would
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[index], "README.md", "exec"), namespace)
    assert namespace["result"].spec.widths  # type: ignore[attr-defined]


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w)[:60])
def test_every_shell_command_is_valid(words: list[str]) -> None:
    program, *args = words
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
        assert set(args) <= set(targets), f"no make target {args}"
    elif program == ".venv/bin/prunetune":
        build_parser().parse_args(args)  # argparse exits on an unknown flag or a bad value
    elif program == ".venv/bin/python":
        script = REPO / args[0]
        assert script.is_file(), script
        done = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, timeout=120, cwd=REPO
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    elif program == ".venv/bin/pip":
        assert args[0] == "install"
    else:
        raise AssertionError(f"README command of an unknown kind: {' '.join(words)}")


def test_readme_searches_do_not_collide_with_make_demo() -> None:
    """``make demo`` makes run ``demo``; the README's own searches must not need it absent."""
    names = []
    for words in _commands():
        if words[:2] == [".venv/bin/prunetune", "search"] and "--resume" not in words:
            names.append(words[words.index("--name") + 1])
    assert "demo" not in names and len(set(names)) == len(names), names


def _small(words: list[str], data_dir: Path) -> list[str]:
    """A README prunetune command with small settings: what it checks stays the same."""
    args = list(words[1:])
    for option, value in (("--epochs", "0.05"), ("--batch-size", "2")):
        if option in args:
            args[args.index(option) + 1] = value
    if "--data-dir" in args:
        args[args.index("--data-dir") + 1] = str(data_dir)
    if args[0] == "profile":
        args += ["--grid", "2", "--repeats", "1", "--calibration-subnets", "2", "--threads", "1"]
    return args


@pytest.mark.slow
def test_readme_commands_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_dir: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    ran = 0
    for words in _commands():
        if words[0] != ".venv/bin/prunetune" or words[1] == "search":
            continue  # searches need Ray: test_search_* run them; make demo runs the first
        args = _small(words, mnist_dir)
        assert main(args) == 0, " ".join(args)
        ran += 1
    assert ran >= 8 and (tmp_path / "fast" / "subnet.json").is_file()
    assert SHARED_DATA.is_dir()
