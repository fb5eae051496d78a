"""Which ops keep, join or mix channels: name tables and shape rules, free of graph state."""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from typing import Any, cast

from torch import fx, nn

from prunetune.backend.graph._groups import Channels, Segment

__all__ = [
    "CAT_OPS",
    "CONV_TYPES",
    "ELEMENTWISE_OPS",
    "EXPAND_OPS",
    "LAYER_TYPES",
    "LINEAR_TYPES",
    "NORM_OPS",
    "NORM_TYPES",
    "PASSTHROUGH_MODULE_TYPES",
    "PERMUTE_OPS",
    "REDUCE_OPS",
    "RESHAPE_OPS",
    "SOFTMAX_OPS",
    "SPATIAL_OPS",
    "SPLIT_OPS",
    "TRANSPOSED_CONV_TYPES",
    "argument",
    "index_keeps_channels",
    "is_layer_subclass",
    "is_per_output",
    "normalise_dims",
    "op_name",
    "owner_of",
    "per_output_channels",
    "per_output_parameters",
    "reshape_channels",
    "reshape_sizes",
    "unlike_its_layer",
]


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)

LAYER_TYPES = (*CONV_TYPES, *TRANSPOSED_CONV_TYPES, *LINEAR_TYPES, *NORM_TYPES)


def is_layer_subclass(module: nn.Module) -> bool:
    """Whether ``module`` is a user subclass of a conv, linear, BatchNorm or GroupNorm layer that
    can be pruned like the built-in one: it holds no parameters but ``weight`` and ``bias`` and no
    submodule with parameters (an activation or padding it applies is fine).

    Such layers (a BatchNorm or GroupNorm that applies its activation, as timm's
    ``BatchNormAct2d`` and ``GroupNormAct``, a conv that pads itself "same") are
    kept as single calls when tracing; whether the call computes what the layer's weight says
    is checked on its FLOPs and shapes.
    """
    kinds = (*LAYER_TYPES, nn.GroupNorm)
    if type(module) in kinds or not isinstance(module, kinds):
        return False
    allowed = {"weight", "bias", *per_output_parameters(module)}
    return {name for name, _ in module.named_parameters()} <= allowed


def per_output_channels(module: nn.Module) -> int:
    """Output channels of a conv or linear (sub)class, 0 for other modules."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return 0


def per_output_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters besides weight and bias that hold one value per
    output channel (see :func:`is_per_output`)."""
    outputs = per_output_channels(module)
    return [
        name
        for name, parameter in module.named_parameters(recurse=False)
        if name not in ("weight", "bias") and outputs and is_per_output(parameter, outputs)
    ]


def is_per_output(parameter: Any, outputs: int) -> bool:
    """Whether ``parameter`` holds one value per output channel (shape ``[out, 1, ...]``), as the
    gain of timm's ``ScaledStdConv2d``: it is then pruned with the output channels."""
    shape = tuple(parameter.shape)
    return bool(shape) and shape[0] == outputs and all(d == 1 for d in shape[1:])


def unlike_its_layer(module: nn.Module, out_shape: tuple[int, ...], counted: int) -> str | None:
    """Why a call of a conv, linear or norm module does not compute what its weight says (a
    subclass above all), ``None`` when it does.

    Args:
        module: the conv, linear or BatchNorm module (or subclass).
        out_shape: the call's output shape, batch included.
        counted: the MACs ``FlopCounterMode`` counted for the call (its total / 2).

    Returns:
        ``None`` when the output has the layer's output channels (dim 1; the last dim for a
        linear) and ``counted`` is exactly the layer's MACs, else the reason.
    """
    if isinstance(module, NORM_TYPES):
        expected, outputs, axis = 0, cast(nn.BatchNorm2d, module).num_features, 1
    elif isinstance(module, LINEAR_TYPES):
        linear = cast(nn.Linear, module)
        outputs, axis = linear.out_features, len(out_shape) - 1
        expected = math.prod(out_shape[:-1]) * linear.in_features * outputs
    elif isinstance(module, TRANSPOSED_CONV_TYPES):
        return None  # its MACs follow the input's positions; checked by the layer rule
    else:
        conv = cast(nn.Conv2d, module)
        outputs, axis = conv.out_channels, 1
        per_output = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        expected = math.prod(out_shape) * per_output
    if len(out_shape) < 2 or out_shape[axis] != outputs:
        return f"its output has {out_shape[axis]} channels along dim {axis}, not {outputs}"
    if counted != expected:
        return f"its forward computes {counted} MACs where the layer alone computes {expected}"
    return None


# Modules without channel-mixing parameters that keep dim 1 as it is (checked on the shapes too).
PASSTHROUGH_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.RReLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)  # fmt: skip

# Ops that act on each element (broadcasting their tensor operands).
ELEMENTWISE_OPS = _names(
    """add sub mul truediv div floordiv mod pow neg pos abs iadd isub imul itruediv add_ sub_
    mul_ div_ rsub radd rmul maximum minimum fmax fmin where clamp clamp_ clip clip_ clamp_min
    clamp_max masked_fill masked_fill_ relu relu_ relu6 sigmoid sigmoid_ tanh tanh_ gelu silu
    mish hardswish hardsigmoid hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu
    softplus softsign logsigmoid tanhshrink hardshrink softshrink threshold threshold_ rrelu exp
    log log1p expm1 sqrt rsqrt reciprocal square sin cos erf sign floor ceil round trunc dropout
    dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout contiguous clone detach
    float double half bfloat16 to type_as cpu cuda requires_grad_ eq ne lt le gt ge logical_and
    logical_or logical_not logical_xor and_ or_ xor invert nan_to_num lerp addcmul addcdiv
    zeros_like ones_like full_like empty_like"""
)
# Ops that keep dims 0 and 1 and act along the spatial dims.
SPATIAL_OPS = _names(
    """max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d lp_pool1d lp_pool2d interpolate upsample upsample_nearest
    upsample_bilinear pad"""
)
RESHAPE_OPS = _names(
    "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as squeeze_ unsqueeze_"
)
PERMUTE_OPS = _names("permute transpose swapaxes swapdims")
EXPAND_OPS = _names("expand expand_as repeat broadcast_to")
# Reductions taking ``dim`` as their second argument.
REDUCE_OPS = _names("mean sum amax amin max min std var logsumexp prod nanmean nansum median")
# Norms of a tensor taking ``dim`` as their third argument: ``torch.norm(x, p, dim)``.
NORM_OPS = _names("norm")
CAT_OPS = _names("cat concat concatenate")
SPLIT_OPS = _names("split chunk tensor_split unbind split_with_sizes")
SOFTMAX_OPS = _names("softmax log_softmax softmin")

_KNOWN_FUNCTION_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def op_name(node: fx.Node) -> str | None:
    """The op's short name (``add``, ``relu``, ``flatten``) for functions and methods we know.

    Returns ``None`` for calls to functions outside torch, operator and builtins (a user's
    wrapped function), which are treated as unknown.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    target: Callable[..., Any] = node.target  # type: ignore[assignment]
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    if _function_module(target).split(".")[0] in _KNOWN_FUNCTION_MODULES:
        return name
    return None


def _function_module(target: Any) -> str:
    module = getattr(target, "__module__", None)
    if not module:
        owner = getattr(target, "__self__", None)
        module = owner.__name__ if inspect.ismodule(owner) else ""
    return str(module)


def describe(node: fx.Node) -> str:
    """A short human description of a call node for reasons: ``torch.matmul`` or ``.permute``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        target = node.target
        module = _function_module(target)
        name = getattr(target, "__name__", repr(target))
        if module in ("_operator", "operator"):
            return f"operator.{name}"
        if module.startswith("torch.nn.functional"):
            return f"F.{name}"
        return f"{module}.{name}" if module else str(name)
    return str(node.target)


def argument(node: fx.Node, position: int, keyword: str, default: Any = None) -> Any:
    """A call argument given by position or keyword (``self`` is position 0 for methods)."""
    if keyword in node.kwargs:
        return node.kwargs[keyword]
    if len(node.args) > position:
        return node.args[position]
    return default


def normalise_dims(dims: Any, rank: int) -> tuple[int, ...] | None:
    """Dims as non-negative ints; ``None`` for "all dims" or anything that is not int(s)."""
    if dims is None:
        return None
    items = dims if isinstance(dims, (tuple, list)) else (dims,)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in items):
        return None
    return tuple(d % rank if rank else d for d in items)


def reshape_channels(
    channels: Channels, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> Channels | None:
    """How dim 1 of a reshaped tensor is made of the input's channels, ``None`` if it mixes them.

    A reshape keeps channels apart when the batch dim stays and each channel's block of
    ``mult * prod(in_shape[2:])`` elements covers whole units of ``prod(out_shape[2:])`` along
    the output's dim 1: flatten (``C x H x W -> C*H*W``), ``[N, C] -> [N, C, 1, 1]`` and back.
    """
    if len(out_shape) < 2 or len(in_shape) < 2 or out_shape[0] != in_shape[0]:
        return None
    trailing_in = _product(in_shape[2:])
    trailing_out = _product(out_shape[2:])
    result = []
    for segment in channels:
        block = segment.mult * trailing_in
        if trailing_out == 0 or block % trailing_out:
            return None
        result.append(Segment(segment.slot, segment.size, block // trailing_out))
    if sum(s.size * s.mult for s in result) != out_shape[1]:
        return None
    return tuple(result)


def index_keeps_channels(index: Any, rank: int, in_size: int, out_shape: tuple[int, ...]) -> bool:
    """Whether ``tensor[index]`` keeps dim 0 a batch dim and dim 1 whole (spatial slicing only)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(item is Ellipsis for item in items):
        position = items.index(Ellipsis)
        explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
        filler = (slice(None),) * max(rank - explicit, 0)
        items = items[:position] + filler + items[position + 1 :]
    for item in items[:2]:
        if not isinstance(item, slice):
            return False
    if len(items) >= 2:
        channel = items[1]
        if channel.start not in (None, 0) or channel.step not in (None, 1):
            return False
        if channel.stop is not None and not (
            isinstance(channel.stop, int) and channel.stop >= in_size
        ):
            return False
    if any(isinstance(item, fx.Node) for item in items):
        return False
    return len(out_shape) >= 2 and out_shape[1] == in_size


def _product(values: tuple[int, ...]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def reshape_sizes(node: fx.Node) -> list[Any]:
    """The sizes a ``view`` or ``reshape`` call asks for, given one by one or as one tuple."""
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return sizes


def owner_of(node: fx.Node) -> str:
    """The innermost module whose forward holds ``node`` (``""``: the model itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(next(reversed(stack.values()))[0]) if stack else ""
