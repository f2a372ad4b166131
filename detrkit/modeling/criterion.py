"""Set prediction losses: match queries to targets, then classification and box losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detrkit.layers.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from detrkit.utils import comm

_LOSS_CLASS_TYPES = ("focal_loss", "ce_loss")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Compute losses in at least float32 (AMP may hand us float16 / bfloat16)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), SUMMED over all elements and divided by num_boxes.

        p_t = p * t + (1 - p) * (1 - t),   alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss = sum(alpha_t * (1 - p_t)**gamma * BCE(p, t)) / num_boxes

    For DETR's (B, Q, C) logits this is "summed over queries and classes / num_boxes". A negative
    `alpha` disables the alpha weighting.

    Args:
        inputs: logits of any shape.
        targets: same shape, values in [0, 1] (one-hot labels).
        num_boxes: normalizer (the number of target boxes, >= 1).
    """
    inputs = _upcast(inputs)
    targets = targets.to(inputs.dtype)
    prob = inputs.sigmoid()
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """DETR-style losses for one set of predictions and, optionally, its auxiliary outputs.

    For the final predictions and each entry of `outputs["aux_outputs"]` (matched separately):
      - "class": `loss_class`, sigmoid focal loss over all queries x classes / num_boxes
        ("focal_loss"; unmatched queries have all-zero targets), or softmax cross-entropy with
        an extra no-object logit weighted by `eos_coef` ("ce_loss", a weighted mean);
      - "boxes": `loss_bbox` = L1 of matched cxcywh boxes / num_boxes and
        `loss_giou` = sum(1 - GIoU) / num_boxes.
    Aux losses carry the suffix `_0`, `_1`, ... The returned losses are UNWEIGHTED;
    `weight_dict` (name -> weight) is stored for the model to apply.

    `num_boxes` is the number of target boxes in the batch, summed over processes and divided by
    the world size, at least 1.

    Subclasses add losses by extending `get_loss` / `loss_map` and reuse `get_num_boxes` and
    `_get_src_permutation_idx`.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: dict[str, float],
        losses: Sequence[str] = ("class", "boxes"),
        loss_class_type: str = "focal_loss",
        alpha: float = 0.25,
        gamma: float = 2.0,
        eos_coef: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1; got {num_classes}")
        if loss_class_type not in _LOSS_CLASS_TYPES:
            raise ValueError(
                f"SetCriterion: unknown loss_class_type {loss_class_type!r}; accepted: "
                f"{list(_LOSS_CLASS_TYPES)}"
            )
        if isinstance(losses, str):
            raise ValueError(f"SetCriterion: losses must be a list of names; got {losses!r}")
        unknown = [name for name in losses if name not in self.loss_map]
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown losses {unknown}; accepted: {sorted(self.loss_map)}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.loss_class_type = loss_class_type
        self.alpha = alpha
        self.gamma = gamma
        self.eos_coef = eos_coef
        if loss_class_type == "ce_loss":
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    @property
    def loss_map(self) -> dict[str, str]:
        """Loss name -> method name; extend in a subclass to add losses."""
        return {"class": "loss_labels", "boxes": "loss_boxes"}

    # ------------------------------------------------------------------------------------------
    # individual losses
    # ------------------------------------------------------------------------------------------
    def loss_labels(
        self,
        outputs: dict,
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        """`loss_class` over every query: matched queries target their class, the rest none."""
        logits = outputs["pred_logits"]  # (B, Q, C) focal, (B, Q, C + 1) ce
        batch_size, num_queries = logits.shape[:2]
        batch_idx, src_idx = self._get_src_permutation_idx(indices)
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(
            logits.device
        )
        # num_classes is the "no object" class
        target_classes = torch.full(
            (batch_size, num_queries), self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[batch_idx, src_idx] = matched_labels

        if self.loss_class_type == "ce_loss":
            loss = F.cross_entropy(
                _upcast(logits).transpose(1, 2), target_classes, weight=self.empty_weight
            )
            return {"loss_class": loss}

        one_hot = torch.zeros(
            (batch_size, num_queries, self.num_classes + 1),
            dtype=logits.dtype,
            device=logits.device,
        )
        one_hot.scatter_(2, target_classes.unsqueeze(-1), 1)
        one_hot = one_hot[:, :, :-1]  # drop the no-object column: (B, Q, C)
        loss = sigmoid_focal_loss(logits, one_hot, num_boxes, alpha=self.alpha, gamma=self.gamma)
        return {"loss_class": loss}

    def loss_boxes(
        self,
        outputs: dict,
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        """`loss_bbox` (L1 on cxcywh) and `loss_giou` (1 - GIoU on xyxy) of matched queries."""
        batch_idx, src_idx = self._get_src_permutation_idx(indices)
        pred_boxes = outputs["pred_boxes"]
        src_boxes = _upcast(pred_boxes[batch_idx, src_idx])  # (M, 4)
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(
            src_boxes
        )  # (M, 4)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def get_loss(
        self,
        name: str,
        outputs: dict,
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        if name not in self.loss_map:
            raise ValueError(
                f"SetCriterion: unknown loss {name!r}; accepted: {sorted(self.loss_map)}"
            )
        return getattr(self, self.loss_map[name])(outputs, targets, indices, num_boxes)

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _get_src_permutation_idx(
        indices: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch_idx, query_idx) of every matched prediction, image after image."""
        batch_idx = torch.cat(
            [torch.full_like(src, i, dtype=torch.int64) for i, (src, _) in enumerate(indices)]
        )
        src_idx = torch.cat([src for src, _ in indices]).to(torch.int64)
        return batch_idx, src_idx

    @staticmethod
    def get_num_boxes(targets: list[dict[str, torch.Tensor]], device: torch.device) -> float:
        """Target boxes per process, averaged over processes, at least 1."""
        count = float(sum(len(t["labels"]) for t in targets))
        if not comm.is_dist_initialized():
            return max(count, 1.0)  # no all-reduce, no device round trip
        num_boxes = torch.tensor([count], dtype=torch.float32, device=device)
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / comm.get_world_size()
        return max(num_boxes.item(), 1.0)

    def check_targets(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> None:
        """Fail with the image index on targets of the wrong structure (count, keys, shapes,
        dtypes). Values (class ids, finite boxes) are checked where the data enters, not here:
        on a GPU that would be a host sync per step."""
        batch_size = outputs["pred_logits"].shape[0]
        if len(targets) != batch_size:
            raise ValueError(
                f"SetCriterion: got {len(targets)} targets for a batch of {batch_size} images"
            )
        for i, target in enumerate(targets):
            for key in ("labels", "boxes"):
                if key not in target:
                    raise KeyError(f"SetCriterion: target of image {i} has no {key!r}")
            labels, boxes = target["labels"], target["boxes"]
            if labels.dim() != 1 or labels.dtype.is_floating_point:
                raise ValueError(
                    f"SetCriterion: labels of image {i} must be a 1-d integer tensor; got shape "
                    f"{tuple(labels.shape)} dtype {labels.dtype}"
                )
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
                raise ValueError(
                    f"SetCriterion: boxes of image {i} must have shape ({len(labels)}, 4) to "
                    f"match its labels; got {tuple(boxes.shape)}"
                )

    # ------------------------------------------------------------------------------------------
    def forward(
        self, outputs: dict, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) normalized cxcywh, and
                optionally "aux_outputs": a list of dicts with the same two keys.
            targets: B dicts with "labels" (T_i,) int64 in [0, num_classes) and "boxes"
                (T_i, 4) normalized cxcywh; T_i may be 0.

        Returns:
            unweighted losses: loss_class, loss_bbox, loss_giou, and the same with `_{i}` for
            the i-th aux output.
        """
        self.check_targets(outputs, targets)
        main_outputs = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        num_boxes = self.get_num_boxes(targets, outputs["pred_logits"].device)

        indices = self.matcher(main_outputs, targets)
        losses: dict[str, torch.Tensor] = {}
        for name in self.losses:
            losses.update(self.get_loss(name, main_outputs, targets, indices, num_boxes))

        for i, aux_outputs in enumerate(outputs.get("aux_outputs") or []):
            aux_indices = self.matcher(aux_outputs, targets)
            for name in self.losses:
                aux_losses = self.get_loss(name, aux_outputs, targets, aux_indices, num_boxes)
                losses.update({f"{key}_{i}": value for key, value in aux_losses.items()})
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, "
            f"loss_class_type={self.loss_class_type!r}, alpha={self.alpha}, gamma={self.gamma}, "
            f"weight_dict={self.weight_dict}"
        )
