"""Latency of the exported multi-scale Deformable DETR (ResNet-50, random weights) on the CPU.

One 800 x 1066 image (what the test-time resize makes of a 480 x 640 COCO image), side by side:
PyTorch eager (`DeformableDETR.detect`, the C++ attention kernel), the torch.export program,
the AOTInductor package (compiled here for this fixed size; compile time printed apart), and
onnxruntime (CPU provider) with the deformable attention in each ONNX form (gather and
grid_sample). Each is warmed up once, then timed `--repeats` times (median); all use the same
thread count. The last columns give each artifact's largest differences from eager.

    python benchmarks/export.py                  # all five
    python benchmarks/export.py --skip aoti      # without the (slow) AOTInductor compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.config import LazyConfig, instantiate
from detrkit.export import (
    ExportableDetector,
    compare_detections,
    compile_aoti,
    export_onnx,
    export_program,
    load_runner,
)

CONFIG = "projects/deformable_detr/configs/deformable_detr_r50_50ep.py"
ROWS = ("eager", "torch_export", "aoti", "onnx_gather", "onnx_grid_sample")


def timed(run, images: np.ndarray, repeats: int) -> tuple[float, tuple]:
    outputs = run(images)  # warm-up (also the outputs compared)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip", nargs="*", default=[], choices=ROWS, help="rows to leave out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = LazyConfig.load(os.path.join(os.path.dirname(__file__), "..", CONFIG))
    model = instantiate(cfg.model).eval()
    detector = ExportableDetector(model)
    images = torch.randint(0, 256, (1, 3, *args.size), dtype=torch.uint8)
    print(
        f"multi-scale Deformable DETR R-50, random weights, input {tuple(images.shape)}, "
        f"{args.threads} threads, median of {args.repeats}"
    )

    def eager(array: np.ndarray) -> tuple:
        with torch.no_grad():
            return tuple(t.numpy() for t in detector(torch.from_numpy(array)))

    results: dict[str, tuple[float, tuple]] = {}
    results["eager"] = timed(eager, images.numpy(), args.repeats)
    start = time.perf_counter()
    program = export_program(detector, images)
    print(f"torch.export: {time.perf_counter() - start:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        if "torch_export" not in args.skip:
            path = os.path.join(tmp, "model.pt2")
            torch.export.save(program, path)
            results["torch_export"] = timed(
                load_runner("torch_export", path), images.numpy(), args.repeats
            )
        if "aoti" not in args.skip:
            start = time.perf_counter()
            path = compile_aoti(program, os.path.join(tmp, "model_aoti.pt2"))
            print(f"AOTInductor compile: {time.perf_counter() - start:.0f} s")
            results["aoti"] = timed(load_runner("aoti", path), images.numpy(), args.repeats)
        for form in ("gather", "grid_sample"):
            if f"onnx_{form}" in args.skip:
                continue
            path = export_onnx(program, os.path.join(tmp, f"model_{form}.onnx"), attention=form)
            run = load_runner("onnx", path, num_threads=args.threads)
            results[f"onnx_{form}"] = timed(run, images.numpy(), args.repeats)

    base = results["eager"][0]
    print(f"{'runtime':<18}{'latency ms':>12}{'vs eager':>10}{'score diff':>12}{'box diff px':>13}")
    for name in ROWS:
        if name not in results:
            continue
        latency, outputs = results[name]
        diff = compare_detections(results["eager"][1], outputs)
        print(
            f"{name:<18}{latency * 1000:>12.0f}{base / latency:>9.2f}x"
            f"{diff.max_score:>12.2g}{diff.max_box:>13.2g}"
        )


if __name__ == "__main__":
    main()
