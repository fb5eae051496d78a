"""Symbolic tracing with torch.fx, shape propagation on an example input, and the networkx DAG."""

from __future__ import annotations

import contextlib
import linecache
import os
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.fx.proxy import TraceError
from torch.utils.flop_counter import FlopCounterMode

from prunetune.backend.errors import UnsupportedModelError
from prunetune.backend.graph._concrete import ConcreteTracer
from prunetune.backend.graph._rules import is_layer_subclass

__all__ = [
    "LeafModule",
    "build_dag",
    "check_leaf_modules",
    "eval_mode",
    "example_inputs",
    "graph_tracer",
    "leaf_module_key",
    "match_leaf_modules",
    "node_shape",
    "propagate_shapes",
    "trace_module",
]

SEVERAL_INPUTS_HINT = (
    "pass one example tensor per input: prunetune.prune(model, (x1, x2), ...) in Python, "
    "--input-shape once per input on the command line (--input-shape 1,3,32,32 "
    "--input-shape 1,10)"
)


def example_inputs(example_input: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    """``example_input`` as a tuple of tensors: one per positional argument of ``forward``.

    Raises:
        TypeError: not a tensor, or a tuple/list holding something else than tensors.
        ValueError: an empty tuple, a tensor without a batch dim (fewer than 2 dims), or
            inputs of different batch sizes.
    """
    if isinstance(example_input, Tensor):
        inputs: tuple[Tensor, ...] = (example_input,)
    elif isinstance(example_input, tuple | list):
        inputs = tuple(example_input)
        if not inputs:
            raise ValueError("example_input is an empty tuple; give at least one input tensor")
    else:
        raise TypeError(
            "example_input must be a torch.Tensor, or a tuple of tensors for a model with "
            f"several inputs, got {type(example_input).__name__}"
        )
    for index, tensor in enumerate(inputs):
        which = "example_input" if len(inputs) == 1 else f"example input {index}"
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{which} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim < 2:
            raise ValueError(
                f"{which} must have a batch and a channel dim, e.g. shape (1, 3, 32, 32); "
                f"got shape {tuple(tensor.shape)}"
            )
    if len({int(t.shape[0]) for t in inputs}) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(f"example inputs must share their batch size (dim 0); got {shapes}")
    return inputs


_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))


LeafModule = type[nn.Module] | str
"""A module class not to trace into, or the qualified name of one submodule (``blocks.3``)."""


def leaf_module_key(leaf: LeafModule) -> str:
    """How a leaf module is written down: ``package.module:Class`` for a class, the submodule's
    qualified name (no colon) for one submodule."""
    return leaf if isinstance(leaf, str) else f"{leaf.__module__}:{leaf.__qualname__}"


def check_leaf_modules(model: nn.Module, leaf_modules: Sequence[LeafModule]) -> tuple[Any, ...]:
    """``leaf_modules`` checked against ``model``: classes of ``nn.Module``, or names of its
    submodules.

    Raises:
        TypeError: an entry is neither a module class nor a string.
        ValueError: a name is not a submodule of ``model`` (the message lists some that are).
    """
    names = {name for name, _ in model.named_modules() if name}
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            if leaf not in names:
                shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"leaf module {leaf!r} is not a submodule of {type(model).__name__}; name a "
                    f"submodule ({shown or 'it has none'}) or give a module class"
                )
        elif not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
            raise TypeError(
                "leaf_modules takes nn.Module classes or submodule names (str), got "
                f"{type(leaf).__name__} {leaf!r}"
            )
    return tuple(leaf_modules)


def match_leaf_modules(model: nn.Module, keys: Sequence[str]) -> tuple[LeafModule, ...]:
    """The leaf modules that :func:`leaf_module_key` wrote as ``keys``, found in ``model``
    itself (no import: a class is matched among the model's own submodule classes)."""
    classes = {leaf_module_key(type(m)): type(m) for m in model.modules()}
    return tuple(
        classes[key] if ":" in key else key for key in keys if ":" not in key or key in classes
    )


class _Tracer(fx.Tracer):
    """fx's default tracer (torch.nn modules are leaves) plus user-named leaf module types and
    submodules, and user subclasses of conv, linear and BatchNorm layers (see
    ``is_layer_subclass``)."""

    def __init__(self, leaf_modules: tuple[LeafModule, ...]) -> None:
        super().__init__()
        self._leaf_types = tuple(leaf for leaf in leaf_modules if not isinstance(leaf, str))
        self._leaf_names = {leaf for leaf in leaf_modules if isinstance(leaf, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        if is_layer_subclass(m):
            return True
        if isinstance(m, _TRACED_TORCH_MODULES):
            return False
        return super().is_leaf_module(m, module_qualified_name)


_TRACED_TORCH_MODULES = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
"""torch.nn modules traced into rather than kept as one call: their attention
(``nn.MultiheadAttention``, a call of its own) and feed-forward layers are pruned. Traced in eval
mode with the fused fast paths off (see :func:`eval_mode`), the slow path's code is recorded."""


def graph_tracer(leaf_modules: tuple[LeafModule, ...]) -> fx.Tracer:
    """The symbolic tracer :func:`trace_module` starts with: torch.nn modules, ``leaf_modules``
    and subclasses of conv, linear and norm layers stay single calls."""
    return _Tracer(leaf_modules)


def _user_frame(exc: BaseException) -> str | None:
    """``file:line: source`` of the innermost frame of ``exc`` outside torch and prunetune."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_TORCH_DIR) or filename.startswith(_THIS_DIR):
            continue
        source = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
        location = f"{frame.filename}:{frame.lineno}"
        return f"{location}: `{source}`" if source else location
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (what is exported and deployed), then restore every flag.

    The fused fast paths of ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers
    (``torch.backends.mha``) are off meanwhile: ``FlopCounterMode`` counts nothing in their
    fused kernels, and their input checks cannot be traced; off, the same modules run their
    projections and attention as separate ops, which are traced and counted, and which compute
    the same function.
    """
    modes = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def counting_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no gradients, and every parameter's ``requires_grad`` off, then restored.

    A view of a parameter taken under ``torch.no_grad`` (a class token expanded to the batch,
    ``self.cls_token.expand(B, -1, -1)``) still reports ``requires_grad`` but has no
    ``grad_fn``; passed as a submodule's input, it makes ``FlopCounterMode``'s module tracker
    fail with "Expected gradient function to be set" (PiT, CaiT). With the parameters frozen for
    the run such views need no gradient and the tracker leaves them alone.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with eval_mode(model), torch.no_grad():
            for parameter, _ in flags:
                parameter.requires_grad_(False)
            yield model
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


def trace_module(
    model: nn.Module,
    leaf_modules: Sequence[LeafModule] = (),
    example_inputs: Sequence[Tensor] = (),
) -> fx.GraphModule:
    """Symbolically trace ``model`` in eval mode; torch.nn modules (and ``leaf_modules``) stay
    single calls.

    Where plain symbolic tracing fails and ``example_inputs`` are given, the model is traced
    again with every op also run on them (:class:`ConcreteTracer`): Python code that branches
    on tensor shapes ("same" padding from the input size, shape checks) then traces, with every
    shape but the batch size fixed to the example's.

    The trace is taken in eval mode, the mode that is costed and exported: branches that run only
    in training (auxiliary heads, drop-path) are left out, and traced-into norm code reads its
    running statistics instead of updating them. Every module's flag is restored afterwards.

    Raises:
        UnsupportedModelError: the model cannot be traced (data-dependent control flow and
            the like); the message is one line quoting the first line of fx's error and the
            offending source line; fx's own exception is chained (``__cause__``).
    """
    # submodule name -> why it is one call: a submodule whose forward neither tracer can follow
    # (ConViT's attention assigns a buffer built from the input's size in its forward) is kept
    # as one call, whole, and the rest of the model is still traced and pruned. Control flow on
    # tensor values (fx's TraceError) is still refused: as one call it would branch differently
    # once exported, so the user is asked to choose (leaf_modules) or rewrite it.
    kept: dict[str, str] = {}
    while True:
        try:
            tracer, graph = _trace_once(model, (*leaf_modules, *kept), example_inputs)
            break
        except Exception as exc:
            where = _user_frame(exc)
            at = f" at {where}" if where else ""
            # one line, as on the command line; fx's full text stays in the chained exception
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failing = _failing_submodule(model, exc)
            if (
                failing is not None
                and failing not in kept
                and len(kept) < _MAX_KEPT_CALLS
                and not isinstance(exc, TraceError)
            ):
                kept[failing] = (
                    f"torch.fx cannot trace its forward ({type(exc).__name__}: {first}{at})"
                )
                continue
            raise UnsupportedModelError(
                f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
                f"{first}{at}. "
                "Make its forward traceable: no Python control flow (if/for/while) on tensor "
                "values (use torch.where or masks instead), no tensor values converted to Python "
                "numbers; or keep the module that holds that code as one call: "
                "leaf_modules=[ThatModule] (or its name, 'blocks.3') in prunetune.inspect/prune, "
                "--leaf-module package.module:ThatModule (or --leaf-module blocks.3) on the "
                "command line; its channels are then kept whole"
            ) from exc
    for node in graph.nodes:
        if node.op == "call_module" and node.target in kept:
            node.meta[KEPT_CALL_REASON] = kept[str(node.target)]
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


KEPT_CALL_REASON = "prunetune_kept_call_reason"
"""Key of ``fx.Node.meta`` holding why a submodule that could not be traced is one call."""

_MAX_KEPT_CALLS = 64
"""Submodules kept as one call before a model that still fails to trace is refused."""


def _trace_once(
    model: nn.Module, leaf_modules: tuple[LeafModule, ...], example_inputs: Sequence[Tensor]
) -> tuple[fx.Tracer, fx.Graph]:
    """Symbolic tracing, then concrete tracing on ``example_inputs`` where that fails."""
    tracer: fx.Tracer = _Tracer(leaf_modules)
    with eval_mode(model):
        try:
            return tracer, tracer.trace(model)
        except Exception:
            if not example_inputs:
                raise
            concrete = ConcreteTracer(tuple(example_inputs), tracer.is_leaf_module)
            return concrete, concrete.trace(model)


def _failing_submodule(model: nn.Module, exc: BaseException) -> str | None:
    """Qualified name of the innermost submodule of ``model`` (not ``model`` itself, not a
    torch.nn container) whose code was running when ``exc`` was raised, or ``None``."""
    names = {id(module): name for name, module in model.named_modules() if name}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        name = names.get(id(owner))
        if name is not None and not isinstance(owner, _CONTAINERS):
            found = name
        tb = tb.tb_next
    return found


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _ShapeRecorder(ShapeProp):
    """ShapeProp that records ``tensor_meta``, and the FLOPs ``FlopCounterMode`` counts for each
    node in ``meta["flops"]`` (its total, all examples), without printing tracebacks."""

    def __init__(self, module: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(module)
        self._counter = counter

    def run_node(self, n: fx.Node) -> Any:
        before = self._counter.get_total_flops()
        result = fx.Interpreter.run_node(self, n)
        n.meta["flops"] = int(self._counter.get_total_flops() - before)
        found_tensor = False

        def extract(obj: Any) -> Any:
            nonlocal found_tensor
            if isinstance(obj, Tensor):
                found_tensor = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, extract)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def propagate_shapes(
    module: fx.GraphModule, model: nn.Module, example_input: Tensor | tuple[Tensor, ...]
) -> None:
    """Run ``module`` once on ``example_input`` (one tensor per positional input) in eval
    mode, without gradients, recording shapes.

    Every node also gets ``meta["flops"]``: what ``FlopCounterMode`` counts for it on
    ``example_input`` (2 per multiply-accumulate, every example of the batch). Every module's
    training flag is restored afterwards, so BN running statistics of ``model`` are left
    untouched.

    Raises:
        ValueError: the model fails on the example input.
    """
    inputs = example_inputs(example_input)
    counter = FlopCounterMode(display=False)
    try:
        with counting_mode(model), counting_mode(module), counter:
            _ShapeRecorder(module, counter).propagate(*(x.detach().clone() for x in inputs))
    except Exception as exc:
        where = _user_frame(exc)
        at = f" (at {where})" if where else ""
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder" and not n.args]
        if len(placeholders) > len(inputs) and isinstance(exc, TypeError | RuntimeError):
            names = ", ".join(str(n.target) for n in placeholders)
            raise ValueError(
                f"{type(model).__name__}.forward takes {len(placeholders)} inputs ({names}) and "
                f"{len(inputs)} example input(s) were given: {SEVERAL_INPUTS_HINT}"
            ) from exc
        shapes = " and ".join(str(tuple(x.shape)) for x in inputs)
        given = "example_input of shape" if len(inputs) == 1 else "example inputs of shapes"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"running {type(model).__name__} on {given} {shapes} failed: "
            f"{type(exc).__name__}: {first}{at}; pass an input the model accepts, e.g. "
            "torch.randn(1, 3, 32, 32) for a CIFAR model"
        ) from exc


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape of ``node``'s tensor output, ``None`` when it is not one tensor."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    return None


def _value_shape(node: fx.Node) -> Any:
    def shape(meta: Any) -> Any:
        if isinstance(meta, TensorMetadata):
            return tuple(int(d) for d in meta.shape)
        if isinstance(meta, (tuple, list)):
            return tuple(shape(item) for item in meta)
        return None

    return shape(node.meta.get("tensor_meta"))


def build_dag(module: fx.GraphModule, channels: dict[str, tuple[str, ...]]) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph with the tensor shape on every edge.

    Nodes are fx node names with attributes ``op``, ``target``, ``module_type`` (for module
    calls), ``shape`` (the output's shape, a tuple of shapes for tuple outputs) and ``groups``
    (the channel groups along dim 1 of the output, in order; ``"?"`` for channels that no
    conv, linear or norm reads). Every edge carries ``shape``: the shape of the tensor that flows
    along it (a tuple of shapes for tuple values, ``None`` for non-tensors).
    """
    dag = nx.DiGraph()
    submodules = dict(module.named_modules())
    for node in module.graph.nodes:
        module_type = None
        if node.op == "call_module":
            module_type = type(submodules[str(node.target)]).__name__
        target = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", repr(node.target))
        )
        dag.add_node(
            node.name,
            op=node.op,
            target=target,
            module_type=module_type,
            shape=_value_shape(node),
            groups=channels.get(node.name, ()),
        )
        for source in node.all_input_nodes:
            dag.add_edge(source.name, node.name, shape=_value_shape(source))
    return dag
