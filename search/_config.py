"""``SearchConfig``: everything one search needs, checked where it enters.

A config comes from Python (``SearchConfig(...)``), from a YAML file
(:meth:`SearchConfig.from_yaml`) or from the command line; :meth:`SearchConfig.from_mapping` is
the one place that reads loose values (``"flops": "50%"``, ``"spaces": "dsa,ratios"``), so a
YAML file and command-line flags mean the same thing. Flags win over the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prunetune.backend.data import list_datasets
from prunetune.backend.datasources import IMAGEFOLDER, DataSource, is_data_name
from prunetune.backend.errors import PrunetuneError
from prunetune.backend.training import Precision, Runtime, Task
from prunetune.estimators import Target
from prunetune.spaces import create_space, list_spaces

__all__ = ["SAMPLERS", "Sampler", "SearchConfig"]

# the Optuna samplers a search may use, by the name ``--sampler`` takes
Sampler = Literal["tpe", "random"]
SAMPLERS: tuple[Sampler, ...] = ("tpe", "random")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TARGET_KEYS = ("flops", "params", "latency")
# the option that sets the length of each space's inner run, in the order they are looked for
_LENGTH_OPTIONS = ("epochs", "finetune_epochs", "max_epochs")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One search: the model, the data, the target, the spaces and how trials run.

    Attributes:
        target: the constraints the best subnet must meet (``Target.from_options(flops="50%")``).
        model: zoo name or ``package.module:factory``; may be left out with ``checkpoint``.
        dataset: ``digits`` (embedded), ``mnist`` or ``cifar10`` (in memory), ``imagefolder``
            (``data_dir`` holds ``train/``, ``val/`` and optionally ``test/`` class folders),
            ``package.module:factory`` returning the splits (see
            :class:`~prunetune.backend.datasources.DataSource`), or ``python`` (split objects
            given to :func:`run_search`).
        data_dir: directory of the mnist/cifar10 files or image folder (a factory's ``root``);
            with a cluster it must exist at the same path on every node.
        image_size: ``imagefolder``: the side images are cropped to, in pixels.
        workers: DataLoader worker processes per loader for streamed data (not the built-ins).
        checkpoint: dense checkpoint file (or subnet export directory) to search from; without
            it the dense model is trained first and cached as ``runs/<name>/dense.pt``.
        profile: latency profile (``prunetune profile``) of the model, needed by a latency target.
        spaces: names of the spaces to search over (default: every registered space).
        trials: trials to run in all.
        sampler: how Optuna proposes each trial's space and options: ``tpe`` (Tree-structured
            Parzen Estimator, the default) or ``random`` (independent uniform draws, a baseline
            for the search itself). Both are seeded by ``seed``.
        cpus_per_trial: CPUs Ray reserves for each trial (also its torch threads).
        gpus_per_trial: GPUs Ray reserves for each trial.
        address: Ray cluster to connect to (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``);
            ``None`` uses ``RAY_ADDRESS`` if set, else starts Ray on this machine (loopback only).
        name: the run's name: results go to ``runs_dir/name``.
        runs_dir: the folder holding every run.
        resume: continue an interrupted search of the same name.
        overwrite: start the run again from scratch (the cached dense model is kept).
        seed: seeds the data split, the dense training, the searcher and every trial.
        dense_epochs: epochs of dense training when no checkpoint is given.
        finetune_epochs: epochs of the final finetune of the best subnet.
        finetune_lr: peak learning rate of the final finetune and of the trials' score finetune.
        distill_weight: share of the finetunes' loss from distillation (with ``distill``).
        score_steps: SGD steps of the short finetune that scores every trial's subnet (the same
            for all spaces, so their accuracies compare).
        rescore_top: after the trials, the best this many feasible trials are scored again: each
            gets ``rescore_steps`` more steps of the same finetune from the weights its trial
            scored, and the best of them after that is chosen (its weights start the final
            finetune). 0 or 1 chooses on the trials' own scores. Short score finetunes on a small
            validation split tie often; a second, longer look at a few candidates makes the
            choice less a matter of chance (successive halving's last rung).
        rescore_steps: steps of that second finetune; ``None``: ``score_steps``.
        inner_epochs: when set, the length of every space's inner run (its ``epochs``,
            ``finetune_epochs`` or ``max_epochs`` option); ``None`` keeps each space's default.
        space_options: fixed options by space name, e.g. ``{"dsa": {"epochs": 2}}``; they win
            over ``inner_epochs`` and are not searched.
        distill: distil the dense model into the subnet while finetuning (score and final).
        pareto: search accuracy against FLOPs (multi-objective) instead of accuracy alone.
        batch_size: examples per training step in trials and finetuning.
        round_to: keep every searched width at a multiple of this where the group is that wide
            (8 or 16 suit CPU and GPU kernels: the same FLOPs run faster); 1: any width.
        grace_period: reports a trial makes before ASHA may stop it.
        max_failures: retries of a trial whose worker process dies.
        fold_normalization: build the inputs' normalisation into the exported ``model.pt2`` and
            ``model.onnx``, so they take raw pixel values in [0, 1].
        trust_model_code: build the ``package.module:factory`` a checkpoint names even when it
            is not ``model`` (importing it runs its code; zoo models never need this).
        device: where every loop runs: ``auto`` (the GPU Ray gave the trial, else the CPU),
            ``cpu``, ``cuda`` or ``cuda:<index>``.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (fp16 with a gradient scaler).
        channels_last: models and batches in NHWC layout (faster on GPU tensor cores).
        loss: ``cross_entropy`` or a callable ``loss(outputs, targets)`` (or its
            ``package.module:name``).
        metric: ``top1`` (reported as ``acc``), ``miou``, ``pixel_acc``, or a metric class (or
            its ``package.module:name``); the search optimises, stops and chooses by it.
        output: which model output the loss, metric and distillation use (dict key or index).
        ignore_index: target value the loss and dense metrics skip.
    """

    target: Target
    model: str | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 224
    workers: int = 2
    checkpoint: str | None = None
    profile: str | None = None
    spaces: tuple[str, ...] = ()
    trials: int = 16
    sampler: Sampler = "tpe"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None
    name: str = "search"
    runs_dir: str = "runs"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    dense_epochs: float = 15.0
    finetune_epochs: float = 10.0
    finetune_lr: float = 0.01
    distill_weight: float = 0.7
    score_steps: int = 150
    rescore_top: int = 3
    rescore_steps: int | None = None
    inner_epochs: float | None = None
    space_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    distill: bool = True
    pareto: bool = False
    batch_size: int = 64
    round_to: int = 1
    grace_period: int = 2
    max_failures: int = 2
    trust_model_code: bool = False
    fold_normalization: bool = False
    device: str = "auto"
    precision: Precision = "fp32"
    channels_last: bool = False
    loss: str | Callable[..., Any] = "cross_entropy"
    metric: str | Callable[..., Any] = "top1"
    output: str | int | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target):
            raise TypeError(f"target must be a Target, got {type(self.target).__name__}")
        flags = (
            "resume",
            "overwrite",
            "distill",
            "pareto",
            "trust_model_code",
            "fold_normalization",
        )
        for flag in flags:
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {value!r}")
        for text in ("model", "data_dir", "checkpoint", "profile", "address", "dataset"):
            value = getattr(self, text)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{text} must be a string, got {value!r}")
        if not self.model and not self.checkpoint:
            raise ValueError("name a model (--model) or a dense checkpoint (--checkpoint)")
        if not isinstance(self.dataset, str) or not is_data_name(self.dataset):
            raise ValueError(
                f"unknown dataset {self.dataset!r}; valid: {', '.join(list_datasets())}, "
                f"{IMAGEFOLDER} (with --data-dir) or package.module:factory"
            )
        _check_number("image_size", self.image_size, minimum=1, integer=True)
        _check_number("workers", self.workers, minimum=0, integer=True)
        if "latency_ms" in self.target.metrics and not self.profile:
            raise ValueError(
                f"target {self.target} needs a latency profile: measure one with prunetune "
                "profile and pass --profile PROFILE.json"
            )
        spaces = tuple(self.spaces) or tuple(list_spaces())
        unknown = [s for s in spaces if s not in list_spaces()]
        if unknown:
            raise ValueError(f"unknown space {unknown[0]!r}; valid: {', '.join(list_spaces())}")
        if len(set(spaces)) != len(spaces):
            raise ValueError(f"spaces {', '.join(spaces)} name a space twice")
        object.__setattr__(self, "spaces", spaces)
        _check_number("trials", self.trials, minimum=1, integer=True)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        _check_number("round_to", self.round_to, minimum=1, integer=True)
        _check_number("cpus_per_trial", self.cpus_per_trial, minimum=0.01)
        _check_number("gpus_per_trial", self.gpus_per_trial, minimum=0.0)
        _check_number("dense_epochs", self.dense_epochs, minimum=0.01)
        _check_number("finetune_epochs", self.finetune_epochs, minimum=0.01)
        _check_number("score_steps", self.score_steps, minimum=1, integer=True)
        _check_number("rescore_top", self.rescore_top, minimum=0, integer=True)
        if self.rescore_steps is not None:
            _check_number("rescore_steps", self.rescore_steps, minimum=1, integer=True)
        _check_number("finetune_lr", self.finetune_lr, minimum=1e-12)
        _check_number("distill_weight", self.distill_weight, minimum=0.0)
        if self.distill_weight > 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        self.runtime  # noqa: B018 (checks device and precision)
        if self.device.startswith("cuda") and self.gpus_per_trial <= 0:
            raise ValueError(
                f"device {self.device!r} needs --gpus-per-trial above 0: Ray hides the GPUs "
                "from trials it gave none (fractions share one, e.g. 0.25)"
            )
        self.task  # noqa: B018 (imports a named loss or metric)
        _check_number("batch_size", self.batch_size, minimum=1, integer=True)
        _check_number("grace_period", self.grace_period, minimum=1, integer=True)
        _check_number("max_failures", self.max_failures, minimum=0, integer=True)
        _check_number("seed", self.seed, minimum=0, integer=True)
        if self.inner_epochs is not None:
            _check_number("inner_epochs", self.inner_epochs, minimum=0.01)
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"run name {self.name!r} is invalid: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite starts it again: pick one")
        if self.address is not None and not _valid_address(self.address):
            raise ValueError(
                f"Ray address {self.address!r} is invalid: use auto, HOST:PORT or ray://HOST:PORT"
            )
        options = {}
        for space, values in dict(self.space_options).items():
            if space not in spaces:
                raise ValueError(
                    f"space_options names space {space!r}, which is not searched; "
                    f"searched: {', '.join(spaces)}"
                )
            if not isinstance(values, Mapping):
                raise ValueError(f"space_options[{space!r}] must be a mapping of option values")
            options[space] = dict(values)
        object.__setattr__(self, "space_options", options)
        for space in spaces:  # unknown options and bad values fail here, not inside a trial
            create_space(space, **self.fixed_options(space))

    def data_source(self, objects: Any = None) -> DataSource:
        """The picklable description every process loads the data from.

        Args:
            objects: the split objects of ``dataset="python"`` (the Python API's ``data``).
        """
        return DataSource(
            name=self.dataset,
            root=self.data_dir,
            seed=self.seed,
            image_size=self.image_size,
            workers=self.workers,
            objects=objects,
        )

    @property
    def runtime(self) -> Runtime:
        """The device, precision and layout of every loop."""
        return Runtime(self.device, self.precision, self.channels_last)

    @property
    def task(self) -> Task:
        """The output used, the loss and the metric of every loop.

        Raises:
            ValueError: a ``package.module:name`` loss or metric that cannot be imported.
        """
        return Task.from_names(self.loss, self.metric, self.output, self.ignore_index)

    @property
    def run_dir(self) -> Path:
        """``runs_dir/name``: everything the run writes lives there."""
        return Path(self.runs_dir) / self.name

    def fixed_options(self, space: str) -> dict[str, Any]:
        """The options of ``space`` that are set, not searched: inner length, then overrides."""
        options: dict[str, Any] = {}
        if self.inner_epochs is not None:
            defaults = create_space(space).options
            fields = {f.name: f for f in dataclasses.fields(defaults)}
            for option in _LENGTH_OPTIONS:
                if option in fields:
                    integer = "int" in str(fields[option].type) and "float" not in str(
                        fields[option].type
                    )
                    value = self.inner_epochs
                    options[option] = max(1, round(value)) if integer else float(value)
                    break
        options.update(self.space_options.get(space, {}))
        return options

    def to_dict(self) -> dict[str, Any]:
        """JSON form, readable by :meth:`from_mapping` (the target as ``flops``/``params``...)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        target = values.pop("target")
        values["spaces"] = list(self.spaces)
        values["space_options"] = {k: dict(v) for k, v in self.space_options.items()}
        for key in ("loss", "metric"):
            if callable(values[key]):
                values[key] = f"{values[key].__module__}:{values[key].__qualname__}"
        for constraint in target.constraints:
            text = str(constraint).split("<=", 1)[1]
            if not constraint.relative:
                text = repr(constraint.limit) + ("ms" if constraint.metric == "latency_ms" else "")
            values[constraint.metric.replace("_ms", "")] = text
        return values

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SearchConfig:
        """Build a config from loose values, as a YAML file or the command line give them.

        Keys are the attribute names (``-`` may stand for ``_``), plus ``flops``, ``params`` and
        ``latency`` (``50%``, ``20M``, ``2ms``) or ``target`` (``flops<=50%,params<=0.3M``);
        ``spaces`` may be a list or a comma-separated string.

        Raises:
            ValueError: an unknown key, or a value the config rejects.
        """
        loose = {str(k).replace("-", "_"): v for k, v in values.items() if v is not None}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loose) - names - set(_TARGET_KEYS))
        if unknown:
            valid = sorted((names - {"target"}) | set(_TARGET_KEYS))
            raise ValueError(
                f"unknown search setting {unknown[0]!r}; valid settings: {', '.join(valid)}"
            )
        parts = {key: str(loose.pop(key)) for key in _TARGET_KEYS if key in loose}
        target = loose.pop("target", None)
        if parts:
            if target is not None:
                raise ValueError("give the target either as 'target' or as flops/params/latency")
            target = Target.from_options(**parts)
        elif isinstance(target, str):
            target = Target.parse(target)
        if target is None:
            raise ValueError("give a target: --flops, --params and/or --latency (e.g. --flops 50%)")
        spaces = loose.get("spaces")
        if isinstance(spaces, str):
            loose["spaces"] = tuple(s.strip() for s in spaces.split(",") if s.strip())
        elif spaces is not None:
            loose["spaces"] = tuple(str(s) for s in spaces)
        return cls(target=target, **loose)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SearchConfig:
        """Read a YAML mapping of settings (see :meth:`from_mapping`); ``overrides`` win.

        Raises:
            PrunetuneError: the file cannot be read or is not a YAML mapping.
            ValueError: see :meth:`from_mapping`.
        """
        return cls.from_mapping({**read_yaml(path), **overrides})


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The settings mapping of a ``--config`` YAML file.

    Raises:
        PrunetuneError: the file is missing, unreadable, not YAML, or not a mapping.
    """
    import yaml

    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PrunetuneError(f"cannot read search config {str(source)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PrunetuneError(
            f"search config {str(source)!r} is not YAML: it is binary, not text (a checkpoint?)"
        ) from exc
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PrunetuneError(f"search config {str(source)!r} is not valid YAML: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PrunetuneError(
            f"search config {str(source)!r} must be a mapping of settings, "
            f"got {type(data).__name__}"
        )
    return data


def _check_number(name: str, value: Any, minimum: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not value >= minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {value!r}")


def _valid_address(address: str) -> bool:
    if address == "auto":
        return True
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
