"""Single-scale Deformable DETR: one level, res5 (stride 32), ResNet-50, 50 epochs
(paper: 39.4 AP)."""

from detrkit.config import LazyCall as L
from detrkit.layers import ShapeSpec

from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.out_features = ["res5"]
model.neck.input_shapes = {"res5": L(ShapeSpec)(channels=2048)}
model.neck.in_features = ["res5"]
model.neck.num_outs = 1
model.transformer.num_feature_levels = 1
train.output_dir = "./output/deformable_detr_r50_single_scale_50ep"
