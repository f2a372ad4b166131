"""FLOP and activation counting for detrkit models with fvcore (detectron2's utils/analysis).

fvcore traces the model with `torch.jit.trace` and counts each operator of the graph with a
handle; operators without one are skipped with a warning. On top of fvcore's handles (conv,
linear, matmul, norms, ...) this counts:

- `detrkit::ms_deform_attn_forward`, multi-scale deformable attention: for every query, head,
  level and point, D channels are bilinearly interpolated from 4 corners (4 multiply-adds per
  channel) and accumulated with the attention weight (1 more): N * Lq * M * L * P * D * 5;
- `aten::scaled_dot_product_attention` (what nn.MultiheadAttention becomes in a trace): the
  scores Q K^T and the weighted sum of V, N * H * Lq * S * (d_k + d_v);
- with `count_elementwise=True`, element-wise operators (add, mul, sigmoid, softmax, ...) at one
  flop per output element; off by default, which is the convention of detectron2's tools and of
  the FLOPs in the Deformable DETR paper (multiply-adds of convolutions and matrix products).

Like fvcore, one multiply-add counts as one flop. `InferenceWrapper` turns a detector taking
detectron2-style inputs into a module of tensors that `torch.jit.trace` accepts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fvcore.nn import ActivationCountAnalysis as _ActivationCountAnalysis
from fvcore.nn import FlopCountAnalysis as _FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = [
    "ELEMENTWISE_OPS",
    "ActivationCountAnalysis",
    "FlopCountAnalysis",
    "InferenceWrapper",
    "elementwise_flop_jit",
    "ms_deform_attn_flop_jit",
    "sdpa_flop_jit",
]

MS_DEFORM_ATTN_OP = "detrkit::ms_deform_attn_forward"

ELEMENTWISE_OPS = (
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::rsub",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::div_",
    "aten::sigmoid",
    "aten::softmax",
    "aten::exp",
    "aten::log",
    "aten::sin",
    "aten::cos",
    "aten::pow",
    "aten::sqrt",
    "aten::rsqrt",
    "aten::relu",
    "aten::relu_",
    "aten::gelu",
    "aten::cumsum",
)

# operators that move or select data, or work on a few scalars: nothing to count, no warning
_IGNORED = (
    "aten::topk",
    "aten::sort",
    "aten::argsort",
    "aten::masked_fill",
    "aten::meshgrid",
    "aten::linspace",
    "aten::repeat",
    "aten::ones_like",
    "aten::sum",
    "aten::prod",
    "aten::lt",
    "aten::le",
    "aten::all",
    "aten::any",
    "aten::log_",
    "aten::clone",
    "aten::expand_as",
    "aten::max_pool2d",
    "aten::abs",
    "aten::neg",
    "aten::clamp_min",
    "aten::round",
    "aten::sign",
    "aten::min",
    "aten::where",
    "aten::fill_",
    "aten::zero_",
    "aten::item",
    "aten::tensor",
    "aten::as_tensor",
    "aten::scalar_tensor",
    "aten::numel",
    "aten::dim",
    "aten::embedding",
    "aten::ones",
    "aten::new_ones",
    "aten::masked_fill_",
    "aten::exp_",
    "aten::sigmoid_",
    "aten::sub_",
    "aten::bitwise_and",
    "aten::logical_and",
    "aten::logical_not",
    "aten::ne",
    "aten::mean",
    "aten::reciprocal",
    "aten::pad",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::__or__",
)


def ms_deform_attn_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of `ms_deform_attn(value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights)`: N * Lq * M * L * P * D * (4 corners + 1 weight)."""
    n, _, heads, channels = get_shape(inputs[0])  # value (N, S, M, D)
    _, queries, _, levels, points, _ = get_shape(inputs[3])  # (N, Lq, M, L, P, 2)
    return n * queries * heads * levels * points * channels * 5


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of scaled dot-product attention: Q K^T and the weighted sum of V."""
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    batch = int(np.prod(q_shape[:-2]))
    queries, d_k = q_shape[-2:]
    keys, d_v = k_shape[-2], v_shape[-1]
    return batch * queries * keys * (d_k + d_v)


def elementwise_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """One flop per output element."""
    shape = get_shape(outputs[0])
    return int(np.prod(shape)) if shape is not None else 0


def _output_elements(inputs: list[Any], outputs: list[Any]) -> int:
    shape = get_shape(outputs[0])
    return int(np.prod(shape)) if shape is not None else 0


class FlopCountAnalysis(_FlopCountAnalysis):
    """fvcore's FlopCountAnalysis with the handles of this module (see the module docstring)."""

    def __init__(self, model: nn.Module, inputs: Any, count_elementwise: bool = False) -> None:
        super().__init__(model, inputs)
        self.set_op_handle(MS_DEFORM_ATTN_OP, ms_deform_attn_flop_jit)
        self.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        handle = elementwise_flop_jit if count_elementwise else None
        self.set_op_handle(**{op: handle for op in ELEMENTWISE_OPS})
        self.set_op_handle(**{op: None for op in _IGNORED})


class ActivationCountAnalysis(_ActivationCountAnalysis):
    """fvcore's ActivationCountAnalysis, also counting the outputs of deformable attention and
    of scaled dot-product attention."""

    def __init__(self, model: nn.Module, inputs: Any) -> None:
        super().__init__(model, inputs)
        self.set_op_handle(MS_DEFORM_ATTN_OP, _output_elements)
        self.set_op_handle("aten::scaled_dot_product_attention", _output_elements)


class InferenceWrapper(nn.Module):
    """`model([{"image": image}, ...])` as a function of image tensors (3, H, W), returning the
    detections of each image as tensors (boxes, scores, classes): a signature `torch.jit.trace`
    (and so fvcore) can follow. The model should be in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model([{"image": image} for image in images])
        flat: list[torch.Tensor] = []
        for output in outputs:
            instances = output["instances"]
            flat += [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
        return tuple(flat)


def count_by_operator(analyses: Sequence[_FlopCountAnalysis]) -> Counter:
    """Counts per operator summed over several analyses (one per input)."""
    total: Counter = Counter()
    for analysis in analyses:
        total.update(analysis.by_operator())
    return total
