"""Generic layers: position embedding, MLP / FFN, box operations, deformable attention."""

from .box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_generalized_box_iou,
)
from .mlp import FFN, MLP
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_levels,
    ms_deform_attn_reference,
)
from .position_embedding import PositionEmbeddingSine
from .precision import float32_forward
from .shape_spec import ShapeSpec

__all__ = [
    "FFN",
    "MLP",
    "MultiScaleDeformableAttention",
    "PositionEmbeddingSine",
    "ShapeSpec",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "float32_forward",
    "generalized_box_iou",
    "inverse_sigmoid",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_levels",
    "ms_deform_attn_reference",
    "paired_generalized_box_iou",
]
