"""Searches on a local Ray session (one per module): end to end, a raising trial, a dying worker.

The worker-kill test uses :func:`crash_once_cnn`, a user model (``module:factory``) that kills the
Ray worker building it the first time, so Tune's failure handling has a real death to retry.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prunetune.backend.export import load_subnet
from prunetune.backend.measure import count_flops
from prunetune.backend.models import ModelRef, create_model
from prunetune.estimators import Target
from prunetune.search import SearchConfig, run_search
from prunetune.search._cluster import ray_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CRASH_ENV = "PRUNETUNE_TEST_CRASH_MARKER"
DENSE_FLOPS = 617_088  # small_cnn on 8x8 digits
QUICK: dict[str, Any] = {
    "dense_epochs": 3,
    "finetune_epochs": 2,
    "score_steps": 30,
    "inner_epochs": 1,
    "cpus_per_trial": 1,
}


def crash_once_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """``small_cnn``, except that the first Ray worker to build it dies (``os._exit``).

    The marker file (named by ``$PRUNETUNE_TEST_CRASH_MARKER``) is claimed atomically and holds
    the id of the trial whose worker died; the driver, which is no Ray actor, never crashes.
    """
    import ray

    marker = os.environ.get(CRASH_ENV)
    if marker and ray.is_initialized() and ray.get_runtime_context().get_actor_id():
        try:
            handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            from ray import tune

            os.write(handle, str(tune.get_context().get_trial_id()).encode())
            os.close(handle)
            os._exit(1)
    return create_model("small_cnn", num_classes=num_classes, in_channels=in_channels)


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray session for the whole module, its workers told where the crash marker is."""
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CRASH_ENV, str(marker))
        patch.delenv("RAY_ADDRESS", raising=False)
        with ray_session(None, num_cpus=2):
            yield marker


def test_search_exports_a_subnet_meeting_the_target_and_records_a_raising_trial(
    crash_marker: Path, tmp_path: Path
) -> None:
    config = SearchConfig(
        model="small_cnn",
        target=Target.parse("flops<=50%"),
        spaces=("dsa", "ratios"),
        # ratios trials raise: the option names a group small_cnn does not have
        space_options={"ratios": {"ratios": {"no_such_group": 0.5}}},
        trials=4,
        round_to=8,
        name="e2e",
        runs_dir=str(tmp_path / "runs"),
        **QUICK,
    )
    result = run_search(config)

    failed = [t for t in result.trials if t.status == "failed"]
    assert len(result.trials) == 4
    assert failed and all(t.space == "ratios" for t in failed)
    assert all("ratios name unknown groups no_such_group" in (t.error or "") for t in failed)
    assert result.best.space == "dsa" and result.best.feasible
    assert all(width % 8 == 0 for width in result.spec.widths.values())
    # the final finetune continued from the weights the best trial scored
    assert result.best.weights is not None and Path(result.best.weights).is_file()
    assert all(t.weights is None for t in failed)

    loaded = load_subnet(result.export_dir)
    measured = count_flops(loaded.model, torch.zeros(1, 1, 8, 8))
    assert measured <= 0.5 * DENSE_FLOPS
    assert measured == result.metrics["flops"]
    report = result.report_path.read_text()
    assert f"- test accuracy: **{100 * result.metrics['test_acc']:.2f}%**" in report
    assert "epochs of finetuning from the trial's weights" in report
    assert "| failed |" in report
    for figure in ("pareto.png", "widths.png"):
        assert (config.run_dir / figure).stat().st_size > 1000
    assert (config.run_dir / "dense.pt").is_file()


def test_a_trial_whose_worker_dies_is_retried_and_the_search_completes(
    crash_marker: Path, tmp_path: Path
) -> None:
    model = f"{__name__}:crash_once_cnn"
    assert ModelRef(model).build() is not None  # the driver builds it without dying
    config = SearchConfig(
        model=model,
        target=Target.parse("flops<=60%"),
        spaces=("ratios",),
        trials=2,
        grace_period=100,  # ASHA stops nothing: the retried trial must run to its end
        name="crash",
        runs_dir=str(tmp_path / "runs"),
        **QUICK,
    )
    result = run_search(config)

    crashed = crash_marker.read_text()
    assert crashed in {t.trial_id for t in result.trials}
    assert all(t.status in ("finished", "stopped") for t in result.trials)
    assert next(t for t in result.trials if t.trial_id == crashed).status == "finished"
    assert _failures(config.run_dir / "tune")[crashed] == 1
    assert load_subnet(result.export_dir, expect=model).spec == result.spec  # its --model


def test_a_module_object_is_searched_through_the_python_api(
    crash_marker: Path, tmp_path: Path
) -> None:
    import prunetune

    class Tiny(nn.Module):  # defined here: the trials get it by value through the object store
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            )  # fmt: skip
            self.classifier = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Tiny()
    result = prunetune.run_search(
        net,
        "flops<=50%",
        data="digits",
        spaces=("ratios",),
        trials=2,
        name="module",
        runs_dir=str(tmp_path / "runs"),
        options={k: v for k, v in QUICK.items() if k != "dense_epochs"},
    )
    assert isinstance(result.model, Tiny)
    example = torch.zeros(1, 1, 8, 8)
    dense = count_flops(net, example)
    assert count_flops(result.model, example) == result.metrics["flops"] <= 0.5 * dense
    assert (
        result.spec.model.name.endswith("Tiny") and not (tmp_path / "runs/module/dense.pt").exists()
    )
    back = prunetune.load(result.export_dir)  # the export's own program: Tiny is not importable
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(back.model(x), result.model(x), rtol=1e-5, atol=1e-5)


def _failures(experiment: Path) -> dict[str, int]:
    """Failures per trial, from Tune's saved experiment state."""
    (state_file,) = glob.glob(str(experiment / "experiment_state-*.json"))
    state = json.loads(Path(state_file).read_text())
    failures = {}
    for trial_json, metadata_json in state["trial_data"]:
        metadata = json.loads(metadata_json)
        failures[json.loads(trial_json)["trial_id"]] = int(metadata["num_failures"])
    return failures


def test_final_finetune_falls_back_to_dense_weights_when_the_trials_are_unreadable(
    tmp_path: Path,
) -> None:
    from prunetune.search._final import _load_trial_weights
    from prunetune.search._result import TrialRecord

    subnet = create_model("small_cnn")
    before = {k: v.clone() for k, v in subnet.state_dict().items()}
    corrupt = tmp_path / "subnet.pt"
    corrupt.write_bytes(b"not a state dict")
    record = TrialRecord(trial_id="t", space="dsa", status="finished", weights=str(corrupt))
    start, why = _load_trial_weights(subnet, record)
    assert start == "the dense weights" and why.startswith("UnpicklingError")
    assert all(torch.equal(v, before[k]) for k, v in subnet.state_dict().items())
    other = create_model("small_cnn")
    torch.save(other.state_dict(), corrupt)
    assert _load_trial_weights(subnet, record) == ("the trial's weights", "")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in subnet.state_dict().items())
    none = TrialRecord(trial_id="t", space="dsa", status="finished")
    assert _load_trial_weights(subnet, none) == (
        "the dense weights",
        "the trial left no checkpoint readable from this driver",
    )
