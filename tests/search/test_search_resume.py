"""``prunetune search --resume`` after the driver was killed mid-search.

The search runs as a real ``prunetune`` process in its own session; once Tune has recorded a
finished trial, the driver is killed (SIGKILL, no chance to clean up). ``--resume`` with only
the run's name must finish the search without running any recorded trial again: Tune appends
each run of a trial to its ``result.json``, so a trial run twice would show there.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunetune.backend.export import load_subnet
from prunetune.search._signals import SESSION_FILE

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRIALS = 6


def _prunetune(*argv: str) -> list[str]:
    return [sys.executable, "-m", "prunetune.cli", *argv]


def _states(experiment: Path) -> dict[str, str]:
    """Trial id -> status, as Tune last saved them ({} until the first save)."""
    files = glob.glob(str(experiment / "experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(Path(max(files)).read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write
        return {}
    trials = [json.loads(trial_json) for trial_json, _ in state["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def _results(experiment: Path) -> dict[str, list[dict[str, object]]]:
    """Every result each trial reported, from its ``result.json``."""
    out = {}
    for path in experiment.glob("trial_*/result.json"):
        lines = path.read_text().splitlines()
        out[path.parent.name.removeprefix("trial_")] = [json.loads(x) for x in lines if x]
    return out


def _end_session(process: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the process group the test started (Ray's helpers outlive it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                "utf-8", "replace"
            ):
                found.append(int(entry.name))
    return found


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    experiment = runs / "resume" / "tune"
    argv = ["search", "--model", "small_cnn", "--flops", "50%", "--spaces", "ratios"]
    argv += ["--trials", str(TRIALS), "--inner-epochs", "2", "--score-steps", "60"]
    argv += ["--dense-epochs", "2", "--finetune-epochs", "1", "--grace-period", "100"]
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        _prunetune(*argv, "--name", "resume", "--runs-dir", str(runs)),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(s == "TERMINATED" for s in _states(experiment).values()):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        recorded = _states(experiment)
        done_before = {t for t, s in recorded.items() if s == "TERMINATED"}
        results_before = _results(experiment)
        session = json.loads((runs / "resume" / SESSION_FILE).read_text())["session_dir"]
    except BaseException:
        _end_session(first)
        raise
    finally:
        first.kill()
        first.wait()
    assert 1 <= len(done_before) < TRIALS, recorded
    assert not (runs / "resume" / "report.md").exists()

    resumed = subprocess.Popen(
        _prunetune("search", "--name", "resume", "--runs-dir", str(runs), "--resume"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = resumed.communicate(timeout=300)
        # no process of the killed search's Ray session is left (its helpers outlived it)
        left = [pid for pid in _pids_naming(session) if pid != first.pid]
    finally:
        _end_session(resumed)
        _end_session(first)
    assert resumed.returncode == 0, err.decode()[-3000:]
    assert left == [], f"processes of the killed search's Ray session still run: {left}"

    states = _states(experiment)
    results = _results(experiment)
    assert len(states) == TRIALS
    assert set(states.values()) == {"TERMINATED"}
    for trial_id in done_before:  # finished before the kill: not one more result since
        assert results[trial_id] == results_before[trial_id]
    for trial_id, reported in results.items():  # and no trial scored its subnet twice
        assert sum("spec_json" in r for r in reported) == 1, trial_id
    summary = out.decode()
    assert all(trial_id in summary for trial_id in states)
    assert "resuming ratios" in err.decode()
    loaded = load_subnet(runs / "resume" / "best")
    assert "test accuracy" in (runs / "resume" / "report.md").read_text()
    assert loaded.spec is not None
