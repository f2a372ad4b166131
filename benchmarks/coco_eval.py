"""COCO box evaluation: pycocotools (the reference) vs faster-coco-eval, side by side.

A COCO-val-sized synthetic set (5,000 images, about 7 objects and 300 detections each by default),
both backends on the same detections: prints the seconds of each, the speed ratio and the largest
difference over the 12 summary numbers.

    python benchmarks/coco_eval.py [--images 5000] [--dets 300]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np
from pycocotools.coco import COCO

from detrkit.evaluation.coco import run_cocoeval, summary_stats


def random_coco_set(rng: np.random.Generator, num_images: int, dets_per_image: int):
    """Ground truth with unsorted, non-contiguous category ids, crowd boxes and every area range;
    detections: jittered copies of the objects, wrong classes and pure noise."""
    cat_ids = [7, 2, 11, 5]
    images = [
        {"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"}
        for i in range(1, num_images + 1)
    ]
    annotations, detections = [], []
    for image in images:
        objects = []
        for _ in range(rng.integers(0, 12)):
            w, h = rng.uniform(3, 300), rng.uniform(3, 200)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category = int(rng.choice(cat_ids))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
            objects.append((x, y, w, h, category))
        for k in range(dets_per_image):
            if objects and k < 3 * len(objects):
                x, y, w, h, category = objects[k % len(objects)]
                x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
                w, h = w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)
                if rng.random() < 0.2:
                    category = int(rng.choice(cat_ids))
            else:
                w, h = rng.uniform(3, 300), rng.uniform(3, 200)
                x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
                category = int(rng.choice(cat_ids))
            detections.append(
                {
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    # rounded so that equal scores occur and the tie order is exercised too
                    "score": round(float(rng.random()), 3),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        coco_gt.createIndex()
    return coco_gt, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    coco_gt, detections = random_coco_set(np.random.default_rng(args.seed), args.images, args.dets)
    print(
        f"{args.images} images, {len(coco_gt.dataset['annotations'])} objects, "
        f"{len(detections)} detections, maxDets 100"
    )
    seconds, stats = {}, {}
    for backend in ("pycocotools", "faster_coco_eval"):
        start = time.perf_counter()
        coco_eval = run_cocoeval(coco_gt, detections, 100, backend=backend)
        seconds[backend] = time.perf_counter() - start
        stats[backend] = summary_stats(coco_eval)
    diff = np.abs(stats["pycocotools"] - stats["faster_coco_eval"]).max()
    print("| backend | seconds |\n|---|---:|")
    for backend, s in seconds.items():
        print(f"| {backend} | {s:.1f} |")
    print(
        f"speed-up {seconds['pycocotools'] / seconds['faster_coco_eval']:.1f}x; "
        f"max |difference| over the 12 summary numbers: {diff:.1e}"
    )


if __name__ == "__main__":
    main()
