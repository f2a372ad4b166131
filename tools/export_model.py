#!/usr/bin/env python
"""Export a trained detector for deployment: ONNX (onnxruntime), torch.export, AOTInductor.

    python tools/export_model.py --config-file CFG.py --format onnx|torch_export|aoti \
        --output DIR [--sample-image IMG | --sample-size H W] [--batch-size N] [--dynamic] \
        [--verify/--no-verify] [--onnx-attention gather|grid_sample] [--random-weights] \
        [key=value ...]

The model is the config's `model` with the weights of `train.init_checkpoint`. Every artifact
takes `images` (N, 3, H, W) uint8 RGB, already resized to the network input size
(normalization is inside, resizing is not) and returns `boxes` (N, K, 4) xyxy in the input's
pixels, `scores` (N, K), `labels` (N, K) int64, K the config's
`model.select_box_nums_for_evaluation`; see docs/deploy.md. Without `--dynamic` the graph is
fixed to the sample's size and batch; with it, batch, height and width are free.

`--verify` (the default) runs the PyTorch model and the artifact on the sample (and, with
`--dynamic`, on a second batch of another size and count), prints the largest differences and
exits with status 1 when scores differ by more than 1e-4, boxes by more than 1e-2 px, or labels
differ.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

# `projects.*` (model code referenced by the configs) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.checkpoint import CheckpointError, CheckpointNotFoundError, DetectionCheckpointer
from detrkit.config import ConfigError, LazyConfig, instantiate
from detrkit.data.detection_utils import ImageLoadError, read_image
from detrkit.export import (
    DEFAULT_ONNX_ATTENTION,
    EXPORT_FORMATS,
    ONNX_ATTENTION_FORMS,
    ExportableDetector,
    artifact_path,
    check_onnx,
    compare_detections,
    compile_aoti,
    dynamic_ranges,
    export_onnx,
    export_program,
    load_runner,
)

logger = logging.getLogger("detrkit.export_model")


class ExportInputError(ValueError):
    """A command-line input that cannot be exported; the message names it."""


# errors whose message names the config key, file, checkpoint or image at fault
USER_ERRORS = (ConfigError, CheckpointError, ImageLoadError, ExportInputError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="lazy config (.py)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the artifact")
    parser.add_argument(
        "--sample-image", metavar="IMG", help="image traced and verified (used at its own size)"
    )
    parser.add_argument(
        "--sample-size",
        nargs=2,
        type=int,
        default=(480, 640),
        metavar=("H", "W"),
        help="size of the random sample image when --sample-image is not given",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images in the sample batch")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, height, width")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare the artifact with the PyTorch model (default: on)",
    )
    parser.add_argument(
        "--onnx-attention",
        choices=ONNX_ATTENTION_FORMS,
        default=DEFAULT_ONNX_ATTENTION,
        help="ONNX form of the deformable attention: gather (Gather + MatMul only, runs on any "
        "runtime) or grid_sample (GridSample per level); default %(default)s, the faster on "
        "onnxruntime CPU",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="export the config's initialization when train.init_checkpoint is empty",
    )
    parser.add_argument("--device", default="cpu", help="device of the model (aoti: cpu or cuda)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: expected a positive integer, got {args.batch_size}")
    if min(args.sample_size) < 1:
        parser.error(f"argument --sample-size: expected positive H W, got {args.sample_size}")
    return args


def check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportInputError(f"--output {path} is a file, not a folder")
    os.makedirs(path, exist_ok=True)


def load_config(args: argparse.Namespace):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts or [])
    for key in ("model", "train"):
        if key not in cfg:
            raise ConfigError(f"config file {args.config_file} has no key '{key}'")
    return cfg


def build_model(cfg, args: argparse.Namespace) -> torch.nn.Module:
    """The eval model with the weights of train.init_checkpoint (checked before building)."""
    checkpoint = cfg.train.get("init_checkpoint", "") or ""
    if not checkpoint and not args.random_weights:
        raise ExportInputError(
            f"config {args.config_file}: train.init_checkpoint is empty; set "
            "train.init_checkpoint=/path/to/model.pth (or pass --random-weights to export the "
            "untrained model)"
        )
    if checkpoint and not os.path.isfile(checkpoint):
        raise CheckpointNotFoundError(
            f"train.init_checkpoint {checkpoint} does not exist (config {args.config_file})"
        )
    model = instantiate(cfg.model)
    if checkpoint:
        DetectionCheckpointer(model).load(checkpoint)
    return model.to(args.device).eval()


def sample_batch(args: argparse.Namespace) -> torch.Tensor:
    """(batch, 3, H, W) uint8: the sample image repeated, or random pixels."""
    if args.sample_image:
        image = torch.from_numpy(np.ascontiguousarray(read_image(args.sample_image, "RGB")))
        image = image.permute(2, 0, 1)
    else:
        image = torch.randint(0, 256, (3, *args.sample_size), dtype=torch.uint8)
    return image[None].expand(args.batch_size, -1, -1, -1).contiguous()


def verification_batches(sample: torch.Tensor, dynamic: bool) -> list[torch.Tensor]:
    """The sample; with --dynamic also one more image, cropped to 7/8 of the size."""
    batches = [sample]
    if dynamic:
        height, width = sample.shape[-2:]
        crop = sample[:, :, : max(height * 7 // 8, 1), : max(width * 7 // 8, 1)]
        batches.append(torch.cat([crop, crop.flip(-1)[:1]]).contiguous())
    return batches


def pytorch_detections(model: torch.nn.Module, images: torch.Tensor) -> tuple:
    """The reference: the model's own eval forward, image by image."""
    boxes, scores, labels = [], [], []
    with torch.no_grad():
        for image in images:
            instances = model([{"image": image}])[0]["instances"]
            boxes.append(instances.pred_boxes.tensor.cpu().numpy())
            scores.append(instances.scores.cpu().numpy())
            labels.append(instances.pred_classes.cpu().numpy())
    return np.stack(boxes), np.stack(scores), np.stack(labels)


def verify(model, fmt: str, path: str, batches: list[torch.Tensor], device: str) -> bool:
    runner = load_runner(fmt, path, device=device)
    ok = True
    for images in batches:
        reference = pytorch_detections(model, images.to(device))
        exported = runner(images.numpy())
        diff = compare_detections(reference, exported)
        passed = diff.ok()
        ok &= passed
        print(
            f"verify {fmt} on {tuple(images.shape)}: {diff} -> "
            f"{'OK' if passed else 'FAILED (tolerance: scores 1e-4, boxes 1e-2 px, labels equal)'}"
        )
    return ok


def export(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    cfg = load_config(args)
    sample = sample_batch(args)
    model = build_model(cfg, args)
    detector = ExportableDetector(model)
    path = artifact_path(args.output, args.format)

    start = time.perf_counter()
    program = export_program(detector, sample.to(args.device), dynamic=args.dynamic)
    if args.dynamic:
        print(f"dynamic sizes and their valid ranges: {dynamic_ranges(program)}")
    if args.format == "torch_export":
        torch.export.save(program, path)
    elif args.format == "onnx":
        export_onnx(program, path, attention=args.onnx_attention)
        check_onnx(path)
        print(f"onnx.checker: {path} is valid")
    else:
        compile_aoti(program, path)
    print(
        f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    if not args.verify:
        return 0
    batches = verification_batches(sample, args.dynamic)
    return 0 if verify(model, args.format, path, batches, args.device) else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return export(args)
    except USER_ERRORS as e:
        print(f"export_model.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
