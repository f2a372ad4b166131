"""The pure-PyTorch reference of multi-scale deformable attention, and its gradients.

`ms_deform_attn_reference` computes the operator with `F.grid_sample` (bilinear, zero padding,
`align_corners=False`). It is the oracle every kernel test compares with, the implementation
that serves devices without a kernel, and the one to use for gradients of gradients (autograd
differentiates it to any order). `reference_backward` writes its first-order gradients out with
aten's grid_sample backward, for the fallback kernel of the backward op (which runs below the
autograd dispatch key and cannot call autograd).

Neither checks its arguments: the public `ms_deform_attn` entry point does that once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_reference", "reference_backward"]


def _accumulation_dtype(value_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with `F.grid_sample`, computed in float32 (float64 for
    float64 value), differentiable by autograd. Same arguments and result as `ms_deform_attn`
    (see `detrkit.layers.ms_deform_attn` for shapes and dtypes); no argument checking."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    acc = _accumulation_dtype(value.dtype)
    value_acc = value.to(acc)
    grids = sampling_locations.to(acc) * 2 - 1  # grid_sample's [-1, 1] coordinates
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    sampled = []
    for level, (h, w) in enumerate(shapes):
        start = starts[level]
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_acc[:, start : start + h * w].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # (N*M, D, Lq, P)
    stacked = torch.stack(sampled, dim=3).flatten(3)  # (N*M, D, Lq, L*P)
    weights = attention_weights.to(acc).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(value.dtype)


def reference_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (value, sampling_locations, attention_weights) of `ms_deform_attn_reference`
    for `grad_output` (N, Lq, M * D), each in its input's dtype."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    acc = _accumulation_dtype(value.dtype)
    value_acc = value.to(acc)
    grids = (sampling_locations.to(acc) * 2 - 1).transpose(1, 2)  # (N, M, Lq, L, P, 2)
    weights = attention_weights.to(acc).transpose(1, 2).reshape(N * M, 1, Lq, L, P)
    # (N, Lq, M*D) -> (N*M, D, Lq, 1): one gradient per query, shared by its P points
    grad_out = grad_output.to(acc).view(N, Lq, M, D).permute(0, 2, 3, 1).reshape(N * M, D, Lq, 1)
    grad_value = torch.zeros(N, S, M, D, dtype=acc, device=value.device)
    grad_grid = torch.empty(N, M, Lq, L, P, 2, dtype=acc, device=value.device)
    grad_weights = torch.empty(N * M, Lq, L, P, dtype=acc, device=value.device)
    starts = level_start_index.tolist()
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        start = starts[level]
        value_l = value_acc[:, start : start + h * w].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        grid_l = grids[:, :, :, level].reshape(N * M, Lq, P, 2)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, D, Lq, P)
        grad_weights[:, :, level] = (sampled * grad_out).sum(1)
        grad_sampled = grad_out * weights[:, :, :, level]  # (N*M, D, Lq, P)
        grad_value_l, grad_grid_l = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled, value_l, grid_l, 0, 0, False, [True, True]
        )  # modes: 0 = bilinear, 0 = zero padding
        grad_value[:, start : start + h * w] = grad_value_l.view(N, M, D, h * w).permute(0, 3, 1, 2)
        grad_grid[:, :, :, level] = grad_grid_l.view(N, M, Lq, P, 2)
    loc_dtype = sampling_locations.dtype
    grad_loc = (grad_grid * 2).transpose(1, 2).contiguous().to(loc_dtype)  # d grid / d loc = 2
    grad_weights = grad_weights.view(N, M, Lq, L, P).transpose(1, 2).contiguous().to(loc_dtype)
    return grad_value.to(value.dtype), grad_loc, grad_weights
