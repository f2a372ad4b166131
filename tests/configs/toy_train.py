"""Test-only config: trains `tests/toy`'s tiny regression model with the real engine (AdamW,
warmup + cosine lr, checkpoints, evaluation, metrics) in a few seconds on the CPU."""

import os
import sys

from fvcore.common.param_scheduler import CosineParamScheduler

from detrkit.config import LazyCall as L
from detrkit.config import get_config
from detrkit.engine.optimizer import WarmupParamScheduler

# `tests/` holds the `toy` package; make it importable wherever this config is loaded from
_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from toy import ToyEvaluator, ToyLoader, ToyModel, ToyTestLoader  # noqa: E402

model = L(ToyModel)(
    in_dim=8,
    out_dim=4,
    hidden_dim=16,
    # test knobs (see tests/toy): -1 / 0 / "" switch them off
    nan_at_iter=-1,
    raise_at_iter=-1,
    raise_on_rank=-1,
    sleep_per_iter=0.0,
    dump_params_dir="",
    rng_noise=0.0,
)

dataloader = dict(
    train=L(ToyLoader)(
        batch_size=8, in_dim=8, out_dim=4, num_batches=1, seed=0, simulate_world_size=1
    ),
    test=L(ToyTestLoader)(batch_size=4, in_dim=8, out_dim=4, num_batches=4, seed=0),
    evaluator=L(ToyEvaluator)(),
)

optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 1e-2
optimizer.weight_decay = 1e-2

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.05),
    warmup_length=0.1,
    warmup_factor=0.1,
)

train = get_config("common/train.py").train
train.output_dir = "./output/toy"
train.max_iter = 20
train.device = "cpu"
train.seed = 0
train.log_period = 5
train.eval_period = 10
train.checkpointer.period = 5
train.checkpointer.max_to_keep = 100
