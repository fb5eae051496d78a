"""Resolving ``--model``, ``--checkpoint`` and ``--input-shape`` into a model and its graph."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunetune.backend.datasources import import_callable
from prunetune.backend.export import load_model
from prunetune.backend.graph import ChannelGraph, LeafModule, match_leaf_modules
from prunetune.backend.models import ModelRef, dataset_kwargs
from prunetune.backend.spec import SubnetSpec

__all__ = [
    "ResolvedModel",
    "add_model_options",
    "add_trust_option",
    "parse_shape",
    "positive_int",
    "resolve_model",
]


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,32,32`` -> ``(1, 3, 32, 32)``.

    Raises:
        argparse.ArgumentTypeError: not a comma-separated list of at least 2 positive integers.
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write it as N,C,H,W, e.g. 1,3,32,32"
        )
    return shape


def positive_int(text: str) -> int:
    """An integer of at least 1, for argparse.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def add_model_options(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    """``--model``, ``--checkpoint``, ``--input-shape`` and ``--num-classes``."""
    parser.add_argument(
        "--model", required=model_required, help="zoo name or package.module:factory"
    )
    parser.add_argument(
        "--checkpoint", help="dense checkpoint file or subnet export directory to start from"
    )
    parser.add_argument(
        "--input-shape",
        type=parse_shape,
        action="append",
        help="example input N,C,H,W (default: the checkpoint's, else 1,3,32,32); repeat it once "
        "per input, in order, for a model whose forward takes several tensors: "
        "--input-shape 1,3,32,32 --input-shape 1,10",
    )
    parser.add_argument(
        "--num-classes", type=positive_int, default=10, help="classes of a freshly built model"
    )
    parser.add_argument(
        "--leaf-module",
        action="append",
        default=[],
        metavar="CLASS_OR_NAME",
        help="do not trace into this module (code torch.fx cannot trace, e.g. Python control "
        "flow on tensors): a class as package.module:Class (every instance), or one "
        "submodule's name such as blocks.3; repeatable; its channels are kept whole (the "
        "Python API's leaf_modules=)",
    )
    add_trust_option(parser)


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-model-code``: the opt-in to build a model a file names (it imports its code)."""
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="build the package.module:factory a checkpoint or export names even when it is "
        "not --model (importing it runs its code; zoo models never need this)",
    )


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to trace, with its identity, example input shapes and (if pruned) spec."""

    model: nn.Module
    ref: ModelRef
    input_shapes: tuple[tuple[int, ...], ...]
    spec: SubnetSpec | None = None
    preprocessing: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """What the checkpoint or export records (an export's ``dense_*`` figures among them)."""
    leaf_modules: tuple[LeafModule, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first (for most models the only) example input's shape."""
        return self.input_shapes[0]

    def example(self) -> tuple[torch.Tensor, ...]:
        """Zero example inputs, one per shape of :attr:`input_shapes`."""
        return tuple(torch.zeros(shape) for shape in self.input_shapes)

    def trace(self) -> ChannelGraph:
        """The model's channel graph on zero inputs of :attr:`input_shapes`."""
        return ChannelGraph.trace(self.model, self.example(), leaf_modules=self.leaf_modules)


def resolve_model(args: argparse.Namespace) -> ResolvedModel:
    """Load ``--checkpoint`` if given, else build ``--model`` fresh for ``--input-shape``.

    Raises:
        ValueError: neither a model nor a checkpoint is named.
        PrunetuneError: see :func:`prunetune.backend.export.load_model` and the zoo.
    """
    given = tuple(tuple(shape) for shape in args.input_shape or ())
    if args.checkpoint:
        expect = ModelRef(args.model) if args.model else None
        loaded = load_model(args.checkpoint, expect, args.trust_model_code)
        recorded = loaded.spec.input_shapes if loaded.spec else (tuple(loaded.input_shape),)
        if given and [s[1:] for s in given] != [s[1:] for s in recorded]:
            raise ValueError(
                f"--input-shape {_shapes(given)} does not match the checkpoint's "
                f"{_shapes(recorded)}"
            )
        # an export is the pruned model: trace it with the leaves of its own spec too
        leaves = _leaf_modules(args.leaf_module)
        if loaded.spec is not None:
            leaves += match_leaf_modules(loaded.model, loaded.spec.leaf_modules)
        return ResolvedModel(
            loaded.model, loaded.ref, given or recorded, loaded.spec, loaded.preprocessing,
            dict(loaded.metrics), leaves,
        )  # fmt: skip
    if not args.model:
        raise ValueError("name a model with --model (or a checkpoint with --checkpoint)")
    shapes = given or ((1, 3, 32, 32),)
    ref = ModelRef(args.model, dataset_kwargs(args.model, args.num_classes, shapes[0][1]))
    torch.manual_seed(0)
    model = ref.build()
    return ResolvedModel(model, ref, shapes, leaf_modules=_leaf_modules(args.leaf_module))


def _leaf_modules(given: list[str]) -> tuple[LeafModule, ...]:
    """``--leaf-module`` values: ``package.module:Class`` imported; a submodule name is kept as
    is (tracing checks that the model has it).

    Raises:
        ValueError: a class that cannot be imported or is not a module class.
    """
    leaves: list[LeafModule] = []
    for value in given:
        if ":" not in value:
            leaves.append(value)
            continue
        found = import_callable(value, "--leaf-module")
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise ValueError(f"--leaf-module {value} is not an nn.Module class")
        leaves.append(found)
    return tuple(leaves)


def _shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    return " --input-shape ".join(",".join(map(str, shape)) for shape in shapes)
