"""The engine: command line, process launching, per-process setup, the checks of a run's
config, the trainer, its hooks and the metric writers; `DefaultPredictor` for inference."""

from .cli import default_argument_parser, one_line_errors
from .config_checks import (
    check_config,
    check_dataset_classes,
    launch_backend,
    load_config,
    resolve_device,
)
from .defaults import DefaultPredictor, build_inference_model
from .ema import ModelEMA
from .events import (
    CommonMetricPrinter,
    EventStorage,
    EventWriter,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
)
from .hooks import (
    EMAHook,
    EvalHook,
    HookBase,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from .launch import LaunchError, launch
from .optimizer import LRMultiplier, WarmupParamScheduler, get_default_optimizer_params
from .setup import default_setup, default_writers
from .trainer import Trainer, TrainerBase, create_ddp_model

__all__ = [
    "CommonMetricPrinter",
    "DefaultPredictor",
    "EMAHook",
    "EvalHook",
    "EventStorage",
    "EventWriter",
    "HookBase",
    "IterationTimer",
    "JSONWriter",
    "LRMultiplier",
    "LRScheduler",
    "LaunchError",
    "ModelEMA",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "TensorboardXWriter",
    "Trainer",
    "TrainerBase",
    "WarmupParamScheduler",
    "build_inference_model",
    "check_config",
    "check_dataset_classes",
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "get_default_optimizer_params",
    "get_event_storage",
    "launch",
    "launch_backend",
    "load_config",
    "one_line_errors",
    "resolve_device",
]
