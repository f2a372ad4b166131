#!/usr/bin/env python
"""Convert released weights into detrkit's (detrex's) state-dict names.

    python tools/convert_weights.py --source official --input r50_deformable_detr-checkpoint.pth \
        --output deformable_detr_r50.pth [--variant NAME] [--keep-all-classes]
    python tools/convert_weights.py --source detrex --input model_final.pth --output out.pth \
        [--variant NAME] [--use-ema]
    python tools/convert_weights.py --source torchvision --input resnet50-0676ba61.pth \
        --output R-50.pth

`official`: checkpoints of the official Deformable-DETR code; keys renamed, the 80 COCO rows of
each 91-way class head kept, the variant detected (single-scale files that do not record
`args.dilation` need `--variant single_scale` or `--variant single_scale_dc5`).
`detrex`: checked (keys, shapes, aliases) and written as `{"model": ...}`; such files also load
without conversion. `torchvision`: an ImageNet ResNet renamed to `backbone.*` (fc dropped), for
`train.init_checkpoint`. The output is `{"model": state_dict}` (`.pth`, or `.safetensors`).

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
        "--source", required=True, choices=registered_sources(), help="input layout"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e} (see --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
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
