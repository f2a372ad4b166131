#!/usr/bin/env python
"""Convert released weights into detrkit's (detrex's) state-dict names.

    python tools/convert_weights.py --source official --input r50_deformable_detr-checkpoint.pth \
        --output deformable_detr_r50.pth [--variant NAME] [--keep-all-classes]
    python tools/convert_weights.py --source detrex --input model_final.pth --output out.pth \
        [--variant NAME] [--use-ema]
    python tools/convert_weights.py --source torchvision --input resnet50-0676ba61.pth \
        --output R-50.pth
    python tools/convert_weights.py --source huggingface --input MODEL_DIR --output out.pth \
        [--hf-config config.json]
    python tools/convert_weights.py --to huggingface --input ours.pth --config-file CONFIG \
        --output MODEL_DIR [--hf-backbone timm] [KEY=VALUE ...]

`official`: checkpoints of the official Deformable-DETR code; keys renamed, the 80 COCO rows of
each 91-way class head kept, the variant detected (single-scale files that do not record
`args.dilation` need `--variant single_scale` or `--variant single_scale_dc5`).
`detrex`: checked (keys, shapes, aliases) and written as `{"model": ...}`; such files also load
without conversion. `torchvision`: an ImageNet ResNet renamed to `backbone.*` (fc dropped), for
`train.init_checkpoint`. The output is `{"model": state_dict}` (`.pth`, or `.safetensors`).
`huggingface`: a transformers DeformableDetrForObjectDetection folder (or weights file plus
`--hf-config`); the class names go into the output's `metadata`, and the config overrides the
model needs are printed. `--to huggingface` writes our checkpoint as such a folder.

Errors print one line naming the file and what was expected, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

# `projects.*` (the Deformable-DETR converters) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.checkpoint import CheckpointError
from detrkit.checkpoint.convert import convert_file, registered_sources
from projects.deformable_detr.convert import VARIANTS  # registers official, detrex

PROG = "convert_weights.py"


class UsageError(Exception):
    """A bad command line (argparse's complaint, reported on one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert official Deformable-DETR, detrex or torchvision ResNet weights "
        "into detrkit's state-dict names.",
    )
    parser.add_argument(
        "--source",
        choices=[*registered_sources(), HF_SOURCE],
        help="input layout (or use --to huggingface)",
    )
    parser.add_argument("--input", required=True, help="checkpoint to read")
    parser.add_argument("--output", required=True, help="file to write ({'model': ...})")
    parser.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="the model the file holds (detected from the weights; must agree with them)",
    )
    parser.add_argument(
        "--keep-all-classes",
        action="store_true",
        help="keep every class-head row (a model trained on another dataset) instead of the "
        "80 COCO rows of a 91-way head",
    )
    parser.add_argument(
        "--use-ema", action="store_true", help="--source detrex: export the EMA weights"
    )
    add_huggingface_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers, both directions (projects/deformable_detr/convert/huggingface.py)

HF_SOURCE = "huggingface"


def add_huggingface_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf-config",
        help="--source huggingface: the config.json of a weights file (default: the one beside it)",
    )
    parser.add_argument(
        "--to",
        choices=[HF_SOURCE],
        help="write our checkpoint (--input) as a transformers model folder (--output)",
    )
    parser.add_argument(
        "--config-file", help="--to huggingface: the config file that builds the checkpoint's model"
    )
    parser.add_argument(
        "--hf-backbone",
        choices=["transformers", "timm"],
        default="transformers",
        help="--to huggingface: transformers' ResNet (default) or timm's (needed for DC5)",
    )
    parser.add_argument("opts", nargs="*", help="--to huggingface: config overrides KEY=VALUE")


def huggingface_usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the Hugging Face options on this command line, or None."""
    if args.to is not None and args.source is not None:
        return "give either --source (convert into our names) or --to (write another layout)"
    if args.to is None and args.source is None:
        return "one of --source or --to huggingface is required"
    if args.to is not None and not args.config_file:
        return "--to huggingface needs --config-file (the config that builds the model)"
    if args.to is None and (args.config_file or args.opts):
        return "--config-file and KEY=VALUE overrides apply to --to huggingface"
    if args.hf_config and args.source != HF_SOURCE:
        return "--hf-config applies to --source huggingface"
    if args.source == HF_SOURCE and (args.variant or args.keep_all_classes or args.use_ema):
        return "--variant, --keep-all-classes and --use-ema do not apply to --source huggingface"
    return None


def run_huggingface(args: argparse.Namespace) -> int:
    from projects.deformable_detr.convert.huggingface import (
        convert_huggingface,
        export_checkpoint,
        save_hf_converted,
    )

    if args.to is not None:
        notes = export_checkpoint(
            args.input, args.config_file, args.output, args.opts, backbone=args.hf_backbone
        )
        print("\n".join(notes))
        print(
            "Load it with transformers:\n"
            "  DeformableDetrForObjectDetection.from_pretrained("
            f"{os.path.abspath(args.output)!r})"
        )
        return 0
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        print(f"{PROG}: error: --output {args.output} is the input", file=sys.stderr)
        return 2
    result = convert_huggingface(args.input, args.hf_config)
    save_hf_converted(result, args.output)
    print(
        f"Wrote {len(result.model)} tensors and {len(result.thing_classes)} class names to "
        f"{args.output}"
    )
    for note in result.notes:
        print(f"  {note}")
    overrides = "".join(f" {o}" for o in result.overrides)
    print(
        "Evaluate it with:\n"
        f"  python tools/train_net.py --config-file {result.variant.config} --eval-only "
        f"train.init_checkpoint={os.path.abspath(args.output)}{overrides}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e} (see --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    problem = huggingface_usage_error(args)
    if problem:
        print(f"{PROG}: error: {problem} (see --help)", file=sys.stderr)
        return 2
    if HF_SOURCE in (args.source, args.to):
        try:
            return run_huggingface(args)
        except (CheckpointError, OSError) as e:
            print(f"{PROG}: error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)
            return 2
    try:
        result = convert_file(
            args.source,
            args.input,
            args.output,
            variant=args.variant,
            keep_all_classes=args.keep_all_classes,
            use_ema=args.use_ema,
        )
    except (CheckpointError, OSError) as e:
        message = str(e).replace("\n", " ")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    print(f"Wrote {len(result.model)} tensors to {args.output}")
    for note in result.notes:
        print(f"  {note}")
    output = os.path.abspath(args.output)
    if result.variant is not None:
        variant = result.variant
        print(
            f"Evaluate it (official COCO val2017 AP: {variant.official_ap}) with:\n"
            f"  python tools/train_net.py --config-file {variant.config} --eval-only "
            f"train.init_checkpoint={output}"
        )
    else:
        print(
            "Train from it with:\n"
            "  python tools/train_net.py --config-file "
            f"{VARIANTS['deformable_detr'].config} train.init_checkpoint={output}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
