"""ShapeSpec: the channels / size / stride of a feature map, passed from a backbone to a neck."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShapeSpec:
    """Static description of a feature map (detectron2's interface).

    Any field may be None when it is unknown or irrelevant, e.g. height and width of a backbone
    output, which depend on the input image.
    """

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None
