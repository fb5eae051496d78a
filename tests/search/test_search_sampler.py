"""``sampler``: TPE or random search, chosen in the config or with ``--sampler``, kept on resume.

Nothing here starts Ray: the Tuner is built but never fitted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from ray import tune

from prunetune.backend.datasources import DataSource
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef
from prunetune.cli import build_parser, main
from prunetune.cli.commands.search import config_from_args
from prunetune.estimators import Target
from prunetune.search import SearchConfig
from prunetune.search._trial import TrialPayload
from prunetune.search._tuner import DefineByRun, make_sampler, make_tuner, startup_trials

FLOPS_HALF = Target.parse("flops<=50%")


@pytest.fixture(scope="module")
def graph() -> ChannelGraph:
    return ChannelGraph.trace(ModelRef("small_cnn").build(), torch.zeros(1, 1, 8, 8))


def _proposals(config: SearchConfig, graph: ChannelGraph, count: int = 6) -> list[dict[str, Any]]:
    """The first ``count`` trials the config's sampler proposes over the ratios space."""
    space = DefineByRun(
        {"ratios": {"ratios": {g.name: tune.uniform(0.1, 1.0) for g in graph.prunable_groups}}}
    )
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config))
    proposals = []
    for index in range(count):
        trial = study.ask()
        space(trial)
        proposals.append(dict(trial.params))
        study.tell(trial, float(index % 3))
    return proposals


def test_sampler_defaults_to_tpe_and_refuses_unknown_names() -> None:
    assert SearchConfig(model="small_cnn", target=FLOPS_HALF).sampler == "tpe"
    with pytest.raises(ValueError, match="unknown sampler 'grid'; valid: tpe, random"):
        SearchConfig(model="small_cnn", target=FLOPS_HALF, sampler="grid")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler)],
)
def test_each_sampler_is_seeded_by_the_config(
    graph: ChannelGraph, name: str, kind: type[optuna.samplers.BaseSampler]
) -> None:
    config = SearchConfig(model="small_cnn", target=FLOPS_HALF, sampler=name, seed=3)
    assert isinstance(make_sampler(config), kind)
    assert _proposals(config, graph) == _proposals(config, graph)
    other = SearchConfig(model="small_cnn", target=FLOPS_HALF, sampler=name, seed=4)
    assert _proposals(other, graph) != _proposals(config, graph)


@pytest.mark.parametrize(
    ("spaces", "trials", "startup"),
    [(("dsa", "dais", "ddpnas", "ratios"), 8, 5), (("ratios",), 12, 3), (("ratios",), 2, 1),
     (("dsa", "dais", "ddpnas", "ratios"), 100, 10)],
)  # fmt: skip
def test_tpe_models_results_early_in_a_short_search(
    spaces: tuple[str, ...], trials: int, startup: int
) -> None:
    config = SearchConfig(model="small_cnn", target=FLOPS_HALF, spaces=spaces, trials=trials)
    assert startup_trials(config) == startup
    sampler = make_sampler(config)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == startup  # no public accessor


def test_make_tuner_hands_the_random_sampler_to_optuna(graph: ChannelGraph, tmp_path: Path) -> None:
    config = SearchConfig(
        model="small_cnn",
        target=FLOPS_HALF,
        spaces=("ratios",),
        sampler="random",
        runs_dir=str(tmp_path),
    )
    model = ModelRef("small_cnn").build()
    payload = TrialPayload(
        model_ref=ModelRef("small_cnn").to_dict(),
        state_dict=model.state_dict(),
        input_shape=(1, 1, 8, 8),
        target=config.target.to_dict(),
        data=DataSource("digits"),
    )
    tuner = make_tuner(config, payload, graph, concurrency=2)
    # Tune has no public accessor for a Tuner's searcher; this is where it keeps it
    searcher = tuner._local_tuner._tune_config.search_alg  # type: ignore[union-attr]
    assert isinstance(searcher._ot_study.sampler, optuna.samplers.RandomSampler)


def test_sampler_round_trips_through_the_stored_settings() -> None:
    config = SearchConfig(model="small_cnn", target=FLOPS_HALF, sampler="random")
    assert config.to_dict()["sampler"] == "random"
    assert SearchConfig.from_mapping(config.to_dict()) == config


def test_sampler_flag_reaches_the_config() -> None:
    base = ["search", "--model", "small_cnn", "--flops", "50%"]
    args = build_parser().parse_args([*base, "--sampler", "random"])
    assert config_from_args(args).sampler == "random"
    assert config_from_args(build_parser().parse_args(base)).sampler == "tpe"


def test_sampler_flag_refuses_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--model", "small_cnn", "--flops", "50%", "--sampler", "grid"]) == 2
    assert "invalid choice: 'grid'" in capsys.readouterr().err


def _stored_run(tmp_path: Path, sampler: str) -> Path:
    """A run directory as an interrupted search leaves it (settings, Tune's experiment)."""
    run = tmp_path / "runs" / "half"
    (run / "tune").mkdir(parents=True)
    (run / "tune" / "tuner.pkl").write_bytes(b"")  # what Tune's can_restore looks for
    stored = SearchConfig(
        model="small_cnn", target=FLOPS_HALF, sampler=sampler, name="half", runs_dir=str(run.parent)
    )
    (run / "search.json").write_text(json.dumps(stored.to_dict()))
    return run


def test_resume_keeps_the_stored_sampler(tmp_path: Path) -> None:
    run = _stored_run(tmp_path, "random")
    argv = ["search", "--name", "half", "--runs-dir", str(run.parent), "--resume"]
    assert config_from_args(build_parser().parse_args(argv)).sampler == "random"


def test_resume_refuses_another_sampler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _stored_run(tmp_path, "random")
    argv = ["search", "--name", "half", "--runs-dir", str(run.parent), "--resume"]
    assert main([*argv, "--sampler", "tpe"]) == 2
    assert "was started with sampler='random', not 'tpe'" in capsys.readouterr().err
