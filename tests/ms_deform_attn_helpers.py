"""Inputs and oracles shared by the tests of multi-scale deformable attention
(test_ms_deform_attn*.py); the random generator is conftest's `gen` fixture."""

from __future__ import annotations

import torch

from detrkit.layers import ms_deform_attn_reference


def make_inputs(
    gen: torch.Generator,
    shapes=((7, 5), (3, 9), (1, 1)),
    N: int = 2,
    M: int = 3,
    D: int = 5,
    Lq: int = 6,
    P: int = 3,
    dtype: torch.dtype = torch.float64,
    loc_dtype: torch.dtype | None = None,
    margin: float = 0.25,
) -> list[torch.Tensor]:
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights, on the
    CPU. Locations are uniform in [-margin, 1 + margin], so some fall outside the maps."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    S, L = int(sizes.sum()), len(shapes)
    loc_dtype = loc_dtype or dtype
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64).to(dtype)
    locations = torch.rand(N, Lq, M, L, P, 2, generator=gen, dtype=torch.float64)
    locations = (locations * (1 + 2 * margin) - margin).to(loc_dtype)
    weights = torch.rand(N, Lq, M, L, P, generator=gen, dtype=torch.float64).to(loc_dtype)
    return [value, spatial_shapes, level_start_index, locations, weights]


def reference_with_grads(
    inputs: list[torch.Tensor], grad_output: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The float64 reference on the CPU for the same numbers as `inputs` (any dtype or device):
    its output and its gradients (value, sampling_locations, attention_weights) for
    `grad_output`."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    out = ms_deform_attn_reference(leaves[0], inputs[1].cpu(), inputs[2].cpu(), *leaves[1:])
    grads = torch.autograd.grad(out, leaves, grad_output.detach().cpu().double())
    return out, grads
