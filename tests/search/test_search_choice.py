"""How a search chooses its subnet: ranking, the second look at the best trials (re-scoring),
the CPU seconds it counts, and the report's "how sure" section. No Ray: the records are built
here, as Tune would have returned them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from prunetune.backend.data import split_length
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.estimators import Target
from prunetune.search import SearchConfig
from prunetune.search._final import NoFeasibleTrialError, _choose, ranked
from prunetune.search._report import render
from prunetune.search._result import Candidate, SearchResult, TrialRecord
from prunetune.search._setup import Prepared, prepare


def _prepared(tmp_path: Path, **options: object) -> Prepared:
    config = SearchConfig(
        model="small_cnn",
        target=Target.parse("flops<=60%"),
        dataset="digits",
        spaces=("ratios",),
        name="choice",
        runs_dir=str(tmp_path),
        score_steps=3,
        **options,  # type: ignore[arg-type]
    )
    return prepare(config)


def _record(
    prepared: Prepared, tmp_path: Path, trial_id: str, keep: float, score: float
) -> TrialRecord:
    """A finished trial whose subnet keeps ``keep`` of every group, with saved weights."""
    graph = prepared.graph
    widths = {g.name: max(1, round(keep * g.size)) for g in graph.prunable_groups}
    spec = SubnetSpec.from_widths(graph, prepared.ref, widths)
    subnet = prune_model(prepared.model, graph, spec)
    weights = tmp_path / f"{trial_id}.pt"
    torch.save(subnet.state_dict(), weights)
    return TrialRecord(
        trial_id=trial_id,
        space="ratios",
        status="finished",
        score=score,
        flops=1e6 * keep,
        feasible=True,
        spec_json=spec.to_json(indent=None),
        weights=str(weights),
    )


def test_ranked_orders_by_score_then_fewer_flops_and_refuses_no_feasible() -> None:
    a = TrialRecord("a", "dsa", "finished", score=0.9, flops=2.0, feasible=True)
    b = TrialRecord("b", "dais", "finished", score=0.9, flops=1.0, feasible=True)
    c = TrialRecord("c", "dais", "finished", score=0.95, flops=3.0, feasible=False)
    d = TrialRecord("d", "ratios", "stopped", score=0.99)
    assert [r.trial_id for r in ranked([a, b, c, d])] == ["b", "a"]
    with pytest.raises(NoFeasibleTrialError, match="1 finished, 1 stopped"):
        ranked([c, d])


def test_rescoring_chooses_by_the_second_score_and_lists_runners_up(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, rescore_top=2, rescore_steps=2)
    records = [
        _record(prepared, tmp_path, "wide", 0.5, score=0.50),
        _record(prepared, tmp_path, "narrow", 0.3, score=0.60),
        _record(prepared, tmp_path, "tiny", 0.2, score=0.10),
    ]
    messages: list[str] = []
    chosen, candidates = _choose(prepared, records, messages.append)
    assert "scoring the best 2 trials again: 2 more finetune steps each" in messages[0]
    # the top two by their trial score were scored again, the third was not
    second = {c.trial_id: c.rescore for c in candidates}
    assert second["tiny"] is None
    assert second["wide"] is not None and second["narrow"] is not None
    best = max(("wide", "narrow"), key=lambda t: (second[t] or 0.0, t == "narrow"))
    assert chosen.record.trial_id == best and chosen.rescore == second[best]
    assert [c.trial_id for c in candidates if c.chosen] == [best]
    assert candidates[0].trial_id == best  # the chosen one first, then the runners-up
    assert {c.trial_id for c in candidates} == {"wide", "narrow", "tiny"}
    # the subnet carries the trial's weights after the extra steps: they differ from the file
    saved = torch.load(chosen.record.weights or "", weights_only=True)
    state = chosen.subnet.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in saved.items() if v.is_floating_point())


def test_without_rescoring_the_best_trial_score_wins(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, rescore_top=0)
    records = [
        _record(prepared, tmp_path, "wide", 0.5, score=0.50),
        _record(prepared, tmp_path, "narrow", 0.3, score=0.60),
    ]
    chosen, candidates = _choose(prepared, records, lambda _: None)
    assert chosen.record.trial_id == "narrow" and chosen.rescore is None
    assert [(c.trial_id, c.rescore, c.chosen) for c in candidates] == [
        ("narrow", None, True),
        ("wide", None, False),
    ]


def test_report_says_how_sure_the_choice_is(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, rescore_top=2, rescore_steps=7)
    best = TrialRecord("t1", "dais", "finished", score=0.90, flops=1.0, params=1.0, feasible=True)
    other = TrialRecord("t2", "dsa", "finished", score=0.91, flops=1.0, params=1.0, feasible=True)
    candidates = (
        Candidate("t1", "dais", 0.90, 0.95, 1e6, chosen=True),
        Candidate("t2", "dsa", 0.91, 0.93, 2e6),
        Candidate("t3", "ratios", 0.80, None, 3e6),
    )
    metrics = {
        "test_acc": 0.9, "dense_test_acc": 0.95, "val_acc": 0.9,
        "flops": 1.0, "dense_flops": 2.0, "params": 1.0, "dense_params": 2.0,
        "start": "the trial's weights", "start_problem": "",
    }  # fmt: skip
    text = render(prepared, [best, other], best, metrics, candidates)
    n = split_length(prepared.data.val)
    assert f"**{n} validation examples**" in text
    assert "after 7 more steps" in text
    assert "| *t1 | dais | 90.00% | 95.00% | 1M |" in text
    assert "| t2 | dsa | 91.00% | 93.00% | 2M |" in text
    assert "| t3 | ratios | 80.00% | - | 3M |" in text
    assert f"leads its best runner-up by 2.00% ({round(0.02 * n)} validation examples)" in text
    assert "How sure" not in render(prepared, [best], best, metrics)


def test_result_sums_the_trials_cpu_seconds() -> None:
    trials = (
        TrialRecord("a", "dsa", "finished", cpu_s=2.5),
        TrialRecord("b", "dsa", "stopped", cpu_s=1.0),
        TrialRecord("c", "dsa", "failed"),
    )
    result = SearchResult(
        name="n", run_dir=Path("r"), best=trials[0], spec=None,  # type: ignore[arg-type]
        metrics={}, export_dir=Path("e"), report_path=Path("p"), trials=trials, elapsed_s=1.0,
    )  # fmt: skip
    assert result.trials_cpu_s == 3.5
    assert dataclasses.replace(result, trials=()).trials_cpu_s == 0.0


def test_rescore_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="rescore_top must be at least 0"):
        SearchConfig(model="small_cnn", target=Target.parse("flops<=50%"), rescore_top=-1)
    with pytest.raises(ValueError, match="rescore_steps must be at least 1"):
        SearchConfig(model="small_cnn", target=Target.parse("flops<=50%"), rescore_steps=0)
