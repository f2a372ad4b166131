"""The quickstart: a small Deformable DETR (multi-scale, iterative box refinement) trained from
scratch on the CPU on the generated shapes dataset (`shapes_train`, evaluated on `shapes_val`).

    python tools/train_net.py --config-file projects/deformable_detr/configs/shapes_tiny.py

Everything the COCO configs have, scaled down (the random-crop augmentation left out for the
short schedule): a narrow ResNet-18 with trainable BatchNorm (no ImageNet weights here), 64-d
transformer with 3 encoder and 3 decoder layers, 50 queries, and 150 training-only queries
with one-to-many matching (hybrid matching: many queries per shape get gradients from the
start, which speeds up the short schedule; eval uses the 50 alone).
The dataset is generated on first use under $DETRKIT_DATASETS/shapes (default ./datasets).
"""

import torch.nn as nn
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detrkit.config import LazyCall as L
from detrkit.config import get_config
from detrkit.engine.optimizer import WarmupParamScheduler
from detrkit.layers import ShapeSpec
from detrkit.modeling import BasicStem, ResNet

from .models.deformable_detr_r50 import model

dataloader = get_config("common/data/shapes.py").dataloader
optimizer = get_config("common/optim.py").AdamW
# Milestones are percent of train.max_iter: fvcore takes the last milestone as the schedule's
# length, which the LR hook stretches over train.max_iter (lr x0.1 for the last tenth).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[90, 100]),
    warmup_length=0.0,
    warmup_factor=1.0,
)
train = get_config("common/train.py").train

# ---- model: same structure as the R50 multi-scale + refinement variant, narrower
embed_dim = 64
model.backbone = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=16, norm="BN"),
    stages=L(ResNet.make_default_stages)(
        depth=18, norm="BN", stem_out_channels=16, res2_out_channels=16
    ),
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.neck.input_shapes = {
    "res3": L(ShapeSpec)(channels=32),
    "res4": L(ShapeSpec)(channels=64),
    "res5": L(ShapeSpec)(channels=128),
}
model.neck.out_channels = embed_dim
model.neck.norm_layer = L(nn.GroupNorm)(num_groups=8, num_channels=embed_dim)
model.position_embedding.num_pos_feats = embed_dim // 2
for _stack in (model.transformer.encoder, model.transformer.decoder):  # "_": not a config key
    _stack.embed_dim = embed_dim
    _stack.num_heads = 4
    _stack.feedforward_dim = 256
    _stack.num_layers = 3
    _stack.attn_dropout = 0.0
    _stack.ffn_dropout = 0.0
model.embed_dim = embed_dim
model.num_classes = 4
model.num_queries = 50
model.num_queries_one2many = 150  # each target repeated criterion.one2many_repeats = 6 times
model.with_box_refine = True
model.select_box_nums_for_evaluation = 100
model.pixel_mean = [127.5, 127.5, 127.5]
model.pixel_std = [64.0, 64.0, 64.0]

# ---- schedule: 1300 iterations at batch 8, lr x0.1 for the last tenth; `make quickstart`
# (install included) takes 8 to 13 minutes on this project's 2-core machines (README)
dataloader.train.total_batch_size = 8
# No random-crop branch: a crop cuts shapes that validation images always show whole, and within
# 1300 iterations it delays the point where detection takes off (README, "What the quickstart
# shows"); flips and the multi-scale resize stay.
dataloader.train.mapper.augmentation_with_crop = None
dataloader.evaluator.output_dir = "${train.output_dir}"
optimizer.lr = 1e-3
optimizer.weight_decay = 1e-4
optimizer.foreach = True  # the multi-tensor AdamW: same arithmetic, fewer calls on the CPU

train.output_dir = "./output/shapes_tiny"
train.max_iter = 1300
train.eval_period = 650
train.log_period = 20
train.checkpointer.period = 500
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 1.0
train.device = "cpu"  # train.device=cuda on a GPU machine
train.seed = 42
