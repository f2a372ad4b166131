"""What `tools/train_net.py` checks and derives from a run's config, in one place.

- `load_config(args)`: the config file with the command-line overrides (and
  `train.fast_dev_run`) applied.
- `check_config(cfg, args)`: before any process starts, so that a mistake is one line on stderr
  rather than a traceback from every rank: the keys the run needs, and the process count,
  machine rank and `--dist-url` for the backend `train.device` asks for.
- `resolve_device(cfg)`: `train.device`, or the CPU (with a warning) where CUDA is missing.
- `check_dataset_classes(cfg, split)`: once a loader is built (loading a dataset sets its
  metadata), the dataset's class count equals `model.num_classes`.

A config mistake raises `ConfigError` naming the config file, key or value at fault and what is
accepted; a launch argument the machine cannot serve raises ValueError naming the flag.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from omegaconf import OmegaConf

from detrkit.config import ConfigError, LazyConfig
from detrkit.utils import comm

from .launch import check_launch_args

__all__ = [
    "FAST_DEV_RUN",
    "check_config",
    "check_dataset_classes",
    "launch_backend",
    "load_config",
    "resolve_device",
]

logger = logging.getLogger(__name__)

# train.fast_dev_run.enabled=True: a short run through every hook (detrex's values)
FAST_DEV_RUN = {"max_iter": 20, "eval_period": 10, "log_period": 1}


def load_config(args: argparse.Namespace) -> Any:
    """`args.config_file` with the overrides `args.opts` and, when enabled, fast_dev_run."""
    if not args.config_file:
        raise ConfigError("the following argument is required: --config-file FILE")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts or [])
    if OmegaConf.select(cfg, "train.fast_dev_run.enabled", default=False):
        for key, value in FAST_DEV_RUN.items():
            cfg.train[key] = value
    return cfg


# the `train` keys training reads (configs/common/train.py has them all)
_TRAIN_KEYS = [
    "train.max_iter",
    "train.amp.enabled",
    "train.ddp",
    "train.clip_grad.enabled",
    "train.checkpointer",
    "train.eval_period",
    "train.log_period",
]


def check_config(cfg: Any, args: argparse.Namespace) -> None:
    """Raise ConfigError for a key the run needs that the config lacks, ValueError (naming the
    flag) for launch arguments the device or machine cannot serve."""
    required = ["model", "train.output_dir", "train.init_checkpoint", "train.model_ema.enabled"]
    if args.eval_only:
        required += ["dataloader.test", "dataloader.evaluator"]
    else:
        required += ["dataloader.train", "optimizer", "lr_multiplier", *_TRAIN_KEYS]
    missing = object()
    for key in required:
        if OmegaConf.select(cfg, key, default=missing) is missing:
            what = "--eval-only" if args.eval_only else "training"
            raise ConfigError(
                f"config file {args.config_file} has no key '{key}', which {what} needs"
            )
    check_launch_args(
        args.num_gpus,
        args.num_machines,
        args.machine_rank,
        args.dist_url,
        backend=launch_backend(cfg),
    )


def _requested_device(cfg: Any) -> str:
    return str(OmegaConf.select(cfg, "train.device", default=None) or "cuda")


def launch_backend(cfg: Any) -> str | None:
    """gloo for `train.device=cpu` (CPU processes, also on a machine with GPUs); otherwise None,
    which lets `launch` pick NCCL when CUDA is available."""
    return "gloo" if _requested_device(cfg).startswith("cpu") else None


def resolve_device(cfg: Any) -> torch.device:
    """The device this process trains on: `train.device`, or the CPU (with a warning) when it
    asks for CUDA and there is none. The config is left as written."""
    device = _requested_device(cfg)
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available: using the CPU", device)
        return torch.device("cpu")
    if device == "cuda" and comm.get_world_size() > 1:
        # launch() set this process's GPU; name it so that nothing lands on cuda:0
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _dataset_names(cfg: Any, split: str) -> list[str]:
    """Dataset names of `dataloader.<split>` when it reads them from the catalog."""
    names = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def check_dataset_classes(cfg: Any, split: str) -> None:
    """`model.num_classes` is the one place a class count is set (the criterion interpolates
    it, the evaluator reads the dataset's metadata): fail, naming both settings, when it
    differs from the dataset's. Too few outputs cannot express the dataset; too many produce
    labels the evaluator cannot map back to a category, which would only surface at the first
    evaluation. With this check and the category ids checked when a dataset is loaded, every
    class id training sees is in [0, model.num_classes)."""
    from detrkit.data import MetadataCatalog  # here: `import detrkit.engine` stays light

    num_classes = OmegaConf.select(cfg, "model.num_classes", default=None)
    if not isinstance(num_classes, int):
        return
    for name in _dataset_names(cfg, split):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(
                f"dataset '{name}' has {len(classes)} classes but model.num_classes={num_classes}; "
                f"set model.num_classes={len(classes)} (the criterion and evaluator follow it)"
            )
