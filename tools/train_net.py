#!/usr/bin/env python
"""Train or evaluate a model described by a lazy config: detectron2's
tools/lazyconfig_train_net.py with detrex's additions (model EMA, AMP dtype, gradient clipping).

    python tools/train_net.py --config-file CFG.py [--resume] [--eval-only] [--num-gpus N]
        [--num-machines M] [--machine-rank R] [--dist-url URL] [key=value ...]

The hooks and their order: `detrkit.engine.hooks`. What is checked in the config, and when:
`detrkit.engine.config_checks`. Interruptions (signals, exit code 75, requeue, what a resume
restores): `detrkit.engine.preemption`. `train.device="cuda"` on a machine without CUDA runs on
the CPU (with a warning), so GPU configs also run on a laptop.
"""

import logging
import os
import sys

# `projects.*` (model code referenced by the configs) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.checkpoint import DetectionCheckpointer
from detrkit.config import ConfigError, instantiate
from detrkit.engine import (
    ModelEMA,
    Trainer,
    check_config,
    check_dataset_classes,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
    launch_backend,
    load_config,
    one_line_errors,
    resolve_device,
)
from detrkit.engine.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionHook,
    TrainingPreempted,
    requeue_slurm_job,
)
from detrkit.engine.resume import ResumeStateHook
from detrkit.evaluation import inference_on_dataset, print_csv_format
from detrkit.utils import comm

logger = logging.getLogger("detrkit")


def build_ema(cfg, model, eval_only=False):
    """`train.model_ema` as a ModelEMA, or None (for --eval-only: when its weights are used)."""
    ema_cfg = cfg.train.model_ema
    if not ema_cfg.enabled or (eval_only and not ema_cfg.use_ema_weights_for_eval_only):
        return None
    return ModelEMA(model, decay=ema_cfg.decay, device=ema_cfg.device)


def do_test(cfg, model, ema=None):
    """Evaluate on `dataloader.test`; with `ema`, the averaged weights too (as `bbox_ema/AP`)."""
    if "test" not in cfg.dataloader or "evaluator" not in cfg.dataloader:
        return {}
    test_loader = instantiate(cfg.dataloader.test)
    check_dataset_classes(cfg, "test")  # after the loader: loading a dataset sets its metadata
    ret = inference_on_dataset(model, test_loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    if ema is not None:
        logger.info("Evaluating the EMA weights")
        with ema.apply_to():
            ema_ret = inference_on_dataset(
                model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
            )
        ema_ret = {f"{task}_ema": value for task, value in ema_ret.items()}
        print_csv_format(ema_ret)
        ret = {**ret, **ema_ret}
    return ret


def maybe_compile(cfg, model):
    """`train.compile=True`: torch.compile the model in place with dynamic shapes (image sizes
    vary); in place, so the parameter names (checkpoints) stay those of the eager model."""
    if cfg.train.get("compile", False):
        logger.info("Compiling the model with torch.compile(dynamic=True)")
        model.compile(dynamic=True)
    return model


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(resolve_device(cfg))
    ema = build_ema(cfg, model)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    train_loader = instantiate(cfg.dataloader.train)
    check_dataset_classes(cfg, "train")

    model = maybe_compile(cfg, create_ddp_model(model, **cfg.train.ddp))
    trainer = Trainer(
        model,
        train_loader,
        optim,
        amp=cfg.train.amp.enabled,
        amp_dtype=cfg.train.amp.get("dtype", None),  # detrkit: bfloat16 on the CPU
        clip_grad_params=cfg.train.clip_grad.params if cfg.train.clip_grad.enabled else None,
        gather_metric_period=cfg.train.get("gather_metric_period", 1),
    )
    checkpointer = DetectionCheckpointer(
        model,
        cfg.train.output_dir,
        trainer=trainer,
        **({"ema_state": ema} if ema is not None else {}),
    )
    has_eval = "test" in cfg.dataloader and "evaluator" in cfg.dataloader
    # main process only; resume state and preemption on every rank (see engine/preemption.py)
    periodic = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
    periodic = periodic if comm.is_main_process() else None
    resume_state = ResumeStateHook(cfg.train.checkpointer.period)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.EMAHook(ema) if ema is not None else None,
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            resume_state,
            periodic,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema))
            if has_eval
            else None,
            hooks.PeriodicWriter(
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
        # The checkpoint stores the training iteration that just finished, thus we start
        # at the next iteration
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)

    if args.eval_only:
        model = instantiate(cfg.model)
        logger.info("Model:\n%s", model)
        model.to(resolve_device(cfg))
        ema = build_ema(cfg, model, eval_only=True)
        if not cfg.train.init_checkpoint:
            logger.warning(
                "--eval-only without train.init_checkpoint: evaluating the initial (untrained) "
                "weights; pass train.init_checkpoint=/path/to/model.pth"
            )
        checkpointables = {"ema_state": ema} if ema is not None else {}
        DetectionCheckpointer(model, **checkpointables).load(cfg.train.init_checkpoint)
        if ema is not None:
            if not ema.has_state:
                raise ConfigError(
                    "train.model_ema.use_ema_weights_for_eval_only=True but "
                    f"{cfg.train.init_checkpoint or '(no train.init_checkpoint)'} has no "
                    "'ema_state'; set it to False to evaluate the plain weights"
                )
            logger.info("Evaluating with the EMA weights of %s", cfg.train.init_checkpoint)
            ema.copy_to_model()
        model = maybe_compile(cfg, create_ddp_model(model))
        return do_test(cfg, model)
    do_train(args, cfg)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    with one_line_errors():  # before any process starts: exit code 2, as argparse
        cfg = load_config(args)
        check_config(cfg, args)
    try:
        with one_line_errors(output_dir=cfg.train.output_dir):
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
                backend=launch_backend(cfg),
            )

    except TrainingPreempted as e:
        requeued = cfg.train.get("requeue_on_preempt", False) and requeue_slurm_job()
        then = "the job is requeued" if requeued else "rerun with --resume to continue"
        print(f"{os.path.basename(sys.argv[0])}: {e.message}; {then}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    invoke_main()
