"""Reference measurements of a built model: FLOPs by torch's own counter, parameter count."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from prunetune.backend.graph import counting_mode

__all__ = ["count_flops", "count_params"]


def count_flops(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass, as ``FlopCounterMode`` total / 2.

    This is the project's reference for "FLOPs" (multiply-accumulates of every op the counter
    knows: convs, transposed convs, linears, matmuls and attention, as in the pruning
    literature). The model runs in eval mode, the mode that is exported (branches that run only
    in training are not counted), with its parameters' ``requires_grad`` off; its train/eval
    and ``requires_grad`` flags are put back afterwards.

    Args:
        model: the model.
        example_input: its input, ``[N, ...]`` (a tuple of them for a model of several
            inputs); the count is for all ``N`` examples.

    Returns:
        ``FlopCounterMode`` total / 2.
    """
    counter = FlopCounterMode(display=False)
    with counting_mode(model), counter:
        model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())
