"""Box format conversions, IoU / generalized IoU, and inverse sigmoid.

Boxes are (..., 4) tensors, either `cxcywh` (centre, width, height) or `xyxy` (corners). The IoU
functions treat a box with x1 < x0 or y1 < y0 as empty (its width / height clamped to 0) and guard
every division, so degenerate predictions give finite values instead of asserting or NaN.
"""

from __future__ import annotations

import torch

# Smallest denominator of any IoU ratio; only reached by (near) empty boxes.
_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...,) area; inverted sides count as 0."""
    width = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    height = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return width * height


def _iou_union_enclosing(
    boxes1: torch.Tensor, boxes2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU, union area and enclosing-box area of boxes that broadcast against each other."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)

    inter_lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    inter_rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (inter_rb - inter_lt).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]

    union = area1 + area2 - inter
    iou = inter / union.clamp(min=_EPS)

    encl_lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    encl_rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    encl_wh = (encl_rb - encl_lt).clamp(min=0)
    enclosing = encl_wh[..., 0] * encl_wh[..., 1]
    return iou, union, enclosing


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (iou (N, M), union (N, M))."""
    iou, union, _ = _iou_union_enclosing(boxes1[:, None, :], boxes2[None, :, :])
    return iou, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M).

    GIoU = IoU - (enclosing - union) / enclosing, in [-1, 1]. Degenerate boxes (zero area, or
    x1 < x0) are allowed: they have area 0 and every ratio's denominator is clamped at 1e-7.
    """
    iou, union, enclosing = _iou_union_enclosing(boxes1[:, None, :], boxes2[None, :, :])
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding boxes: (N, 4) and (N, 4) xyxy -> (N,); the diagonal of
    `generalized_box_iou` without building the N x N matrix."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            "paired_generalized_box_iou needs boxes of the same shape; got "
            f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    iou, union, enclosing = _iou_union_enclosing(boxes1, boxes2)
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms clamped below at `eps`."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
