"""``SubnetSpec``: the one record that says which subnet of a model to build.

A spec names the model (:class:`~prunetune.backend.models.ModelRef`), the input shape it was traced
with,
the kept width of every prunable channel group and, once chosen, the kept channel indices. It
passes from a search space to the backend and from a trial to the export, as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prunetune.backend.errors import SpecError
from prunetune.backend.graph import ChannelGraph, ChannelGroup, leaf_module_key
from prunetune.backend.models import ModelRef

__all__ = ["SubnetSpec", "select_channels"]

_FORMAT_VERSION = 1


def _check_width(group: ChannelGroup, width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int):
        raise SpecError(f"width of group {group.name!r} must be an integer, got {width!r}")
    if not group.prunable:
        if width != group.size:
            raise SpecError(
                f"group {group.name!r} cannot be pruned ({group.reason}); its width must stay "
                f"{group.size}, got {width}"
            )
        return
    if not group.step <= width <= group.size:
        raise SpecError(
            f"group {group.name!r} has {group.size} channels; width {width} is out of range "
            f"{group.step}..{group.size}"
        )
    if width % group.step:
        raise SpecError(
            f"group {group.name!r} has {group.size} channels in {group.step} conv-group slices; "
            f"width {width} is not a multiple of {group.step}"
        )


def select_channels(
    group: ChannelGroup, width: int, scores: Tensor | None = None
) -> tuple[int, ...]:
    """Pick which ``width`` channels of ``group`` to keep, sorted ascending.

    Without scores the first channels are kept. With scores the highest-scoring are kept
    (ties go to the lower index). A group with ``step > 1`` (grouped convs) is split into
    ``step`` equal slices and each slice keeps ``width // step`` channels, so every conv group
    keeps the same count.

    Args:
        group: the channel group.
        width: how many channels to keep.
        scores: importance of each channel, shape ``(group.size,)``; higher is kept first.

    Returns:
        The kept channel indices, sorted ascending.

    Raises:
        SpecError: ``width`` is not valid for the group.
        ValueError: ``scores`` does not have shape ``(group.size,)``.
    """
    _check_width(group, width)
    if scores is not None:
        scores = torch.as_tensor(scores).detach().flatten().double().cpu()
        if scores.numel() != group.size:
            raise ValueError(
                f"scores for group {group.name!r} must have {group.size} entries, "
                f"got {scores.numel()}"
            )
    step = group.step if group.prunable else 1
    slice_size, per_slice = group.size // step, width // step
    kept: list[int] = []
    for index in range(step):
        start = index * slice_size
        if scores is None:
            kept.extend(range(start, start + per_slice))
            continue
        part = scores[start : start + slice_size]
        order = sorted(range(slice_size), key=lambda i: (-float(part[i]), i))
        kept.extend(start + i for i in order[:per_slice])
    return tuple(sorted(kept))


def _is_shape(shape: tuple[Any, ...]) -> bool:
    return bool(shape) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)


@dataclass(frozen=True)
class SubnetSpec:
    """Which subnet of a model to build: kept widths, and kept channels once chosen.

    Attributes:
        model: the model's identity.
        input_shape: shape of the example input the channel graph was traced with (the first
            input, for a model whose ``forward`` takes several tensors).
        widths: kept width of every prunable group, by group name.
        kept: kept channel indices of every group in ``widths`` (ascending), or ``None`` to keep
            the first channels of each group (see :func:`select_channels`).
        extra_input_shapes: shapes of the second and later example inputs, for a model whose
            ``forward`` takes several tensors (empty for one input).
        leaf_modules: the modules the graph was traced without entering, as
            ``package.module:Class`` or a submodule's name; tracing the dense model again
            with them rebuilds the same groups.

    Example:
        >>> import torch
        >>> from prunetune.backend.graph import ChannelGraph
        >>> from prunetune.backend.models import ModelRef
        >>> ref = ModelRef("resnet20")
        >>> graph = ChannelGraph.trace(ref.build(), torch.zeros(1, 3, 32, 32))
        >>> widths = {**graph.dense_widths(), "conv1": 8}
        >>> spec = SubnetSpec.from_widths(graph, ref, widths)
        >>> SubnetSpec.from_json(spec.to_json()) == spec
        True
    """

    model: ModelRef
    input_shape: tuple[int, ...]
    widths: dict[str, int]
    kept: dict[str, tuple[int, ...]] | None = None
    extra_input_shapes: tuple[tuple[int, ...], ...] = ()
    leaf_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelRef):
            raise SpecError(f"model must be a ModelRef, got {type(self.model).__name__}")
        shape = tuple(self.input_shape)
        if not _is_shape(shape):
            raise SpecError(f"input_shape must be a tuple of ints, got {self.input_shape!r}")
        if not isinstance(self.widths, Mapping):
            raise SpecError(f"widths must map group names to ints, got {self.widths!r}")
        widths = {}
        for name, width in self.widths.items():
            if not isinstance(name, str):
                raise SpecError(f"group names in widths must be strings, got {name!r}")
            if isinstance(width, bool) or not isinstance(width, int):
                raise SpecError(f"width of group {name!r} must be an integer, got {width!r}")
            widths[name] = int(width)
        kept = None
        if self.kept is not None:
            if not isinstance(self.kept, Mapping):
                raise SpecError(f"kept must map group names to index lists, got {self.kept!r}")
            kept = {}
            for name, indices in self.kept.items():
                if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
                    raise SpecError(f"kept indices of group {name!r} must be a list of ints")
                items = tuple(indices)
                if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                    raise SpecError(f"kept indices of group {name!r} must be ints, got {items!r}")
                kept[str(name)] = items
        extra = tuple(tuple(s) for s in self.extra_input_shapes)
        if not all(
            s and all(isinstance(d, int) and not isinstance(d, bool) for d in s) for s in extra
        ):
            raise SpecError(
                f"extra_input_shapes must be tuples of ints, got {self.extra_input_shapes!r}"
            )
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "extra_input_shapes", extra)
        leaves = tuple(self.leaf_modules)
        if not all(isinstance(leaf, str) for leaf in leaves):
            raise SpecError(f"leaf_modules must be strings, got {self.leaf_modules!r}")
        object.__setattr__(self, "leaf_modules", leaves)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "kept", kept)

    def __hash__(self) -> int:
        return hash(self.to_json())

    @classmethod
    def from_widths(
        cls,
        graph: ChannelGraph,
        model_ref: ModelRef,
        widths: Mapping[str, int],
        importance: Mapping[str, Tensor] | None = None,
    ) -> SubnetSpec:
        """A validated spec with kept indices chosen from widths (and channel importance).

        Args:
            graph: the model's channel graph.
            model_ref: the model's identity.
            widths: width of every prunable group; entries for fixed groups must equal their
                size and are dropped.
            importance: optional per-channel scores by group name (shape ``(size,)``); a group
                without scores keeps its first channels.

        Raises:
            SpecError: the widths do not fit the graph (see :meth:`validate`).
        """
        prunable = {group.name for group in graph.prunable_groups}
        own = {name: width for name, width in widths.items() if name in prunable}
        for name, width in widths.items():
            if name not in prunable:
                try:
                    group = graph.group(name)
                except KeyError:
                    raise SpecError(_unknown_group(graph, name)) from None
                _check_width(group, width)
        draft = cls(
            model_ref,
            graph.input_shape,
            own,
            extra_input_shapes=graph.input_shapes[1:],
            leaf_modules=tuple(leaf_module_key(leaf) for leaf in graph.leaf_modules),
        )
        draft.validate(graph)
        scores = importance or {}
        kept = {
            name: select_channels(graph.group(name), width, scores.get(name))
            for name, width in draft.widths.items()
        }
        return dataclasses.replace(draft, kept=kept)

    def validate(self, graph: ChannelGraph) -> None:
        """Check that this spec fits ``graph``.

        Raises:
            SpecError: the input shape differs, a group is unknown or missing, a width is out of
                range or not a multiple of the group's step, or kept indices are not unique, out
                of range, of the wrong count or unbalanced across conv-group slices.
        """
        theirs = graph.input_shapes
        if [s[1:] for s in self.input_shapes] != [tuple(s[1:]) for s in theirs]:
            shown = " and ".join(map(str, self.input_shapes))
            raise SpecError(
                f"spec is for input shape {shown} but the graph was traced with "
                f"{' and '.join(map(str, theirs))}; trace the model with the spec's input shape"
            )
        names = {group.name for group in graph.groups}
        for name in self.widths:
            if name not in names:
                raise SpecError(_unknown_group(graph, name))
        missing = [g.name for g in graph.prunable_groups if g.name not in self.widths]
        if missing:
            raise SpecError(
                f"spec has no width for groups {', '.join(map(repr, missing))}; give every "
                "prunable group a width (graph.dense_widths() lists the dense ones)"
            )
        for name, width in self.widths.items():
            _check_width(graph.group(name), width)
        if self.kept is None:
            return
        for name in self.kept:
            if name not in self.widths:
                raise SpecError(f"kept names group {name!r}, which has no width in the spec")
        for name, width in self.widths.items():
            group = graph.group(name)
            if name not in self.kept:
                raise SpecError(f"kept has no entry for group {name!r}; give its kept indices")
            _check_kept(group, width, self.kept[name])

    def kept_channels(self, graph: ChannelGraph) -> dict[str, tuple[int, ...]]:
        """Kept channel indices of every group of ``graph`` (fixed groups: all), ascending.

        Raises:
            SpecError: the spec does not fit the graph.
        """
        self.validate(graph)
        result = {}
        for group in graph.groups:
            if group.name in self.widths and self.kept is not None:
                result[group.name] = tuple(sorted(self.kept[group.name]))
            elif group.name in self.widths:
                result[group.name] = select_channels(group, self.widths[group.name])
            else:
                result[group.name] = tuple(range(group.size))
        return result

    def compose(self, inner: SubnetSpec) -> SubnetSpec:
        """The spec of pruning ``inner`` out of the subnet this spec describes, from the dense.

        ``inner`` was chosen on the already pruned model, so its kept indices count within this
        subnet; they are mapped back to the dense model's channels, so the result rebuilds from
        the dense model in one step.

        Raises:
            SpecError: either spec lacks kept indices.
        """
        if self.kept is None or inner.kept is None:
            raise SpecError("both specs need kept indices to be composed")
        kept = dict(self.kept)
        widths = dict(self.widths)
        for name, indices in inner.kept.items():
            base = self.kept.get(name)
            kept[name] = tuple(base[i] for i in indices) if base is not None else indices
            widths[name] = len(indices)
        return dataclasses.replace(self, widths=widths, kept=kept)

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Every example input's shape: :attr:`input_shape`, then :attr:`extra_input_shapes`."""
        return (self.input_shape, *self.extra_input_shapes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"version", "model", "input_shape", "widths", "kept"}``, plus
        ``extra_input_shapes`` for a model of several inputs."""
        data = {
            "version": _FORMAT_VERSION,
            "model": self.model.to_dict(),
            "input_shape": list(self.input_shape),
            "widths": dict(self.widths),
            "kept": None if self.kept is None else {k: list(v) for k, v in self.kept.items()},
        }
        if self.extra_input_shapes:
            data["extra_input_shapes"] = [list(s) for s in self.extra_input_shapes]
        if self.leaf_modules:
            data["leaf_modules"] = list(self.leaf_modules)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> SubnetSpec:
        """Parse the form written by :meth:`to_dict`.

        Raises:
            SpecError: ``data`` is not a subnet spec of a known version.
        """
        if not isinstance(data, dict):
            raise SpecError(f"a subnet spec must be a JSON object, got {type(data).__name__}")
        version = data.get("version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise SpecError(
                f"subnet spec version {version!r} is not supported (expected {_FORMAT_VERSION})"
            )
        known = {"version", "model", "input_shape", "widths", "kept"}
        known |= {"extra_input_shapes", "leaf_modules"}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"subnet spec has unknown keys: {', '.join(sorted(unknown))}")
        for key in ("model", "input_shape", "widths"):
            if key not in data:
                raise SpecError(f"subnet spec is missing {key!r}")
        try:
            model = ModelRef.from_dict(data["model"])
        except ValueError as exc:
            raise SpecError(f"subnet spec has a bad model: {exc}") from exc
        if not isinstance(data["input_shape"], list):
            raise SpecError(f"input_shape must be a list of ints, got {data['input_shape']!r}")
        extra = data.get("extra_input_shapes", [])
        if not isinstance(extra, list) or not all(isinstance(s, list) for s in extra):
            raise SpecError(f"extra_input_shapes must be a list of shapes, got {extra!r}")
        return cls(
            model=model,
            input_shape=tuple(data["input_shape"]),
            widths=data["widths"],
            kept=data.get("kept"),
            extra_input_shapes=tuple(tuple(s) for s in extra),
            leaf_modules=tuple(data.get("leaf_modules", ())),
        )

    def to_json(self, indent: int | None = 2) -> str:
        """The spec as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SubnetSpec:
        """Parse a JSON string written by :meth:`to_json`.

        Raises:
            SpecError: the text is not JSON or not a subnet spec.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"subnet spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _unknown_group(graph: ChannelGraph, name: str) -> str:
    valid = [group.name for group in graph.prunable_groups]
    shown = ", ".join(valid[:12]) + (f", ... ({len(valid)} in all)" if len(valid) > 12 else "")
    return f"unknown channel group {name!r}; prunable groups: {shown}"


def _check_kept(group: ChannelGroup, width: int, indices: tuple[int, ...]) -> None:
    if len(indices) != width:
        raise SpecError(
            f"group {group.name!r} keeps {len(indices)} indices but its width is {width}"
        )
    if len(set(indices)) != len(indices):
        raise SpecError(f"kept indices of group {group.name!r} are not unique: {list(indices)}")
    outside = [i for i in indices if not 0 <= i < group.size]
    if outside:
        raise SpecError(
            f"kept indices of group {group.name!r} must be in 0..{group.size - 1}, got {outside}"
        )
    if group.prunable and group.step > 1:
        slice_size = group.size // group.step
        counts = [0] * group.step
        for index in indices:
            counts[index // slice_size] += 1
        if len(set(counts)) != 1:
            raise SpecError(
                f"group {group.name!r} feeds grouped convs: each of its {group.step} slices of "
                f"{slice_size} channels must keep {width // group.step}, got {counts}"
            )
