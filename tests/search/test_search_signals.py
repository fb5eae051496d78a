"""Interrupts are interrupts: SIGINT (Ctrl-C, to the whole process group) and SIGTERM (to the
driver) during ``prunetune search`` stop the trials, keep the state for ``--resume``, print one
line saying how to resume, exit 130 / 143, and finetune or export nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunetune.search._tuner import can_resume
from tests.search.test_search_resume import REPO, _states

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_signal_stops_the_search_and_keeps_its_state(
    tmp_path: Path, signum: int, group: bool
) -> None:
    runs = tmp_path / "runs"
    experiment = runs / "stop" / "tune"
    argv = ["search", "--model", "small_cnn", "--flops", "50%", "--spaces", "ratios"]
    argv += ["--trials", "8", "--inner-epochs", "1", "--score-steps", "30", "--dense-epochs", "1"]
    argv += ["--grace-period", "100", "--name", "stop", "--runs-dir", str(runs)]
    process = subprocess.Popen(
        [sys.executable, "-m", "prunetune.cli", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _states(experiment):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the trials did not start in time"
            time.sleep(0.3)
        if group:
            os.killpg(process.pid, signum)  # as Ctrl-C in a terminal does
        else:
            process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    text = err.decode()
    assert process.returncode == 128 + signum, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"prunetune search: interrupted by {signal.Signals(signum).name}")
    assert f"--name stop --runs-dir {runs} --resume" in last
    assert "Traceback" not in text and "*** SIG" not in text, text[-3000:]
    assert out == b""
    assert not (runs / "stop" / "best").exists() and not (runs / "stop" / "report.md").exists()
    assert can_resume(runs / "stop")
