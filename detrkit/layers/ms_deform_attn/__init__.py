"""Multi-scale deformable attention (Zhu et al., Deformable DETR, eq. 3).

- op.py: the `ms_deform_attn` operator (torch.library registration, fake kernels, autograd
  formula, backend choice) and its public entry point, which validates the arguments once;
- reference.py: the pure-PyTorch `grid_sample` reference, the oracle of every kernel test;
- module.py: `MultiScaleDeformableAttention`, the layer Deformable DETR stacks.

Shapes and dtypes of the operator are in op.py's docstring.
"""

from .module import MultiScaleDeformableAttention
from .op import ms_deform_attn, ms_deform_attn_backend, ms_deform_attn_levels
from .reference import ms_deform_attn_reference

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_levels",
    "ms_deform_attn_reference",
]
