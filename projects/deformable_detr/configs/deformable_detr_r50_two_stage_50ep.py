"""Deformable DETR ++ two-stage (with iterative box refinement), ResNet-50, 50 epochs
(paper: 46.9 AP). The decoder's queries are the top-300 encoder proposals."""

from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.with_box_refine = True
model.as_two_stage = True
train.output_dir = "./output/deformable_detr_r50_two_stage_50ep"
