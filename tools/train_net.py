#!/usr/bin/env python
"""Train or evaluate a model described by a lazy config (detrex's tools/train_net.py).

    python tools/train_net.py --config-file CFG.py [--resume] [--eval-only] [--num-gpus N]
        [--num-machines M] [--machine-rank R] [--dist-url URL] [key=value ...]

Training registers, in order: IterationTimer, EMAHook (train.model_ema.enabled), LRScheduler,
ResumeStateHook, PeriodicCheckpointer (rank 0), EvalHook (when the config has dataloader.test and
dataloader.evaluator), PeriodicWriter (rank 0), PreemptionHook. Exit codes: 0 done, 1 error,
2 bad command line or config, 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint
(rerun with --resume; `train.requeue_on_preempt=True` requeues a SLURM job).
`train.device="cuda"` on a machine without CUDA trains on the CPU (with a warning), so GPU
configs also run on a laptop.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import torch

# `projects.*` (model code referenced by the configs) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.checkpoint import CheckpointError, DetectionCheckpointer
from detrkit.config import ConfigError, LazyConfig, instantiate
from detrkit.data import MetadataCatalog
from detrkit.data.detection_utils import ImageLoadError
from detrkit.engine import (
    EMAHook,
    EvalHook,
    IterationTimer,
    LaunchError,
    LRScheduler,
    ModelEMA,
    PeriodicCheckpointer,
    PeriodicWriter,
    Trainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    launch,
)
from detrkit.engine.launch import check_launch_args
from detrkit.engine.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionHook,
    TrainingPreempted,
    requeue_slurm_job,
)
from detrkit.engine.resume import ResumeStateHook
from detrkit.evaluation import inference_on_dataset, print_csv_format
from detrkit.utils import comm

logger = logging.getLogger("detrkit.train_net")

# errors whose message names the config key, file, checkpoint or image at fault
USER_ERRORS = (ConfigError, CheckpointError, ImageLoadError, FileNotFoundError)

# fast_dev_run: a short run through every hook (detrex's values)
FAST_DEV_RUN = {"max_iter": 20, "eval_period": 10, "log_period": 1}


def load_config(args) -> Any:
    """The config file with the command-line overrides applied."""
    cfg = LazyConfig.load(args.config_file)
    return LazyConfig.apply_overrides(cfg, args.opts or [])


def check_config(cfg: Any, args) -> None:
    """Raise ValueError naming the config file and the missing key that the run needs."""
    required = ["model", "train"]
    if args.eval_only:
        required += ["dataloader.test", "dataloader.evaluator"]
    else:
        required += ["dataloader.train", "optimizer", "lr_multiplier"]
    for key in required:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                what = "--eval-only" if args.eval_only else "training"
                raise ValueError(
                    f"config file {args.config_file} has no key '{key}', which {what} needs"
                )
            node = node[part]


def _dataset_names(cfg: Any, split: str) -> list[str]:
    """Dataset names of `dataloader.<split>` when it reads them from the catalog."""
    try:
        names = cfg.dataloader[split].dataset.names
    except (AttributeError, KeyError, TypeError):
        return []
    return [names] if isinstance(names, str) else list(names)


def check_num_classes(cfg: Any, split: str) -> None:
    """`model.num_classes` is the one place a class count is set (the criterion interpolates it,
    the evaluator reads the dataset's metadata); fail early when it differs from the dataset's,
    naming both settings. Too few outputs cannot express the dataset; too many produce labels
    the evaluator cannot map back to a category, which would only surface at the first
    evaluation."""
    num_classes = cfg.model.get("num_classes", None) if "model" in cfg else None
    if not isinstance(num_classes, int):
        return
    for name in _dataset_names(cfg, split):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(
                f"dataset '{name}' has {len(classes)} classes but model.num_classes={num_classes}; "
                f"set model.num_classes={len(classes)} (the criterion and evaluator follow it)"
            )


def _requested_device(cfg: Any) -> str:
    return str(cfg.train.get("device", "cuda") or "cuda")


def resolve_device(cfg: Any) -> torch.device:
    """`train.device`, falling back to the CPU (with a warning) when CUDA is not available.

    The fallback is written back into `cfg.train.device`, so that config values interpolated
    from it (`model.device = "${..train.device}"`) follow.
    """
    device = _requested_device(cfg)
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available: using the CPU", device)
        device = "cpu"
    cfg.train.device = device
    if device == "cuda" and comm.get_world_size() > 1:
        # launch() set this process's GPU; name it so that nothing lands on cuda:0
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def launch_backend(cfg: Any) -> str | None:
    """gloo for `train.device=cpu` (CPU processes, also on a machine with GPUs); otherwise None,
    which lets `launch` pick NCCL when CUDA is available."""
    return "gloo" if _requested_device(cfg).startswith("cpu") else None


def build_ema(cfg: Any, model: torch.nn.Module) -> ModelEMA | None:
    ema_cfg = cfg.train.get("model_ema", None)
    if not ema_cfg or not ema_cfg.get("enabled", False):
        return None
    return ModelEMA(model, decay=ema_cfg.get("decay", 0.999), device=ema_cfg.get("device", ""))


def do_test(cfg: Any, model: torch.nn.Module, ema: ModelEMA | None = None) -> dict:
    """Evaluate on `dataloader.test` with `dataloader.evaluator`; with `ema`, evaluate the
    averaged weights too and report them under `<task>_ema` (e.g. `bbox_ema/AP`)."""
    if "test" not in cfg.dataloader or "evaluator" not in cfg.dataloader:
        return {}
    test_loader = instantiate(cfg.dataloader.test)
    check_num_classes(cfg, "test")
    results = inference_on_dataset(model, test_loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    if ema is not None:
        logger.info("Evaluating the EMA weights")
        with ema.apply_to():
            ema_results = inference_on_dataset(
                model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
            )
        ema_results = {f"{task}_ema": value for task, value in ema_results.items()}
        print_csv_format(ema_results)
        results = {**results, **ema_results}
    return results


def do_train(args, cfg: Any, device: torch.device) -> None:
    if cfg.train.get("wandb", {}).get("enabled", False):
        logger.warning("train.wandb.enabled=True is not supported by detrkit: not logging to wandb")
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(device)
    ema = build_ema(cfg, model)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    check_num_classes(cfg, "train")  # after the loader: loading a dataset sets its metadata

    ddp_cfg = dict(cfg.train.get("ddp", {}))
    model = create_ddp_model(model, **ddp_cfg)
    amp_cfg = cfg.train.get("amp", {})
    clip_cfg = cfg.train.get("clip_grad", {})
    trainer = Trainer(
        model,
        train_loader,
        optimizer,
        amp=bool(amp_cfg.get("enabled", False)),
        amp_dtype=amp_cfg.get("dtype", None),
        clip_grad_params=dict(clip_cfg.params) if clip_cfg.get("enabled", False) else None,
    )
    checkpointables = {"trainer": trainer}
    if ema is not None:
        checkpointables["ema_state"] = ema
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, **checkpointables)

    has_eval = "test" in cfg.dataloader and "evaluator" in cfg.dataloader
    # main process only; resume state and preemption on every rank (see engine/preemption.py)
    periodic = PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
    periodic = periodic if comm.is_main_process() else None
    resume_state = ResumeStateHook(cfg.train.checkpointer.period)
    trainer.register_hooks(
        [
            IterationTimer(),
            EMAHook(ema) if ema is not None else None,
            LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            resume_state,
            periodic,
            EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema)) if has_eval else None,
            PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
            PreemptionHook(periodic, resume_state),
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # the checkpoint holds the last completed iteration
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def do_eval_only(cfg: Any, device: torch.device) -> dict:
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(device)
    ema_cfg = cfg.train.get("model_ema", {})
    use_ema = bool(ema_cfg.get("enabled", False)) and bool(
        ema_cfg.get("use_ema_weights_for_eval_only", False)
    )
    ema = build_ema(cfg, model) if use_ema else None
    checkpointables = {"ema_state": ema} if ema is not None else {}
    if not cfg.train.init_checkpoint:
        logger.warning(
            "--eval-only without train.init_checkpoint: evaluating the initial (untrained) "
            "weights; pass train.init_checkpoint=/path/to/model.pth"
        )
    DetectionCheckpointer(model, **checkpointables).load(cfg.train.init_checkpoint)
    if ema is not None:
        if not ema.has_state:
            raise ValueError(
                f"train.model_ema.use_ema_weights_for_eval_only=True but "
                f"{cfg.train.init_checkpoint or '(no train.init_checkpoint)'} has no 'ema_state'; "
                "set it to False to evaluate the plain weights"
            )
        logger.info("Evaluating with the EMA weights of %s", cfg.train.init_checkpoint)
        ema.copy_to_model()
    model = create_ddp_model(model)
    return do_test(cfg, model)


def main(args) -> dict | None:
    cfg = load_config(args)
    if cfg.train.get("fast_dev_run", {}).get("enabled", False):
        for key, value in FAST_DEV_RUN.items():
            cfg.train[key] = value
    default_setup(cfg, args)
    device = resolve_device(cfg)

    if args.eval_only:
        return do_eval_only(cfg, device)
    do_train(args, cfg, device)
    return None


def _exit_with_error(message: str, code: int = 2) -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "train_net.py"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def check_args(args) -> Any:
    """Check the command line and the config before any process starts, so that a user error
    is one line on stderr (exit code 2) instead of a traceback from every rank. Returns the
    config (with overrides)."""
    if not args.config_file:
        _exit_with_error("the following argument is required: --config-file FILE")
    try:
        cfg = load_config(args)
        check_config(cfg, args)
        check_launch_args(
            args.num_gpus,
            args.num_machines,
            args.machine_rank,
            args.dist_url,
            backend=launch_backend(cfg),
        )
    except (ConfigError, ValueError) as e:
        _exit_with_error(str(e))
    return cfg


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    cfg = check_args(args)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            backend=launch_backend(cfg),
        )
    except LaunchError as e:
        _exit_with_error(str(e), code=1)
    except TrainingPreempted as e:
        requeued = cfg.train.get("requeue_on_preempt", False) and requeue_slurm_job()
        then = "the job is requeued" if requeued else "rerun with --resume to continue"
        print(f"{os.path.basename(sys.argv[0])}: {e.message}; {then}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except USER_ERRORS as e:
        # a bad config value, file, checkpoint or image met while running in this process: the
        # message names it; the traceback goes to log.txt only
        log_file = os.path.join(cfg.train.get("output_dir", "."), "log.txt")
        with open(log_file, "a") as f:
            traceback.print_exc(file=f)
        _exit_with_error(f"{e} (traceback in {log_file})", code=1)
