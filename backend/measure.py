"""Reference measurements of a built model: FLOPs by torch's own counter, parameter count."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params"]


def count_flops(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates of one forward pass, as ``FlopCounterMode`` total / 2.

    This is the project's reference for "FLOPs" (MACs of conv and linear layers, as in the
    pruning literature). The model's train/eval mode is left as it was.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())
