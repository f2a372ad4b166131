"""float32 islands inside autocast, for the small layers whose outputs are coordinates.

A bfloat16 number has an 8-bit mantissa: a normalized box coordinate near 1 is only good to
2^-8, about 3 px on an 800-pixel side, and a reference point rounded that way moves every box
refined from it. The heads that make coordinates cost well under 1% of a detector's
multiply-adds, so they run in float32 while autocast runs the rest in half precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["float32_forward"]

T = TypeVar("T")


def float32_forward(module: Callable[[Tensor], T], x: Tensor) -> T:
    """`module(x)` in float32 while autocast is on (autocast off inside, `x` cast up once; a
    float64 model stays float64); exactly `module(x)` otherwise, so tracing and export see no
    autocast region and a model cast to half precision as a whole stays in it. `module` is a
    layer, or a function of `x` running several heads on the one float32 copy."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return module(x)
    with torch.autocast(device_type, enabled=False):
        return module(x.to(torch.promote_types(x.dtype, torch.float32)))
