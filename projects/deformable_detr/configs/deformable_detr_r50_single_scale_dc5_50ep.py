"""Single-scale Deformable DETR with a dilated res5 (DC5: stride 16), ResNet-50, 50 epochs
(paper: 41.5 AP)."""

from .deformable_detr_r50_single_scale_50ep import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.stages.res5_dilation = 2
train.output_dir = "./output/deformable_detr_r50_single_scale_dc5_50ep"
