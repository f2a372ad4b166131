#!/usr/bin/env python
"""Count a model's parameters, FLOPs and activations, or print its structure (detectron2's
tools/analyze_model.py).

    python tools/analyze_model.py --config-file CFG.py --tasks flop --num-inputs 100
    python tools/analyze_model.py --config-file CFG.py --tasks flop --input-shape 800 1199
    python tools/analyze_model.py --config-file CFG.py --tasks parameter activation structure

FLOPs and activations are averaged over the first `--num-inputs` images of `dataloader.test`
(resized by its mapper, as the paper counts over the first 100 COCO val images), or counted on
one random image of `--input-shape H W` (the network input size; no resize) when given. One
multiply-add counts as one flop; deformable attention and scaled dot-product attention have
their own counters (detrkit.utils.analysis). The weights are `train.init_checkpoint` when that
file exists, else the initialization (the counts do not depend on them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections import Counter

import numpy as np
import torch

# `projects.*` (model code referenced by the configs) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fvcore.nn import flop_count_table, parameter_count_table

from detrkit.checkpoint import CheckpointError
from detrkit.config import ConfigError, LazyConfig, instantiate
from detrkit.data.detection_utils import ImageLoadError
from detrkit.engine.cli import UsageError, check_overrides
from detrkit.engine.defaults import build_model
from detrkit.utils.analysis import (
    ActivationCountAnalysis,
    FlopCountAnalysis,
    InferenceWrapper,
)
from detrkit.utils.logger import setup_logger

logger = logging.getLogger("detrkit.analyze_model")

TASKS = ("parameter", "flop", "activation", "structure")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Count a model's parameters, FLOPs and activations, or print its structure.",
        epilog="Config overrides come last as KEY=VALUE, e.g. train.device=cpu.",
    )
    parser.add_argument("--config-file", metavar="FILE", required=True, help="a LazyConfig .py")
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="one or more of: parameter (count per module), flop (per module and per operator), "
        "activation (output elements of convolutions, matrix products and attention), "
        "structure (the module tree)",
    )
    parser.add_argument(
        "-n",
        "--num-inputs",
        type=int,
        default=100,
        metavar="N",
        help="images of dataloader.test to average flop/activation counts over (default 100)",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="count on one random image of this network-input size instead of the test set",
    )
    parser.add_argument(
        "--max-depth",
        type=int,
        default=4,
        metavar="D",
        help="depth of the module tables (default 4)",
    )
    parser.add_argument(
        "--count-elementwise",
        action="store_true",
        help="also count element-wise operators (add, mul, sigmoid, softmax, ...) at one flop "
        "per output element; off by default, as in the paper's FLOPs",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="config overrides"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    # `--tasks flop train.device=cpu`: the greedy --tasks took the overrides too
    overrides = [task for task in args.tasks if "=" in task]
    args.tasks = [task for task in args.tasks if "=" not in task]
    args.opts = overrides + list(args.opts)
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown or not args.tasks:
        raise UsageError(
            f"--tasks {' '.join(unknown) or '(none)'}: unknown; accepted: {' '.join(TASKS)}"
        )
    if args.num_inputs < 1:
        raise UsageError(f"--num-inputs {args.num_inputs} is not positive; accepted: N >= 1")
    if args.input_shape is not None and min(args.input_shape) < 32:
        raise UsageError(
            f"--input-shape {args.input_shape[0]} {args.input_shape[1]} is too small; accepted: "
            "H and W >= 32 (the backbone downsamples by 32)"
        )
    if args.max_depth < 1:
        raise UsageError(f"--max-depth {args.max_depth} is not positive; accepted: D >= 1")
    check_overrides(args.opts)


def input_images(cfg, args: argparse.Namespace, device: torch.device):
    """(3, H, W) image tensors: one random image of --input-shape, or the first --num-inputs
    images of the test set after its mapper."""
    if args.input_shape is not None:
        height, width = args.input_shape
        generator = torch.Generator().manual_seed(0)
        yield torch.randint(0, 256, (3, height, width), generator=generator).float().to(device)
        return
    if "dataloader" not in cfg or "test" not in cfg.dataloader:
        raise UsageError(
            f"config {args.config_file} has no dataloader.test; pass --input-shape H W to count "
            "on a random image"
        )
    try:
        loader = instantiate(cfg.dataloader.test)
        for index, batch in enumerate(loader):
            if index >= args.num_inputs:
                return
            for record in batch:
                yield record["image"].float().to(device)
    except (FileNotFoundError, ImageLoadError, KeyError) as e:
        raise UsageError(f"{e}; or pass --input-shape H W to count on a random image") from None


def do_flop(model, images, args: argparse.Namespace) -> str:
    """The per-module table of the first input, GFLOPs per operator and the total, averaged
    over the inputs."""
    wrapper = InferenceWrapper(model)
    by_operator: Counter = Counter()
    totals, first, shapes = [], None, []
    for index, image in enumerate(images):
        analysis = FlopCountAnalysis(wrapper, (image,), args.count_elementwise)
        # modules reached through their weights (query_embedding, MultiheadAttention.out_proj)
        # or not at all in eval (the criterion) would be listed as never called
        analysis.uncalled_modules_warnings(False)
        if index > 0:
            analysis.unsupported_ops_warnings(False)
        with torch.no_grad():
            totals.append(analysis.total())
        by_operator.update(analysis.by_operator())
        shapes.append(tuple(image.shape[-2:]))
        first = first or analysis
    count = len(totals)
    lines = [f"Flops table of the first input ({shapes[0][0]}x{shapes[0][1]}):"]
    lines.append(flop_count_table(first, max_depth=args.max_depth))
    lines.append(f"Average GFlops per operator over {count} input(s):")
    lines += [f"  {op:<45s} {flops / count / 1e9:10.3f}" for op, flops in by_operator.most_common()]
    mean_h, mean_w = np.mean([s[0] for s in shapes]), np.mean([s[1] for s in shapes])
    lines.append(
        f"Total GFlops: {np.mean(totals) / 1e9:.4g}±{np.std(totals) / 1e9:.2g} over {count} "
        f"input(s) of mean size {mean_h:.0f}x{mean_w:.0f}"
    )
    return "\n".join(lines)


def do_activation(model, images, args: argparse.Namespace) -> str:
    wrapper = InferenceWrapper(model)
    totals, first = [], None
    for image in images:
        # only convolutions, matrix products and attention produce counted activations
        analysis = ActivationCountAnalysis(wrapper, (image,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            totals.append(analysis.total())
        first = first or analysis
    table = flop_count_table(first, max_depth=args.max_depth).replace("#flops", "#activations")
    return (
        f"Activations table of the first input:\n{table}\nTotal activations (M): "
        f"{np.mean(totals) / 1e6:.3g}±{np.std(totals) / 1e6:.2g} over {len(totals)} input(s)"
    )


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="detrkit")
    setup_logger(name="fvcore")
    # jit.trace warns about every Python-side branch of the detector; the counts are exact for
    # the traced input, which is what is reported
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    try:
        check_args(args)
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
        model, device, _ = build_model(cfg, load=None)
        model.eval()
        if hasattr(model, "set_fast_inference"):
            # count the model's own operations: fvcore traces neither the fused oneDNN calls of
            # the eval fast path nor its cached tensors
            model.set_fast_inference(False)
        for task in args.tasks:
            if task == "parameter":
                table = parameter_count_table(model, max_depth=args.max_depth)
                report = f"Parameter count:\n{table}"
            elif task == "structure":
                report = f"Model structure:\n{model}"
            elif task == "flop":
                report = do_flop(model, input_images(cfg, args, device), args)
            else:
                report = do_activation(model, input_images(cfg, args, device), args)
            print(report, flush=True)
    except (UsageError, ConfigError, CheckpointError) as e:
        print(f"analyze_model.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
