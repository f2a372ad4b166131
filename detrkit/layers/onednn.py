"""oneDNN's fused CPU operators (a convolution or linear layer with its bias, a residual sum
and a ReLU in one call), as the eval-time fast paths of `FFN` and the ResNet blocks use them.

The ops are `torch.ops.mkldnn._linear_pointwise` and `torch.ops.mkldnn._convolution_pointwise`
(what torch.compile's CPU backend emits). They have no autocast rule, so callers cast to
`cpu_compute_dtype(x)` themselves, as autocast would have.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "cpu_bf16_supported",
    "cpu_compute_dtype",
    "onednn_fusion_available",
    "onednn_op",
]

_OPS: dict[str, object] = {}


def onednn_op(name: str):
    """`torch.ops.mkldnn.<name>`, or None in a build without oneDNN or without that op."""
    if name not in _OPS:
        op = None
        if torch.backends.mkldnn.is_available():
            try:
                op = getattr(torch.ops.mkldnn, name)
            except (AttributeError, RuntimeError):
                op = None
        _OPS[name] = op
    return _OPS[name]


@functools.cache
def cpu_bf16_supported() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or
    AMX). Without them its fused ops refuse bfloat16 inputs, while torch's own convolutions and
    linear layers still run them (slowly)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution or linear layer computes `x` in: autocast's while it is on."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def onednn_fusion_available(x: torch.Tensor, op_name: str) -> bool:
    """Whether `x` can go through the fused op: CPU, float32 compute (or bfloat16 where oneDNN
    has bfloat16 kernels), no autograd graph to record, not inside torch.compile / torch.export
    (they fuse by themselves)."""
    dtype = cpu_compute_dtype(x)
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_bf16_supported()))
        and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        and onednn_op(op_name) is not None
    )
