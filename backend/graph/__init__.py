"""Model tracing: the channel graph of a model, its coupled channel groups and layer records."""

from prunetune.backend.graph._channel_graph import ChannelGraph, MaskPoint
from prunetune.backend.graph._mha import PROJECTIONS
from prunetune.backend.graph._records import (
    ChannelGroup,
    ChannelMember,
    ChannelSegment,
    HeadAttribute,
    HeadCost,
    LayerInfo,
    NormInfo,
    ScaleInfo,
    SplitAttribute,
)
from prunetune.backend.graph._rules import per_output_parameters
from prunetune.backend.graph._trace import (
    LeafModule,
    counting_mode,
    eval_mode,
    leaf_module_key,
    match_leaf_modules,
)

__all__ = [
    "PROJECTIONS",
    "ChannelGraph",
    "ChannelGroup",
    "ChannelMember",
    "ChannelSegment",
    "HeadAttribute",
    "HeadCost",
    "LayerInfo",
    "LeafModule",
    "MaskPoint",
    "NormInfo",
    "ScaleInfo",
    "SplitAttribute",
    "counting_mode",
    "eval_mode",
    "leaf_module_key",
    "match_leaf_modules",
    "per_output_parameters",
]
