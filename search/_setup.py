"""Everything a search checks and builds before Ray starts a trial: data, dense model, budget.

:func:`prepare` only reads (the dataset, the checkpoint, the profile) and raises on anything the
user must fix, so a refused search leaves nothing behind. :func:`train_dense` is the first thing
that writes: the dense model trained from scratch, cached as ``runs/<name>/dense.pt``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunetune.backend.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from prunetune.backend.data import DatasetSplits
from prunetune.backend.datasources import DataSource
from prunetune.backend.errors import CheckpointError, DataError, PrunetuneError
from prunetune.backend.export import load_model
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef, create_model, dataset_kwargs
from prunetune.backend.pruning import check_round_to_fits
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.train import TrainConfig, train
from prunetune.backend.training import evaluate
from prunetune.estimators import Budget, LatencyProfile, cost_models
from prunetune.search._config import SearchConfig

__all__ = ["DENSE_FILE", "Prepared", "prepare", "train_dense"]

DENSE_FILE = "dense.pt"


@dataclass
class Prepared:
    """A search's inputs, resolved and checked.

    Attributes:
        config: the search.
        data: the dataset's splits.
        ref: the model's identity.
        model: the dense model (trained once :attr:`trained` is true).
        input_shape: example input shape (batch 1).
        base_spec: when the checkpoint is itself a pruned export, the spec it was pruned with;
            the search then prunes that subnet further and the exported spec composes both.
        graph: the model's channel graph.
        budget: the target resolved against the model's costs.
        profile: the latency profile, when a latency target is set.
        trained: whether :attr:`model` holds trained weights.
        source: where the weights come from, for the report.
        data_source: how every trial loads the data again.
    """

    config: SearchConfig
    data: DatasetSplits
    ref: ModelRef
    model: nn.Module
    input_shape: tuple[int, ...]
    base_spec: SubnetSpec | None
    graph: ChannelGraph
    budget: Budget
    profile: LatencyProfile | None
    trained: bool
    source: str
    data_source: DataSource

    @property
    def dense_costs(self) -> dict[str, float]:
        """Every cost the budget knows (plus FLOPs and params) of the dense model."""
        widths = self.graph.dense_widths()
        costs = cost_models(self.graph, self.profile)
        return {metric: float(cost.evaluate(widths)) for metric, cost in costs.items()}


def prepare(config: SearchConfig, module: nn.Module | None = None, data: object = None) -> Prepared:
    """Load and check everything the search starts from; write nothing.

    Args:
        config: the search.
        module: the dense model as a module object (the Python API), used as it is (its weights
            count as trained) instead of building ``config.model``.
        data: with ``config.dataset == "python"``, the split objects (the Python API's).

    Raises:
        PrunetuneError: unknown model, unreadable checkpoint or profile, missing data, a
            profile of another model, or a target no subnet can meet.
    """
    data_source = config.data_source(data)
    splits = data_source.check()
    base_spec = None
    if config.checkpoint:
        expect = ModelRef(config.model) if config.model else None
        loaded = load_model(config.checkpoint, expect, config.trust_model_code)
        model, ref, shape = loaded.model, loaded.ref, tuple(loaded.input_shape)
        base_spec, trained, source = loaded.spec, True, str(config.checkpoint)
        if tuple(shape[1:]) != splits.image_shape:
            raise CheckpointError(
                f"checkpoint {config.checkpoint!r} takes {'x'.join(map(str, shape[1:]))} inputs, "
                f"but {config.dataset} images are {'x'.join(map(str, splits.image_shape))}"
            )
    elif module is not None:
        model, ref = copy.deepcopy(module), ModelRef.for_instance(module)
        shape, trained, source = splits.input_shape(1), True, "the module given"
    else:
        name = str(config.model)  # SearchConfig requires a model without a checkpoint
        if ":" not in name:
            create_model(name)  # unknown names fail with the valid ones
        if splits.num_classes < 1:
            raise DataError(
                f"cannot tell how many classes {config.dataset!r} has to build {name!r}: give "
                "the splits a classes attribute or num_classes, or pass a model object"
            )
        ref = ModelRef(name, dataset_kwargs(name, splits.num_classes, splits.in_channels))
        shape = splits.input_shape(1)
        cached = _cached_dense(config, ref, splits)
        if cached is not None:
            model, trained, source = cached, True, str(config.run_dir / DENSE_FILE)
        else:
            torch.manual_seed(config.seed)
            model, trained, source = ref.build(), False, "trained by this search"
    graph = ChannelGraph.trace(model, torch.zeros(shape))
    check_round_to_fits(graph, config.round_to)
    profile = LatencyProfile.load(config.profile) if config.profile else None
    budget = config.target.resolve(cost_models(graph, profile))
    return Prepared(
        config=config,
        data=splits,
        ref=ref,
        model=model,
        input_shape=tuple(shape),
        base_spec=base_spec,
        graph=graph,
        budget=budget,
        profile=profile,
        trained=trained,
        source=source,
        data_source=data_source,
    )


def _cached_dense(config: SearchConfig, ref: ModelRef, data: DatasetSplits) -> nn.Module | None:
    """The dense model an earlier run of this name trained with the same settings, if any."""
    path = config.run_dir / DENSE_FILE
    if not path.is_file():
        return None
    try:
        model, info = load_checkpoint(path, expect=ref)
    except PrunetuneError:
        return None  # trained again and replaced
    same = (
        info.model == ref
        and info.dataset == data.name
        and tuple(info.input_shape) == data.input_shape(1)
        and math.isclose(info.metrics.get("epochs", -1.0), config.dense_epochs)
        and info.metrics.get("seed") == float(config.seed)
    )
    return model if same else None


def train_dense(prepared: Prepared, say: Callable[[str], None]) -> Path:
    """Train the dense model in place, evaluate it, and cache it as ``runs/<name>/dense.pt``."""
    config = prepared.config
    say(f"training the dense {prepared.ref.name} for {config.dense_epochs:g} epochs")
    result = train(
        prepared.model,
        prepared.data,
        TrainConfig(epochs=config.dense_epochs, seed=config.seed, distill_weight=0.0),
        on_epoch=lambda report: say("  " + report.line()),
        task=config.task,
        runtime=config.runtime,
    )
    data = prepared.data
    _, test_acc = evaluate(
        prepared.model, data.test, config.task, config.runtime, workers=data.workers
    )
    prepared.model.cpu()
    info = Checkpoint(
        model=prepared.ref,
        input_shape=prepared.input_shape,
        dataset=prepared.data.name,
        metrics={
            "val_acc": result.val_acc,
            "test_acc": test_acc,
            "epochs": float(config.dense_epochs),
            "seed": float(config.seed),
        },
        preprocessing=prepared.data.preprocessing(),
    )
    path = save_checkpoint(config.run_dir / DENSE_FILE, prepared.model, info)
    prepared.trained = True
    say(f"dense test accuracy {100 * test_acc:.2f}% -> {path}")
    return path
