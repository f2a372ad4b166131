"""Backbones: a ResNet in detectron2's layout."""

from .resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    Conv2d,
    FrozenBatchNorm2d,
    ResNet,
    get_norm,
    set_frozen_norm_folding,
)

__all__ = [
    "BasicBlock",
    "BasicStem",
    "BottleneckBlock",
    "Conv2d",
    "FrozenBatchNorm2d",
    "ResNet",
    "get_norm",
    "set_frozen_norm_folding",
]
