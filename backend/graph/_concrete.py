"""Tracing that runs the model beside the trace, so Python code may branch on tensor shapes.

torch.fx traces with proxies that carry no values: ``if x.shape[-1] % 2:``, ``assert x.dim() == 4``
or "same" padding computed from the input size (TensorFlow ports, timm's ``Conv2dSame`` family)
stop it with "symbolically traced variables cannot be used as inputs to control flow". Here each
traced op is also run on the example input, and a proxy's ``shape``, ``size()``, ``dim()``,
``ndim``, ``device`` and ``dtype`` answer with the example's values: the Python shape logic runs
once, for that input, as ``torch.export`` would specialise it. The batch dimension (dim 0) stays
symbolic, so the graph still runs at any batch size (masked training runs it at the training
batch size). Control flow on tensor *values* (or on the batch size) still cannot be traced.

torch.export itself gives such a graph, but as ATen ops without the module calls that the
channel analysis reads layers from, so the fx graph is kept and only its shapes made concrete.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["ConcreteTracer"]

_VALUE = "concrete_value"
_STATIC = frozenset(
    {"device", "dtype", "is_cuda", "layout", "is_sparse", "is_quantized", "is_nested"}
)
_DTYPE_PREDICATES = frozenset({torch.is_floating_point, torch.is_complex})


class _ConcreteProxy(fx.Proxy):
    """A proxy that knows the value it stands for on the example input."""

    def _value(self) -> Any:
        return self.node.meta.get(_VALUE)

    @property
    def shape(self) -> Any:  # type: ignore[override]
        value = self._value()
        if not isinstance(value, Tensor):
            return fx.Proxy.__getattr__(self, "shape")
        return _sizes(self, value)

    def __getattr__(self, name: str) -> Any:
        if name in _STATIC:  # the same at any batch size
            value = self._value()
            if isinstance(value, Tensor):
                return getattr(value, name)
        return super().__getattr__(name)

    @property
    def ndim(self) -> Any:  # type: ignore[override]
        value = self._value()
        return value.ndim if isinstance(value, Tensor) else fx.Proxy.__getattr__(self, "ndim")

    def size(self, dim: int | None = None) -> Any:
        value = self._value()
        if not isinstance(value, Tensor):
            method = fx.Proxy.__getattr__(self, "size")
            return method() if dim is None else method(dim)
        if dim is None:
            return _sizes(self, value)
        if dim % max(1, value.ndim) == 0:  # the batch stays symbolic
            return self.tracer.create_proxy("call_method", "size", (self, 0), {})
        return int(value.size(dim))

    def dim(self) -> Any:
        value = self._value()
        return value.dim() if isinstance(value, Tensor) else fx.Proxy.__getattr__(self, "dim")()


def _sizes(proxy: _ConcreteProxy, value: Tensor) -> Any:
    """``value``'s sizes with dim 0 left as a ``size(0)`` proxy (a tuple, like torch.Size)."""
    if value.ndim == 0:
        return torch.Size([])
    batch = proxy.tracer.create_proxy("call_method", "size", (proxy, 0), {})
    return (batch, *(int(d) for d in value.shape[1:]))


class ConcreteTracer(fx.Tracer):
    """An fx tracer that also evaluates every op on ``example_inputs`` (in order of the forward's
    tensor arguments), so shapes are concrete during tracing.

    Args:
        example_inputs: one tensor per positional input of the model's forward.
        is_leaf: the leaf-module rule of the tracer it stands in for.
    """

    def __init__(self, example_inputs: tuple[Tensor, ...], is_leaf: Any) -> None:
        super().__init__()
        self._examples = list(example_inputs)
        self._is_leaf = is_leaf
        self._evaluating = False

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._evaluating:  # running a leaf on the example: its children just run
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(self._is_leaf(m, module_qualified_name))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a dtype predicate (``torch.is_floating_point(mask)``, as
        ``nn.TransformerEncoderLayer`` checks its masks with) takes the example's answer, the
        same at any batch size; any other branch on a traced value is refused as by fx."""
        node = obj.node
        if node.op == "call_function" and node.target in _DTYPE_PREDICATES:
            return bool(node.meta.get(_VALUE))
        return super().to_bool(obj)

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any = None,
        proxy_factory_fn: Any = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._evaluating = True
        try:
            proxy.node.meta[_VALUE] = self._evaluate(kind, target, args, kwargs)
        finally:
            self._evaluating = False
        return proxy

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        try:
            with torch.no_grad():
                graph = super().trace(root, concrete_args)
        finally:
            self._examples = []
        for node in graph.nodes:
            node.meta.pop(_VALUE, None)  # the example's tensors are not kept alive
        return graph

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            if self._examples:
                return self._examples.pop(0)
            return args[0] if args else None  # a default value
        values_args = fx.node.map_aggregate(args, _concrete)
        values_kwargs = fx.node.map_aggregate(kwargs, _concrete)
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            return value
        if kind == "call_module":
            return self.root.get_submodule(str(target))(*values_args, **values_kwargs)
        if kind == "call_function":
            return target(*values_args, **values_kwargs)
        if kind == "call_method":
            self_value, *rest = values_args
            return getattr(self_value, target)(*rest, **values_kwargs)
        return None  # output


def _concrete(value: Any) -> Any:
    if isinstance(value, fx.Proxy):
        return value.node.meta.get(_VALUE)
    if isinstance(value, fx.Node):
        return value.meta.get(_VALUE)
    return value
