#!/usr/bin/env python
"""Detect objects in images or a video with a trained model and draw them (detrex's demo).

    python demo/demo.py --config-file CFG.py --input a.jpg photos/ 'more/*.png' \\
        --output out/ train.init_checkpoint=model.pth
    python demo/demo.py --config-file CFG.py --video-input clip.mp4 --output out/ \\
        --opts train.init_checkpoint model.pth

For every image it writes the picture with boxes, class names and scores, and `<name>.json`, the
detections in COCO's results format (`image_id`, `file_name`, `category_id` as in the dataset's
annotations, `bbox` as [x, y, width, height] in pixels, `score`). A video gives the video with
boxes and one json with a list per frame. `--show-sampling-points` adds the paper's Figure 6
for each image: where the last decoder layer samples for the top detections and where the last
encoder layer samples for one pixel.

An input that cannot be read is reported in one line naming it, the others are still processed,
and the exit code is 1 at the end. Config mistakes exit with code 2 before anything runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import time
from typing import Any

import numpy as np

# `projects.*` (model code referenced by the configs) lives beside demo/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detrkit.checkpoint import CheckpointError
from detrkit.config import ConfigError, LazyConfig
from detrkit.data import MetadataCatalog
from detrkit.data.detection_utils import ImageLoadError, read_image
from detrkit.engine import DefaultPredictor
from detrkit.engine.cli import UsageError, check_overrides
from detrkit.evaluation.coco import instances_to_coco_json
from detrkit.utils.logger import setup_logger
from detrkit.utils.visualizer import Visualizer

logger = logging.getLogger("detrkit.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")


# a config override: a dotted key (list indices allowed), '=', a value
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Detect objects in images or a video and draw them.",
        epilog="Config overrides come last, as KEY=VALUE (Hydra grammar), or after --opts as "
        "KEY=VALUE or KEY VALUE pairs, e.g. train.init_checkpoint=output/model_final.pth "
        "train.device=cpu.",
    )
    parser.add_argument("--config-file", metavar="FILE", required=True, help="a LazyConfig .py")
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="image files, folders (their images) or glob patterns such as 'dir/*.jpg'",
    )
    parser.add_argument("--video-input", metavar="FILE", help="a video file (decoded with PyAV)")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="a folder for the pictures and .json files, or a file name when there is one "
        "input; without it the detections are only counted on the console",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="draw and write detections scoring at least T, in [0, 1] (default 0.5)",
    )
    parser.add_argument(
        "--metadata-dataset",
        "--metadata_dataset",
        metavar="NAME",
        help="registered dataset whose class names and category ids to use (default: the "
        "checkpoint's, else dataloader.test's dataset)",
    )
    parser.add_argument(
        "--show-sampling-points",
        action="store_true",
        help="also write <name>_sampling_points.png: the last decoder layer's sampling points "
        "for the top detections and the last encoder layer's for one pixel (paper Fig. 6)",
    )
    parser.add_argument(
        "--sampling-points-top-k",
        type=int,
        default=4,
        metavar="K",
        help="panels of detections in the sampling-point picture (default 4)",
    )
    parser.add_argument(
        "--encoder-pixel",
        type=float,
        nargs=2,
        metavar=("X", "Y"),
        help="pixel (original image coordinates) whose encoder query is drawn (default: the "
        "centre of the top detection, or of the image)",
    )
    parser.add_argument(
        "--encoder-level",
        type=int,
        default=0,
        metavar="L",
        help="feature level of the encoder query (0 = the finest; default 0)",
    )
    parser.add_argument(
        "--decoder-layer",
        type=int,
        default=-1,
        metavar="I",
        help="decoder layer whose cross-attention is drawn (0 = first, -1 = last, the default)",
    )
    parser.add_argument(
        "--encoder-layer",
        type=int,
        default=-1,
        metavar="I",
        help="encoder layer whose self-attention is drawn (0 = first, -1 = last, the default)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides, detrex style: KEY VALUE pairs or KEY=VALUE items (must come last)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (Hydra grammar)"
    )
    return parser


def merge_overrides(overrides: list[str], opts: list[str]) -> list[str]:
    """Trailing KEY=VALUE items plus `--opts` items, where `KEY VALUE` pairs become KEY=VALUE."""
    merged = check_overrides(overrides)
    i = 0
    while i < len(opts):
        item = opts[i]
        if "=" in item:
            merged.append(item)
            i += 1
        elif i + 1 < len(opts):
            merged.append(f"{item}={opts[i + 1]}")
            i += 2
        else:
            raise UsageError(
                f"--opts key {item!r} has no value; accepted: --opts KEY VALUE [KEY VALUE ...] "
                "or KEY=VALUE items"
            )
    return merged


def split_overrides(args: argparse.Namespace) -> None:
    """`--input a.jpg key=value` leaves the override in --input (nargs='+' is greedy): move
    items that look like KEY=VALUE and are not existing files to the overrides."""
    if not args.input:
        return
    inputs = []
    for item in args.input:
        if _OVERRIDE.match(item) and not os.path.exists(item):
            args.overrides.append(item)
        else:
            inputs.append(item)
    args.input = inputs


def check_args(args: argparse.Namespace) -> None:
    if bool(args.input) == bool(args.video_input):
        raise UsageError("give either --input (images) or --video-input (a video), one of the two")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise UsageError(
            f"--confidence-threshold {args.confidence_threshold} is outside [0, 1]; accepted: a "
            "score between 0 and 1"
        )
    if args.show_sampling_points and args.video_input:
        raise UsageError(
            "--show-sampling-points draws pictures of images; accepted with --input, not with "
            "--video-input"
        )
    if args.sampling_points_top_k < 0:
        raise UsageError(
            f"--sampling-points-top-k {args.sampling_points_top_k} is negative; accepted: K >= 0"
        )
    if args.metadata_dataset and args.metadata_dataset not in MetadataCatalog.list():
        raise UsageError(
            f"--metadata-dataset {args.metadata_dataset!r} is not registered; registered: "
            f"{', '.join(sorted(MetadataCatalog.list()))}"
        )


def expand_inputs(patterns: list[str]) -> tuple[list[str], list[str]]:
    """Files named by `patterns` (files, folders, globs), in order and without repeats, and
    one error message per pattern that names nothing."""
    files, errors = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                errors.append(
                    f"folder {pattern} has no image files (accepted extensions: "
                    f"{' '.join(IMAGE_EXTENSIONS)})"
                )
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
            if not found:
                errors.append(f"pattern {pattern!r} matches no file")
        else:
            found = [pattern]  # a missing file is reported when it is read
        files.extend(f for f in found if f not in files)
    return files, errors


def output_paths(output: str | None, inputs: list[str], extension: str | None = None) -> list:
    """Where each input's picture goes: `output/<name>` (a folder), or `output` itself when it
    names a file and there is one input; None without --output. Equal names get a suffix."""
    if not output:
        return [None] * len(inputs)
    is_file = os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    if is_file and not os.path.isdir(output):
        if len(inputs) != 1:
            raise UsageError(
                f"--output {output} is a file name but there are {len(inputs)} inputs; accepted: "
                "a folder for several inputs"
            )
        parent = os.path.dirname(output)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return [output]
    os.makedirs(output, exist_ok=True)
    paths, used = [], set()
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        ext = extension or (ext if ext.lower() in IMAGE_EXTENSIONS else ".png")
        name, n = f"{stem}{ext}", 1
        while name in used:
            name, n = f"{stem}_{n}{ext}", n + 1
        used.add(name)
        paths.append(os.path.join(output, name))
    return paths


def detections_json(
    instances: Any, image_id: int, file_name: str, metadata: Any, threshold: float
) -> list[dict]:
    """COCO results entries (with `file_name`) of the detections scoring >= threshold; category
    ids are the dataset's own ids when its metadata maps them, else the class indices."""
    keep = instances[instances.scores >= threshold] if len(instances) else instances
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None) or {}
    to_dataset = {int(v): int(k) for k, v in id_map.items()}
    results = instances_to_coco_json(keep, image_id)
    for result in results:
        result["category_id"] = to_dataset.get(result["category_id"], result["category_id"])
        result["file_name"] = file_name
    return results


def _to_rgb(image: np.ndarray, input_format: str) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1]) if input_format == "BGR" else image


def _encoder_pixel(args: argparse.Namespace, instances: Any, image: np.ndarray) -> tuple:
    """--encoder-pixel, else the centre of the top detection (inside the image), else the
    image's centre."""
    if args.encoder_pixel is not None:
        return tuple(args.encoder_pixel)
    height, width = image.shape[:2]
    if len(instances):
        x0, y0, x1, y1 = instances.pred_boxes.tensor[int(instances.scores.argmax())].tolist()
        return (min((x0 + x1) / 2, width - 1.0), min((y0 + y1) / 2, height - 1.0))
    return (width / 2, height / 2)


def write_sampling_points(
    predictor: DefaultPredictor,
    image: np.ndarray,
    instances: Any,
    path: str,
    args: argparse.Namespace,
) -> None:
    """The Figure 6 picture of one image whose detections are `instances` (they choose the
    default encoder pixel: the centre of the top detection)."""
    from PIL import Image

    from projects.deformable_detr.sampling_points import (
        collect_sampling_points,
        sampling_points_figure,
    )

    result = collect_sampling_points(
        predictor,
        image,
        top_k=args.sampling_points_top_k,
        score_threshold=args.confidence_threshold,
        encoder_pixel=_encoder_pixel(args, instances, image),
        encoder_level=args.encoder_level,
        decoder_layer=args.decoder_layer,
        encoder_layer=args.encoder_layer,
    )
    figure = sampling_points_figure(_to_rgb(image, predictor.input_format), result)
    Image.fromarray(figure).save(path)


def run_images(predictor: DefaultPredictor, args: argparse.Namespace) -> list[str]:
    """Predict, draw and write every input image; returns the error lines."""
    from tqdm import tqdm

    files, errors = expand_inputs(args.input)
    for message in errors:
        tqdm.write(f"demo.py: error: {message}", file=sys.stderr)
    outputs = output_paths(args.output, files)
    progress = tqdm(list(zip(files, outputs)), disable=len(files) < 2, unit="image")
    for image_id, (file_name, out_path) in enumerate(progress):
        try:
            image = read_image(file_name, format=predictor.input_format)
        except ImageLoadError as e:
            errors.append(str(e))
            tqdm.write(f"demo.py: error: {e}", file=sys.stderr)
            continue
        start = time.perf_counter()
        instances = predictor(image)["instances"].to("cpu")
        kept = int((instances.scores >= args.confidence_threshold).sum()) if len(instances) else 0
        seconds = time.perf_counter() - start
        # one line per image, printed above the progress bar (tqdm.write keeps the bar intact)
        tqdm.write(
            f"{file_name}: {kept} detections >= {args.confidence_threshold:g} in {seconds:.2f} s"
        )
        if out_path is None:
            continue
        vis = Visualizer(_to_rgb(image, predictor.input_format), predictor.metadata)
        vis.draw_instance_predictions(instances, args.confidence_threshold).save(out_path)
        entries = detections_json(
            instances, image_id, file_name, predictor.metadata, args.confidence_threshold
        )
        with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
            json.dump(entries, f, indent=1)
        if args.show_sampling_points:
            stem = os.path.splitext(out_path)[0]
            path = f"{stem}_sampling_points.png"
            try:
                write_sampling_points(predictor, image, instances, path, args)
            except ValueError as e:  # --encoder-pixel or --encoder-level outside this image
                errors.append(f"{file_name}: {e}")
                tqdm.write(f"demo.py: error: {file_name}: {e}", file=sys.stderr)
    return errors


def _import_av():
    try:
        import av
    except ImportError:
        raise UsageError(
            "--video-input needs PyAV (the 'av' package), which is not installed; install it "
            "with: pip install av"
        ) from None
    return av


def run_video(predictor: DefaultPredictor, args: argparse.Namespace) -> list[str]:
    """Predict on every frame; write the video with boxes and `<name>.json` (a list per frame
    of COCO results entries, `image_id` = frame index). Returns the error lines."""
    from tqdm import tqdm

    av = _import_av()
    path = args.video_input
    try:
        container = av.open(path)
        stream = container.streams.video[0]
    except (OSError, av.FFmpegError, IndexError) as e:
        message = f"video {path} could not be opened as a video ({e})"
        tqdm.write(f"demo.py: error: {message}", file=sys.stderr)
        return [message]
    out_path = output_paths(args.output, [path], extension=".mp4")[0]
    writer = out_stream = None
    frames_json: list[list[dict]] = []
    errors: list[str] = []
    total = stream.frames or None
    try:
        for index, frame in enumerate(tqdm(container.decode(stream), total=total, unit="frame")):
            rgb = frame.to_ndarray(format="rgb24")
            image = rgb[:, :, ::-1].copy() if predictor.input_format == "BGR" else rgb
            instances = predictor(image)["instances"].to("cpu")
            frames_json.append(
                detections_json(
                    instances,
                    index,
                    f"{path}#{index}",
                    predictor.metadata,
                    args.confidence_threshold,
                )
            )
            if out_path is None:
                continue
            vis = Visualizer(rgb, predictor.metadata)
            drawn = vis.draw_instance_predictions(instances, args.confidence_threshold).get_image()
            if writer is None:
                writer, out_stream = _open_video_writer(av, out_path, drawn.shape, stream)
            # yuv420p needs even sides: drop a last odd row/column
            even = drawn[: out_stream.height, : out_stream.width]
            for packet in out_stream.encode(av.VideoFrame.from_ndarray(even, format="rgb24")):
                writer.mux(packet)
    except av.FFmpegError as e:
        message = f"video {path}: decoding stopped at frame {len(frames_json)} ({e})"
        errors.append(message)
        tqdm.write(f"demo.py: error: {message}", file=sys.stderr)
    finally:
        if writer is not None:
            for packet in out_stream.encode():
                writer.mux(packet)
            writer.close()
        container.close()
    if out_path is not None:
        with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
            json.dump(frames_json, f)
    logger.info("%s: %d frames", path, len(frames_json))
    return errors


def _open_video_writer(av, path: str, shape: tuple, source_stream):
    writer = av.open(path, "w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = source_stream.average_rate or 25
    stream = writer.add_stream(codec, rate=rate)
    stream.height, stream.width = shape[0] // 2 * 2, shape[1] // 2 * 2
    stream.pix_fmt = "yuv420p"
    return writer, stream


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="detrkit")
    try:
        split_overrides(args)
        check_args(args)
        overrides = merge_overrides(args.overrides, args.opts)
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), overrides)
        if args.video_input:
            _import_av()
        predictor = DefaultPredictor(cfg)
    except (UsageError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    if args.metadata_dataset:
        predictor.metadata = MetadataCatalog.get(args.metadata_dataset)
    try:
        errors = run_video(predictor, args) if args.video_input else run_images(predictor, args)
    except UsageError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    if errors:
        print(f"demo.py: {len(errors)} input(s) failed (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
