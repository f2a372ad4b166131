"""Deformable DETR + iterative box refinement, ResNet-50, 50 epochs (paper: 46.2 AP)."""

from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.with_box_refine = True
train.output_dir = "./output/deformable_detr_r50_with_box_refinement_50ep"
