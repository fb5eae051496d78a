"""torchvision's Swin Transformer (v1 and v2) at tiny sizes, for tests of its window attention:
4 x 4 patches of a 32 x 32 input (8 x 8 tokens of 24 channels), windows of 4 x 4 (the second
block of each stage shifted, with the shifted-window mask), stages of 2 and 4 heads. Importing
this module needs torchvision."""

from __future__ import annotations

from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

_SIZES = {"patch_size": [4, 4], "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}


class TinySwin(SwinTransformer):
    """torchvision's Swin v1: two stages of two blocks, 2 then 4 heads of 12 channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(**_SIZES, window_size=[4, 4], num_classes=num_classes)


class TinySwinV2(SwinTransformer):
    """torchvision's Swin v2 (cosine attention with a logit scale per head, relative position
    bias from a small MLP, ``cpb_mlp``), sized as :class:`TinySwin`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            **_SIZES,
            window_size=[4, 4],
            num_classes=num_classes,
            block=SwinTransformerBlockV2,
            downsample_layer=PatchMergingV2,
        )


WINDOW_ARCHITECTURES = {"tv_swin": TinySwin, "tv_swin_v2": TinySwinV2}
