"""The official Deformable DETR learning-rate recipe, as a named lr-factor function a config (or
a command-line override) can give `get_default_optimizer_params`:

    optimizer.params.lr_factor_func=projects.deformable_detr.optim.deformable_detr_lr_factor
"""

from __future__ import annotations

from collections.abc import Sequence

from detrkit.engine.optimizer import lr_factor_by_keys

__all__ = ["deformable_detr_lr_factor"]


def deformable_detr_lr_factor(
    name: str,
    factor: float = 0.1,
    keys: Sequence[str] = ("backbone", "sampling_offsets", "reference_points"),
) -> float:
    """0.1x lr for the backbone and for the linear layers that predict sampling offsets and
    reference points (the official code's `lr_backbone_names` and `lr_linear_proj_names`)."""
    return lr_factor_by_keys(name, keys, factor)
