"""Deformable DETR's loss: the set criterion plus, in two-stage mode, the encoder proposals'
class-agnostic losses (suffix `_enc`), and with hybrid matching the one-to-many queries' losses
(suffix `_one2many`)."""

from __future__ import annotations

import torch

from detrkit.modeling import SetCriterion


class DeformableCriterion(SetCriterion):
    """`SetCriterion` (final layer + `_0`.. `_4` auxiliary layers) and
    - when the outputs carry `enc_outputs`, the same losses on the encoder proposals with every
      target relabelled 0: the proposal head's first logit learns "object", as in the official
      two-stage code;
    - when they carry `one2many_outputs` (the model's `num_queries_one2many` queries), the same
      losses on those against every target repeated `one2many_repeats` times, each multiplied
      by `one2many_weight` (H-DETR's k and lambda; its defaults 6 and 1).
    """

    def __init__(
        self, *args, one2many_repeats: int = 6, one2many_weight: float = 1.0, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if one2many_repeats < 1:
            raise ValueError(
                f"DeformableCriterion: one2many_repeats must be >= 1; got {one2many_repeats}"
            )
        self.one2many_repeats = one2many_repeats
        self.one2many_weight = one2many_weight

    def forward(
        self, outputs: dict, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        losses = super().forward(outputs, targets)
        if "one2many_outputs" in outputs:
            # labels (T,) -> (k T,), boxes (T, 4) -> (k T, 4)
            repeats = self.one2many_repeats
            repeated = [
                {"labels": t["labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)}
                for t in targets
            ]
            one2many = super().forward(outputs["one2many_outputs"], repeated)
            for name, value in one2many.items():
                losses[f"{name}_one2many"] = value * self.one2many_weight
        if "enc_outputs" not in outputs:
            return losses

        enc_outputs = outputs["enc_outputs"]
        binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        indices = self.matcher(enc_outputs, binary_targets)
        num_boxes = self.get_num_boxes(binary_targets, enc_outputs["pred_logits"].device)
        for loss in self.losses:
            enc_losses = self.get_loss(loss, enc_outputs, binary_targets, indices, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        return losses
