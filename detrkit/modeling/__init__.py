"""Model building blocks: backbone, neck, matcher, criterion."""

from .backbone import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    Conv2d,
    FrozenBatchNorm2d,
    ResNet,
    get_norm,
    set_frozen_norm_folding,
)
from .criterion import SetCriterion, sigmoid_focal_loss
from .matcher import HungarianMatcher
from .neck import ChannelMapper, ConvNormAct

__all__ = [
    "BasicBlock",
    "BasicStem",
    "BottleneckBlock",
    "ChannelMapper",
    "Conv2d",
    "ConvNormAct",
    "FrozenBatchNorm2d",
    "HungarianMatcher",
    "ResNet",
    "SetCriterion",
    "get_norm",
    "set_frozen_norm_folding",
    "sigmoid_focal_loss",
]
