"""Hungarian matching between the queries of each image and its ground-truth boxes."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from detrkit.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

_CLASS_COST_TYPES = ("focal_loss_cost", "ce_cost")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimizing, per image,

        cost = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy))

    C_class at the target's class, from sigmoid probabilities p ("focal_loss_cost"):
        pos = alpha * (1 - p)**gamma * -log(p + 1e-8)
        neg = (1 - alpha) * p**gamma * -log(1 - p + 1e-8)
        C_class = pos - neg
    or from softmax probabilities ("ce_cost"): C_class = -p.

    Queries left unmatched (Q > T) are the negatives. Boxes are normalized cxcywh.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_class_type: str = "focal_loss_cost",
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("cost_class", cost_class),
            ("cost_bbox", cost_bbox),
            ("cost_giou", cost_giou),
        ):
            if value < 0:
                raise ValueError(f"HungarianMatcher: {name} must be >= 0; got {value}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0")
        if cost_class_type not in _CLASS_COST_TYPES:
            raise ValueError(
                f"HungarianMatcher: unknown cost_class_type {cost_class_type!r}; accepted: "
                f"{list(_CLASS_COST_TYPES)}"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_class_type = cost_class_type
        self.alpha = alpha
        self.gamma = gamma

    def _class_cost(self, logits: torch.Tensor, tgt_labels: torch.Tensor) -> torch.Tensor:
        """logits (N, C), tgt_labels (T,) -> (N, T)."""
        if self.cost_class_type == "focal_loss_cost":
            prob = logits.sigmoid()
            neg = (1 - self.alpha) * prob.pow(self.gamma) * -(1 - prob + 1e-8).log()
            pos = self.alpha * (1 - prob).pow(self.gamma) * -(prob + 1e-8).log()
            return pos[:, tgt_labels] - neg[:, tgt_labels]
        prob = logits.softmax(-1)
        return -prob[:, tgt_labels]

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, C) and "pred_boxes" (B, Q, 4) normalized cxcywh.
            targets: B dicts with "labels" (T_i,) int64 and "boxes" (T_i, 4) normalized cxcywh.

        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length min(Q, T_i): query
            pred_idx[k] is matched to target tgt_idx[k].
        """
        pred_logits = outputs["pred_logits"]
        pred_boxes = outputs["pred_boxes"]
        batch_size, num_queries = pred_logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(
                f"HungarianMatcher: {len(targets)} targets for a batch of {batch_size} predictions"
            )
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]

        # costs in at least float32 (AMP may give float16 / bfloat16)
        dtype = torch.promote_types(pred_logits.dtype, torch.float32)
        logits = pred_logits.flatten(0, 1).to(dtype)  # (B*Q, C)
        boxes = pred_boxes.flatten(0, 1).to(dtype)  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)  # (T, 4)

        costs = {
            "cost_class": self._class_cost(logits, tgt_labels),
            "cost_bbox": torch.cdist(boxes, tgt_boxes, p=1),
            "cost_giou": -generalized_box_iou(
                box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)
            ),
        }
        total = (
            self.cost_class * costs["cost_class"]
            + self.cost_bbox * costs["cost_bbox"]
            + self.cost_giou * costs["cost_giou"]
        )
        # the one transfer to the host a step needs (scipy solves the assignment); the finiteness
        # check reads that copy instead of syncing on the device for it
        total = total.view(batch_size, num_queries, -1).cpu()  # (B, Q, T)
        if not torch.isfinite(total).all():
            bad = [name for name, cost in costs.items() if not torch.isfinite(cost).all()]
            raise FloatingPointError(
                f"HungarianMatcher: {', '.join(bad) or 'the total cost'} has non-finite entries "
                "(NaN or inf): check the model's pred_logits / pred_boxes and the target boxes"
            )

        indices = []
        for i, cost in enumerate(total.split(sizes, dim=-1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            pred_idx, tgt_idx = linear_sum_assignment(cost[i].numpy())
            indices.append(
                (
                    torch.as_tensor(pred_idx, dtype=torch.int64),
                    torch.as_tensor(tgt_idx, dtype=torch.int64),
                )
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, cost_class_type={self.cost_class_type!r}, "
            f"alpha={self.alpha}, gamma={self.gamma}"
        )
