"""bfloat16 autocast against float32 on a trained model, image by image.

For each image, the detections of the bf16 fast path (the default eval model under CPU or CUDA
autocast) are compared with those of the plain float32 computation
(`model.set_fast_inference(False)`): how many of the bf16 top-100 have a float32 top-100
detection of the same class with every box coordinate within 1 px, and the highest bf16 score
among those that have none (the detections that move are the low-scoring ones).

    python benchmarks/bf16_check.py --config-file projects/deformable_detr/configs/shapes_tiny.py \\
        --weights output/shapes_tiny/model_final.pth --images "datasets/shapes/val/*.jpg"

Random-weight R-50 models: `benchmarks/inference.py --dtypes bf16 --check`.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys

import torch

from detrkit.config import LazyConfig
from detrkit.data.detection_utils import read_image
from detrkit.engine.defaults import DefaultPredictor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling inference.py
from inference import match_detections


def agreement(bf16, fp32, top: int = 100) -> tuple[int, int, float]:
    """(matched, compared, highest score of an unmatched bf16 detection or 0), matched as
    `benchmarks/inference.py` matches (same class, every box coordinate within 1 px)."""
    matched, _, _ = match_detections(bf16, fp32, top)
    unmatched_scores = bf16.scores[:top].float()[~matched]
    worst = unmatched_scores.max().item() if len(unmatched_scores) else 0.0
    return int(matched.sum()), len(matched), worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", required=True, metavar="FILE", help="a detrkit checkpoint")
    parser.add_argument("--images", required=True, help="a glob of image files")
    parser.add_argument("--count", type=int, default=20, help="first N images of the glob")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    files = sorted(glob.glob(args.images))[: args.count]
    if not files:
        raise SystemExit(f"--images {args.images!r} matches no file")
    if not os.path.isfile(args.weights):
        raise SystemExit(f"--weights {args.weights!r}: no such file (a detrkit checkpoint)")
    cfg = LazyConfig.load(args.config_file)
    cfg.train.init_checkpoint = args.weights
    cfg.train.device = args.device
    predictor = DefaultPredictor(cfg)
    model = predictor.model
    device_type = torch.device(args.device).type

    counts = []
    for file_name in files:
        image = read_image(file_name, format=predictor.input_format)
        model.set_fast_inference(False)
        with torch.inference_mode():
            fp32 = predictor(image)["instances"]
        model.set_fast_inference(True)
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16):
            bf16 = predictor(image)["instances"]
        matched, compared, worst = agreement(bf16, fp32)
        counts.append(matched)
        print(
            f"{file_name}: {matched}/{compared} matched (same class, box within 1 px); "
            f"highest score of an unmatched one {worst:.3f}"
        )
    print(
        f"{len(files)} images: matched min {min(counts)}, median {statistics.median(counts)}, "
        f"max {max(counts)} of the top 100"
    )


if __name__ == "__main__":
    main()
