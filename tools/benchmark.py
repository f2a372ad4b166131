#!/usr/bin/env python
"""Measure training, inference or data-loading speed of a config (detectron2's
tools/benchmark.py), on the CPU or a GPU (`train.device`).

    python tools/benchmark.py --config-file CFG.py --task train --iters 50
    python tools/benchmark.py --config-file CFG.py --task eval --batch-size 4 --amp bf16
    python tools/benchmark.py --config-file CFG.py --task data --iters 200

train: iterations/s of the real training step (forward, loss, backward, clipping, optimizer)
on `dataloader.train`. eval: images/s and ms/image of the model in eval mode on the first
images of `dataloader.test`, kept in memory and regrouped into batches of `--batch-size`, so
that only the model is timed. data: samples/s of `dataloader.train` alone. The first
`--warmup` iterations are not timed; CUDA work is synchronized before each clock reading.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable

import torch

# `projects.*` (model code referenced by the configs) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.checkpoint import CheckpointError
from detrkit.config import ConfigError, LazyConfig, instantiate
from detrkit.data.detection_utils import ImageLoadError
from detrkit.engine import HookBase, Trainer
from detrkit.engine.cli import UsageError, check_overrides
from detrkit.engine.defaults import build_model
from detrkit.utils.logger import setup_logger

logger = logging.getLogger("detrkit.benchmark")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure training, inference or data-loading speed of a config.",
        epilog="Config overrides come last as KEY=VALUE, e.g. train.device=cuda.",
    )
    parser.add_argument("--config-file", metavar="FILE", required=True, help="a LazyConfig .py")
    parser.add_argument(
        "--task",
        choices=("train", "eval", "data"),
        required=True,
        help="train: iterations/s; eval: images/s and ms/image; data: samples/s of the loader",
    )
    parser.add_argument(
        "--iters", type=int, default=50, metavar="N", help="timed iterations (default 50)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        metavar="W",
        help="iterations run before the clock starts (default 5)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="images per eval forward pass (default: dataloader.test.batch_size); train and "
        "data use dataloader.train.total_batch_size",
    )
    parser.add_argument(
        "--amp",
        choices=tuple(AMP_DTYPES),
        help="run the model under torch.autocast in bfloat16 or float16 (eval and train; "
        "float16 on the CPU falls back to bfloat16)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="config overrides"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.iters < 1:
        raise UsageError(f"--iters {args.iters} is not positive; accepted: N >= 1")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup} is negative; accepted: W >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} is not positive; accepted: B >= 1")
    if args.batch_size is not None and args.task != "eval":
        raise UsageError(
            f"--batch-size is for --task eval; --task {args.task} uses "
            "dataloader.train.total_batch_size=B"
        )
    check_overrides(args.opts)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Seconds of `iters` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _synchronize(device)
    return time.perf_counter() - start


def _memory(device: torch.device) -> str:
    """ ", max memory N MB" on CUDA (peak allocated since the start), else ""."""
    if device.type != "cuda":
        return ""
    return f", max memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"


def _require(cfg, key: str, config_file: str) -> None:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise UsageError(f"config file {config_file} has no '{key}', which this task needs")
        node = node[part]


def benchmark_data(cfg, args: argparse.Namespace) -> str:
    _require(cfg, "dataloader.train", args.config_file)
    loader = iter(instantiate(cfg.dataloader.train))
    samples = [0]

    def step() -> None:
        samples[0] += len(next(loader))

    cpu = torch.device("cpu")
    _time(step, 0, args.warmup, cpu)
    samples[0] = 0
    seconds = _time(step, args.iters, 0, cpu)
    return (
        f"data: {samples[0] / seconds:.1f} samples/s ({args.iters} batches of "
        f"{samples[0] // args.iters} after {args.warmup} warm-up)"
    )


class _StepTimer(HookBase):
    """Wall time of each training iteration (synchronized on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def before_step(self) -> None:
        _synchronize(self.device)
        self._start = time.perf_counter()

    def after_step(self) -> None:
        _synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)


def benchmark_train(cfg, args: argparse.Namespace) -> str:
    for key in ("dataloader.train", "optimizer"):
        _require(cfg, key, args.config_file)
    model, device, _ = build_model(cfg, load=None)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    clip = cfg.train.get("clip_grad", {})
    amp_cfg = cfg.train.get("amp", {})
    trainer = Trainer(
        model,
        instantiate(cfg.dataloader.train),
        optimizer,
        amp=bool(args.amp) or bool(amp_cfg.get("enabled", False)),
        amp_dtype=AMP_DTYPES[args.amp] if args.amp else amp_cfg.get("dtype", None),
        clip_grad_params=dict(clip.params) if clip.get("enabled", False) else None,
    )
    timer = _StepTimer(device)
    trainer.register_hooks([timer])
    trainer.train(0, args.warmup + args.iters)
    seconds = sum(timer.times[args.warmup :])
    amp = f", amp {args.amp}" if args.amp else ""
    return (
        f"train: {args.iters / seconds:.3f} iterations/s, {seconds / args.iters:.3f} s/iteration "
        f"(batch {cfg.dataloader.train.get('total_batch_size', '?')}, {device}{amp}"
        f"{_memory(device)}, {args.iters} iterations after {args.warmup} warm-up)"
    )


def benchmark_eval(cfg, args: argparse.Namespace) -> str:
    _require(cfg, "dataloader.test", args.config_file)
    model, device, _ = build_model(cfg, load=None)
    model.eval()
    batch_size = args.batch_size or int(cfg.dataloader.test.get("batch_size", 1) or 1)
    # a few images of the test set in memory, regrouped into batches
    loader = instantiate(cfg.dataloader.test)
    records = list(itertools.islice(itertools.chain.from_iterable(loader), 4 * batch_size))
    if not records:
        raise UsageError(f"dataloader.test of {args.config_file} gave no image")
    batches = [
        [records[(i * batch_size + j) % len(records)] for j in range(batch_size)]
        for i in range(max(1, len(records) // batch_size))
    ]
    cycle = itertools.cycle(batches)
    dtype = AMP_DTYPES[args.amp] if args.amp else None
    if dtype == torch.float16 and device.type != "cuda":
        logger.warning("--amp fp16 is not supported on %s; using bf16", device.type)
        dtype = torch.bfloat16

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(next(cycle))

    seconds = _time(step, args.iters, args.warmup, device)
    images = args.iters * batch_size
    amp = f", amp {args.amp}" if args.amp else ""
    return (
        f"eval: {images / seconds:.2f} images/s, {1000 * seconds / images:.1f} ms/image (batch "
        f"{batch_size}, {device}{amp}{_memory(device)}, {args.iters} iterations after "
        f"{args.warmup} warm-up)"
    )


TASKS = {"data": benchmark_data, "train": benchmark_train, "eval": benchmark_eval}


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="detrkit")
    try:
        check_args(args)
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
        summary = TASKS[args.task](cfg, args)
    except (UsageError, ConfigError, CheckpointError, ImageLoadError, FileNotFoundError) as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    logger.info(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
