"""``SearchConfig`` checks, the define-by-run space, and ``prunetune search`` refusing bad input.

Nothing here starts Ray: every refusal happens before it would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from ray import tune

from prunetune.backend.errors import DeviceError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef
from prunetune.backend.training import Runtime
from prunetune.cli import main
from prunetune.estimators import Target, profile_model
from prunetune.search import SearchConfig
from prunetune.search._tuner import DefineByRun

FLOPS_HALF = Target.parse("flops<=50%")


def test_defaults_search_every_registered_space() -> None:
    from prunetune.spaces import list_spaces

    config = SearchConfig(model="small_cnn", target=FLOPS_HALF)
    assert config.spaces == tuple(list_spaces())
    assert config.run_dir == Path("runs") / "search"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spaces": ("ratios", "nosuch")}, r"unknown space 'nosuch'; valid: .*ratios"),
        ({"trials": 0}, "trials must be at least 1, got 0"),
        ({"trials": 2.5}, "trials must be an integer"),
        ({"round_to": 0}, "round_to must be at least 1, got 0"),
        ({"cpus_per_trial": 0}, "cpus_per_trial must be at least"),
        ({"name": "../escape"}, "run name '../escape' is invalid"),
        ({"resume": True, "overwrite": True}, "pick one"),
        ({"address": "nohost"}, "Ray address 'nohost' is invalid"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"model": None}, r"name a model \(--model\)"),
        ({"space_options": {"dsa": {"nope": 1}}}, "space 'dsa' has no option 'nope'"),
        ({"spaces": ("ratios",), "space_options": {"dsa": {}}}, "which is not searched"),
        ({"target": Target.parse("latency<=2ms")}, "needs a latency profile"),
    ],
)
def test_config_refuses_bad_values(kwargs: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"model": "small_cnn", "target": FLOPS_HALF, **kwargs}
    with pytest.raises(ValueError, match=message):
        SearchConfig(**values)


def test_inner_epochs_sets_each_spaces_length_option_with_its_type() -> None:
    config = SearchConfig(
        model="small_cnn",
        target=FLOPS_HALF,
        inner_epochs=1.6,
        space_options={"dais": {"epochs": 0.5}},
    )
    assert config.fixed_options("ratios") == {"finetune_epochs": 1.6}
    assert config.fixed_options("dsa") == {"epochs": 2}  # an int option gets an int
    assert config.fixed_options("dais") == {"epochs": 0.5}  # explicit options win


def test_yaml_settings_and_flags_merge_with_flags_winning(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text("model: small_cnn\nflops: 40%\nspaces: [ratios, dsa]\ntrials: 3\nseed: 5\n")
    config = SearchConfig.from_yaml(path, trials=7, spaces="ratios")
    assert (config.trials, config.spaces, config.seed) == (7, ("ratios",), 5)
    assert config.target == Target.parse("flops<=40%")
    again = SearchConfig.from_mapping(config.to_dict())
    assert again == config


def test_from_mapping_names_unknown_settings() -> None:
    with pytest.raises(ValueError, match="unknown search setting 'trails'; valid settings: "):
        SearchConfig.from_mapping({"model": "small_cnn", "flops": "50%", "trails": 3})


def test_define_by_run_picks_a_space_then_only_its_options() -> None:
    graph = ChannelGraph.trace(ModelRef("small_cnn").build(), torch.zeros(1, 1, 8, 8))
    groups = [g.name for g in graph.prunable_groups]
    space = DefineByRun(
        {
            "ratios": {"ratios": {name: tune.uniform(0.1, 1.0) for name in groups}},
            "other": {
                "lr": tune.loguniform(1e-3, 1e-1),
                "steps": tune.randint(1, 4),
                "keep": tune.choice([(0.5, 1.0), (0.25, 1.0)]),
                "fixed": 7,
            },
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        returned = space(trial) or {}
        chosen = trial.params["space"]
        seen.add(chosen)
        assert all(k == "space" or k.startswith(f"{chosen}/") for k in trial.params)
        if chosen == "ratios":
            assert sorted(k.split("/")[-1] for k in trial.params if k != "space") == sorted(groups)
        else:
            assert 1 <= trial.params["other/steps"] <= 3  # randint's upper bound is exclusive
            assert returned["other/keep"] in [(0.5, 1.0), (0.25, 1.0)]
            assert returned["other/fixed"] == 7
        study.tell(trial, 0.5)
    assert seen == {"ratios", "other"}


@pytest.fixture(scope="module")
def other_models_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (coarse) latency profile of resnet20, not of small_cnn."""
    model = ModelRef("resnet20", {"num_classes": 10, "in_channels": 1}).build()
    graph = ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))
    profile = profile_model(model, graph, widths_grid=2, repeats=1, warmup=0, measure_model=False)
    path = tmp_path_factory.mktemp("profiles") / "resnet20.json"
    profile.save(path)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--flops", "50%", "--spaces", "ratios,nosuch"], "unknown space 'nosuch'; valid:"),
        (["--flops", "0.01%"], "below the smallest subnet"),
        (["--flops", "150%"], "above the dense model"),
        (["--params", "2M"], "above the dense model"),
        (["--latency", "2ms"], "needs a latency profile"),
        (["--latency", "0.1ms", "--profile", "PROFILE"], "made for another model"),
        (["--flops", "50%", "--address", "127.0.0.1:1"], "cannot reach a Ray cluster"),
        (["--flops", "50%", "--runs-dir", "/proc/x"], "cannot write '/proc/x/"),
        (["--flops", "50%", "--resume"], "nothing to resume"),
        (["--flops", "50%", "--trials", "0"], "trials must be at least 1"),
        (["--flops", "half"], "cannot read flops target 'half'"),
        (["--flops", "50%", "--space-option", "dsa.nope=1"], "has no option 'nope'"),
        (["--flops", "50%", "--model", "nosuch"], "unknown model 'nosuch'"),
        (["--flops", "50%", "--checkpoint", "/no/such.pt"], "does not exist"),
        (["--flops", "50%", "--dataset", "mnist", "--data-dir", "/no/such"], "does not exist"),
    ],
)
def test_search_refuses_bad_input_in_one_line_writing_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    other_models_profile: Path,
    argv: list[str],
    message: str,
) -> None:
    runs = tmp_path / "runs"
    argv = [str(other_models_profile) if a == "PROFILE" else a for a in argv]
    base = ["search", "--model", "small_cnn", "--name", "bad", "--runs-dir", str(runs)]
    code = main([*base, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("prunetune search: error: ")
    assert message in err[0]
    assert not runs.exists()


def test_search_refuses_to_mix_into_an_existing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "taken" / "tune"
    run.mkdir(parents=True)
    (run / "tuner.pkl").write_bytes(b"")  # what Tune's can_restore looks for
    before = sorted(p.name for p in run.parent.rglob("*"))
    argv = ["search", "--model", "small_cnn", "--flops", "50%", "--name", "taken"]
    assert main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in run.parent.rglob("*")) == before


@pytest.mark.parametrize(
    ("error", "address", "env", "message"),
    [
        (  # Ray 2.60's words, chained below "Failed to connect to Ray cluster at ..."
            "RPC error: InvalidAuthToken: Authentication token is missing or incorrect. Note: "
            "RAY_AUTH_MODE is currently 'disabled' (not 'token').",
            "10.0.0.5:6379",
            {},
            r"uses token authentication; set RAY_AUTH_MODE=token here.*\(RPC error: Invalid",
        ),
        (
            "[2026-11-30 10:25:54,405 W 1 1] gcs_client.cc:210: Failed to get cluster ID from "
            "GCS server: Unauthenticated: RPC error: InvalidAuthToken: Authentication token is "
            "missing or incorrect",
            "ray://10.0.0.5:10001",
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"},
            r"token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token is not the "
            r"cluster's \(Failed to get cluster ID",
        ),
        (
            "[2026-11-30 10:24:59,564 C 15733 15733] raylet_ipc_client.cc:85: Failed to connect "
            "to socket at address:/tmp/ray/session_1/sockets/raylet\n*** StackTrace ***",
            "10.0.0.5:6379",
            {},
            r"this machine is not a node of that cluster.*ray start --address HOST:PORT",
        ),
        ("Timed out after 60 s", "10.0.0.5:6379", {}, r"10\.0\.0\.5:6379: Timed out after 60 s$"),
    ],
    ids=["no token", "wrong token", "not a node", "other"],
)
def test_connection_errors_name_their_cause(
    error: str,
    address: str,
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from prunetune.search._cluster import connect_error

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cause = RuntimeError(error)
    try:
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}") from cause
    except ConnectionError as exc:
        found = connect_error(address, exc)
    assert str(found).startswith(f"cannot connect to the Ray cluster at {address}: ")
    assert re.search(message, str(found))


def test_device_precision_and_fractional_gpus_reach_the_trials() -> None:
    config = SearchConfig.from_mapping(
        {"flops": "50%", "model": "small_cnn", "device": "cuda:0", "gpus_per_trial": 0.25,
         "precision": "bf16", "channels_last": True, "metric": "miou", "output": "0"}
    )  # fmt: skip
    assert config.runtime == Runtime(device="cuda:0", precision="bf16", channels_last=True)
    assert config.task.metric_name == "miou" and config.task.output == 0
    with pytest.raises(ValueError, match=r"device 'cuda' needs --gpus-per-trial above 0"):
        SearchConfig(target=FLOPS_HALF, model="small_cnn", device="cuda")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:<index>"):
        SearchConfig(target=FLOPS_HALF, model="small_cnn", device="tpu")
    with pytest.raises(ValueError, match=r"cannot import metric .*'no_such_module:Metric'"):
        SearchConfig(target=FLOPS_HALF, model="small_cnn", metric="no_such_module:Metric")


def test_a_model_wider_than_the_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(torch.nn.Module, "to", out_of_memory)
    with pytest.raises(DeviceError, match=r"does not fit on cpu \(CUDA out of memory.*smaller"):
        Runtime(device="cpu").model(torch.nn.Linear(2, 2))
