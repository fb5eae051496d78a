"""``prunetune.run_search``: the whole search from Python, on a module object or a model name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from prunetune.api._oneshot import TargetLike, as_target
from prunetune.backend.datasources import PYTHON
from prunetune.backend.models import ModelRef
from prunetune.search import SearchConfig, SearchResult
from prunetune.search import run_search as _run_search

__all__ = ["run_search"]


def run_search(
    model: nn.Module | str,
    target: TargetLike,
    *,
    data: Any = "digits",
    data_dir: str | None = None,
    loss: str | Callable[..., Any] = "cross_entropy",
    metric: str | Callable[..., Any] = "top1",
    output: str | int | None = None,
    spaces: Sequence[str] = (),
    trials: int = 16,
    name: str = "search",
    runs_dir: str = "runs",
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    options: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Search for the best pruned subnet of ``model`` under ``target``, finetune and export it.

    Trials run under Ray Tune (Optuna's TPE proposes the space and its options, ASHA stops weak
    trials early) on this machine, or on the cluster ``options["address"]`` names; each trial
    runs one space's inner optimisation (DSA, DAIS, DDPNAS or direct ratios) and scores its
    subnet with the same short finetune. The best subnet meeting every constraint is finetuned
    (distilled from the dense model), exported to ``runs_dir/name/best`` and reported in
    ``runs_dir/name/report.md``.

    Args:
        model: the dense model: a module object (its weights are taken as trained; it reaches
            the trials through Ray's object store, so its class must be importable on every
            worker, or defined in ``__main__``/a function so cloudpickle ships it by value), or
            a zoo name / ``package.module:factory`` (trained first, for ``dense_epochs``).
        target: ``"flops<=50%"``, ``{"flops": "50%"}`` or a ``Target`` (FLOPs are
            multiply-accumulates; latency needs ``options["profile"]``).
        data: the data, one of three ways: a name (``digits``, the embedded 8x8 digits;
            ``mnist`` or ``cifar10`` files in ``data_dir``; ``imagefolder``: ``data_dir`` holds
            ``train/``, ``val/`` and optionally ``test/`` folders of class folders), a factory
            ``package.module:factory`` returning the splits, or the split objects themselves:
            ``{"train": ..., "val": ..., "test": ...}`` (test optional, optional
            ``num_classes``) or ``(train, val[, test])`` of ``Dataset``s of (input, target)
            pairs or ``DataLoader``s. Objects travel to the trials through Ray's object store,
            so they must pickle. Inputs must fit the model.
        data_dir: the dataset's directory (the same path on every node of a cluster).
        loss: ``"cross_entropy"`` or a callable ``loss(outputs, targets) -> scalar``.
        metric: ``"top1"`` (reported as ``acc``), ``"miou"``, ``"pixel_acc"`` or a metric class
            (``name``, ``update(outputs, targets)``, ``compute()``; higher is better): the search
            optimises, stops trials and chooses by it, and reports it by its name.
        output: which model output the loss, metric and distillation use, when the model
            returns a dict (default ``"out"``) or a tuple (default the first).
        spaces: the spaces to search (default all: ``dsa``, ``dais``, ``ddpnas``, ``ratios``).
        trials: trials in all.
        name: the run's name; results go to ``runs_dir/name``.
        runs_dir: the folder of all runs.
        resume: continue an interrupted search of this name (pass the same module again).
        overwrite: start this run again from scratch.
        progress: receives progress lines (default: stderr).
        options: any other :class:`~prunetune.search.SearchConfig` field, e.g.
            ``{"finetune_epochs": 5, "address": "auto", "round_to": 8}``.

    Returns:
        A :class:`~prunetune.search.SearchResult`; ``.model`` is the finetuned pruned module,
        ``.metrics`` its accuracy and exact FLOPs/params, ``.export_dir`` its export.

    Raises:
        TypeError: ``model`` is neither a module nor a name; an unknown option.
        ValueError: a bad target, option or name (before anything is written).
        PrunetuneError: bad data, an unreachable cluster, no trial meeting the target.

    Example:
        >>> import prunetune
        >>> from prunetune.backend.models import create_model
        >>> net = create_model("small_cnn", num_classes=10, in_channels=1)
        >>> result = prunetune.run_search(net, "flops<=50%", data="digits", trials=2,
        ...     spaces=("ratios",), name="doc", options={"score_steps": 5})  # doctest: +SKIP
        >>> result.model, result.metrics["test_acc"]  # doctest: +SKIP
    """
    extra = dict(options or {})
    reserved = {"target", "model", "dataset", "data_dir", "spaces", "trials", "name", "runs_dir",
                "resume", "overwrite", "loss", "metric", "output"}  # fmt: skip
    clash = sorted(reserved & set(extra))
    if clash:
        raise TypeError(f"pass {clash[0]!r} as run_search's own argument, not in options")
    known = set(SearchConfig.__dataclass_fields__)
    unknown = sorted(set(extra) - known)
    if unknown:
        raise TypeError(
            f"unknown search option {unknown[0]!r}; valid: {', '.join(sorted(known - reserved))}"
        )
    if isinstance(model, nn.Module):
        module: nn.Module | None = model
        model_name = ModelRef.for_instance(model).name
    elif isinstance(model, str):
        module, model_name = None, model
    else:
        raise TypeError(f"model must be an nn.Module or a model name, got {type(model).__name__}")
    objects = None
    if not isinstance(data, str):
        data, objects = PYTHON, data
    config = SearchConfig(
        target=as_target(target),
        model=model_name,
        dataset=data,
        data_dir=data_dir,
        loss=loss,
        metric=metric,
        output=output,
        spaces=tuple(spaces),
        trials=trials,
        name=name,
        runs_dir=runs_dir,
        resume=resume,
        overwrite=overwrite,
        **extra,
    )
    return _run_search(config, progress, module=module, data=objects)
