"""Learning-rate multipliers for COCO schedules (assuming a total batch size of 16).

Each value is `L(WarmupParamScheduler)(scheduler=L(MultiStepParamScheduler)(...), ...)`; the
trainer wraps it in `LRMultiplier` with `train.max_iter`. One COCO epoch at batch 16 is
118k / 16 ~= 7500 iterations, so "50ep" is 375000 iterations with the 0.1x drop at 300000.
Set `train.max_iter` to the schedule's length (e.g. 375000 for `lr_multiplier_50ep`).
"""

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detrkit.config import LazyCall as L
from detrkit.engine.optimizer import WarmupParamScheduler


def default_X_scheduler(num_X):
    """detectron2-style "Nx" schedule: 1x = 90000 iterations at batch 16, lr x0.1 twice near
    the end, 1000 iterations of linear warmup."""
    total_steps = num_X * 90000
    if num_X <= 2:
        milestones = [60000 * num_X, 80000 * num_X, total_steps]
    else:
        milestones = [total_steps - 60000, total_steps - 20000, total_steps]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=milestones),
        warmup_length=1000 / total_steps,
        warmup_method="linear",
        warmup_factor=0.001,
    )


def default_coco_scheduler(epochs=50, decay_epochs=40, warmup_epochs=0, base_steps=7500):
    """`epochs` COCO epochs of `base_steps` iterations, lr x0.1 after `decay_epochs`, and
    `warmup_epochs` of linear warmup from 0.001x."""
    total_steps = epochs * base_steps
    decay_steps = decay_epochs * base_steps
    warmup_steps = warmup_epochs * base_steps
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1], milestones=[decay_steps, total_steps]
        ),
        warmup_length=warmup_steps / total_steps,
        warmup_method="linear",
        warmup_factor=0.001,
    )


lr_multiplier_1x = default_X_scheduler(1)
lr_multiplier_2x = default_X_scheduler(2)
lr_multiplier_3x = default_X_scheduler(3)

lr_multiplier_12ep = default_coco_scheduler(12, 11, 0)
lr_multiplier_24ep = default_coco_scheduler(24, 20, 0)
lr_multiplier_36ep = default_coco_scheduler(36, 30, 0)
lr_multiplier_50ep = default_coco_scheduler(50, 40, 0)
