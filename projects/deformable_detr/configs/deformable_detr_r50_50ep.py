"""Deformable DETR, multi-scale, ResNet-50, 50 epochs on COCO (paper: 44.5 AP).

detrex's recipe: AdamW lr 1e-4 (0.1x for the backbone), weight decay 1e-4, total batch 16,
375000 iterations with the 0.1x drop at 300000, grad clip 0.1, no weight decay on norms.

The official recipe is the documented alternative (batch 32, 0.1x also for `sampling_offsets`
and `reference_points`, class loss weight 2, 187500 iterations at batch 32):
    python tools/train_net.py \
        --config-file projects/deformable_detr/configs/deformable_detr_r50_50ep.py \
        optimizer.lr=2e-4 \
        optimizer.params.lr_factor_func=projects.deformable_detr.optim.deformable_detr_lr_factor \
        model.criterion.weight_dict.loss_class=2.0 dataloader.train.total_batch_size=32 \
        train.max_iter=187500 lr_multiplier.scheduler.milestones=[150000,187500]
"""

from detrkit.config import get_config
from detrkit.engine.optimizer import backbone_lr_factor

from .models.deformable_detr_r50 import model

dataloader = get_config("common/data/coco_detr.py").dataloader
optimizer = get_config("common/optim.py").AdamW
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_50ep
train = get_config("common/train.py").train

# an ImageNet ResNet-50 (torchvision .pth or detectron2 .pkl); nothing is downloaded
train.init_checkpoint = ""
train.output_dir = "./output/deformable_detr_r50_50ep"
train.max_iter = 375000
train.eval_period = 5000
train.log_period = 20
train.checkpointer.period = 5000
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 0.1
train.clip_grad.params.norm_type = 2
train.device = "cuda"

optimizer.lr = 1e-4
optimizer.betas = (0.9, 0.999)
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func = backbone_lr_factor

dataloader.train.num_workers = 16
dataloader.train.total_batch_size = 16
dataloader.evaluator.output_dir = "${train.output_dir}"
