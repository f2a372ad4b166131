"""Optimizers as lazy nodes. The model is filled in at train time:
`cfg.optimizer.params.model = model; optimizer = instantiate(cfg.optimizer)`.

Per-parameter lr factors are named functions so the config still saves to YAML, e.g.
`optimizer.params.lr_factor_func = backbone_lr_factor` (0.1x for names containing "backbone").
"""

import torch

from detrkit.config import LazyCall as L
from detrkit.engine.optimizer import get_default_optimizer_params

SGD = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(
        # model is set at train time
        weight_decay_norm=0.0,
    ),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # model is set at train time
        base_lr="${..lr}",
        weight_decay_norm=0.0,
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
