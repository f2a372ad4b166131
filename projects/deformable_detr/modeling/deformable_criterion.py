"""Deformable DETR's loss: the set criterion plus, in two-stage mode, the encoder proposals'
class-agnostic losses (suffix `_enc`)."""

from __future__ import annotations

import torch

from detrkit.modeling import SetCriterion


class DeformableCriterion(SetCriterion):
    """`SetCriterion` (final layer + `_0`.. `_4` auxiliary layers) and, when the outputs carry
    `enc_outputs`, the same losses on the encoder proposals with every target relabelled 0: the
    proposal head's first logit learns "object", as in the official two-stage code."""

    def forward(
        self, outputs: dict, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        losses = super().forward(outputs, targets)
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
