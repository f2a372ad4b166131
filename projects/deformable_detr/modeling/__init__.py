"""Deformable DETR model code: the detector, its transformer and its criterion."""

from .deformable_criterion import DeformableCriterion
from .deformable_detr import DeformableDETR
from .deformable_transformer import (
    DeformableDetrTransformer,
    DeformableDetrTransformerDecoder,
    DeformableDetrTransformerEncoder,
)

__all__ = [
    "DeformableCriterion",
    "DeformableDETR",
    "DeformableDetrTransformer",
    "DeformableDetrTransformerDecoder",
    "DeformableDetrTransformerEncoder",
]
