"""Default `train` settings (detrex's keys and defaults). Use in a config as
`train = get_config("common/train.py").train`, then change what differs.

amp.dtype: "float16" (the default) is the usual CUDA choice and runs with a gradient scaler;
"bfloat16" needs no scaler and is the dtype to use for autocast on the CPU.
"""

train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    amp=dict(enabled=False, dtype="float16"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    clip_grad=dict(enabled=False, params=dict(max_norm=0.1, norm_type=2)),
    seed=-1,
    fast_dev_run=dict(enabled=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    gather_metric_period=1,  # detrkit: losses reduced and checked every this many steps
    model_ema=dict(enabled=False, decay=0.999, device="", use_ema_weights_for_eval_only=False),
    device="cuda",
    # on SIGTERM/SIGINT/SIGUSR1 training saves and exits with code 75; under SLURM this also
    # runs `scontrol requeue $SLURM_JOB_ID` (the requeued job should pass --resume)
    requeue_on_preempt=False,
    compile=False,  # detrkit: torch.compile(dynamic=True) the model for training and evaluation
)
