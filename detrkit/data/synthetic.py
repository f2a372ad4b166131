"""A generated COCO-format dataset of coloured shapes: detrkit's embedded default dataset.

`generate_shapes_dataset(root, split, num_images, ...)` writes `root/<split>/<split>_000001.jpg...`
and `root/annotations/<split>.json`, deterministically from `seed` (same arguments -> same bytes).
Each image has a textured background (flat, noise, gradient or stripes) and 0..`max_objects`
solid shapes of the classes `SHAPE_CLASSES`, of various sizes and colours, placed so that their
boxes do not overlap; some are cut by the image border. Every box is the exact tight box of the
shape's visible pixels (`[x0, y0, w, h]` with x1 = last column + 1), and `area` is its pixel count.

`register_shapes()` registers `shapes_train` / `shapes_val` under `$DETRKIT_DATASETS/shapes`; the
files are generated on first use (under a file lock, written to a temporary folder and renamed
into place, so several processes starting together are safe) and regenerated when the requested
parameters differ from those recorded in the json.

Defaults: images of 128..192 px per side, 0..6 objects (10% of images empty), objects 12..64 px,
4 classes, JPEG quality 92; `shapes_train` 512 images, `shapes_val` 128. Generating the default
train+val takes about a second on one core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .builtin import datasets_root
from .catalog import DatasetCatalog, MetadataCatalog

logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES_DEFAULTS",
    "SHAPE_CLASSES",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "register_shapes",
    "render_shape_mask",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("flat", "noise", "gradient", "stripes")

SHAPES_DEFAULTS: dict[str, Any] = {
    "image_size": ((128, 192), (128, 192)),
    "max_objects": 6,
    "empty_fraction": 0.1,
    "object_size": (12, 64),
    "border_fraction": 0.15,
    "backgrounds": BACKGROUNDS,
    "image_format": "jpg",
    "jpeg_quality": 92,
    "seed": 0,
}
# number of images of the builtin splits
SHAPES_SPLITS = {"shapes_train": ("train", 512), "shapes_val": ("val", 128)}

_VERSION = 1  # bump when the drawing changes, so cached datasets are regenerated


def render_shape_mask(shape: str, size: int, flip: bool = False) -> np.ndarray:
    """Boolean (size, size) mask of a shape drawn in a size x size patch (pixel centres tested)."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "circle":
        mask = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "triangle":  # apex at the top centre, base along the bottom
        mask = (y >= 2 * np.abs(x - 0.5)) & (y <= 1.0)
        if flip:
            mask = mask[::-1]
    elif shape == "cross":
        arm = 1.0 / 6.0
        mask = (np.abs(x - 0.5) <= arm) | (np.abs(y - 0.5) <= arm)
    else:
        raise ValueError(f"Unknown shape {shape!r}; known: {', '.join(SHAPE_CLASSES)}")
    return np.ascontiguousarray(mask)


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8"))])


def _sample_range(rng: np.random.Generator, value: Any) -> int:
    if isinstance(value, (int, np.integer)):
        return int(value)
    low, high = value
    return int(rng.integers(int(low), int(high) + 1))


def _parse_image_size(image_size: Any) -> tuple[Any, Any]:
    """int -> square; (h, w) -> fixed; ((hmin, hmax), (wmin, wmax)) -> random per image."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    if len(image_size) != 2:
        raise ValueError(
            f"image_size must be an int, (h, w) or ((hmin, hmax), (wmin, wmax)), got {image_size!r}"
        )

    def side(value: Any) -> Any:
        return int(value) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)

    return side(image_size[0]), side(image_size[1])


def _background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    base = rng.integers(0, 256, size=3).astype(np.float32)
    if kind == "flat":
        return np.broadcast_to(base, (h, w, 3)).copy()
    other = rng.integers(0, 256, size=3).astype(np.float32)
    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
    )
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "noise":
        image = base + rng.normal(0, 25, size=(h, w, 3)).astype(np.float32)
    elif kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        image = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "stripes":
        period = rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period)
        image = base * (1 - t[..., None]) + other * t[..., None]
    else:
        raise ValueError(f"Unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    if kind != "noise":
        image = image + rng.normal(0, 4, size=(h, w, 3)).astype(np.float32)
    return np.clip(image, 0, 255)


def _pick_colour(
    rng: np.random.Generator, background: np.ndarray, used: list[tuple[int, ...]]
) -> tuple[int, int, int]:
    """A colour far from the background under the shape and different from the image's others."""
    reference = background.reshape(-1, 3).mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(20):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if colour in used:
            continue
        distance = float(np.abs(np.asarray(colour) - reference).sum())
        if distance >= 180:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    if best is None:  # 20 draws all equal to used colours: practically impossible
        best = tuple(int(v) for v in (255 - reference).astype(int))
    return best


def _boxes_overlap(a: Sequence[int], b: Sequence[int], margin: int) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def _draw_image(
    rng: np.random.Generator,
    h: int,
    w: int,
    params: dict[str, Any],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    kind = params["backgrounds"][int(rng.integers(len(params["backgrounds"])))]
    image = _background(rng, kind, h, w)
    objects: list[dict[str, Any]] = []
    if rng.random() < params["empty_fraction"]:
        num_objects = 0
    else:
        num_objects = int(rng.integers(1, params["max_objects"] + 1))
    size_low, size_high = params["object_size"]
    size_high = min(size_high, h, w)
    size_low = min(size_low, size_high)
    used_colours: list[tuple[int, ...]] = []
    for _ in range(num_objects):
        for _attempt in range(30):
            label = int(rng.integers(len(SHAPE_CLASSES)))
            size = round(math.exp(rng.uniform(math.log(size_low), math.log(size_high))))
            mask = render_shape_mask(SHAPE_CLASSES[label], size, flip=bool(rng.random() < 0.3))
            if rng.random() < params["border_fraction"]:  # may stick out of the image by <= 45%
                lo_x, hi_x = -int(0.45 * size), w - int(0.55 * size)
                lo_y, hi_y = -int(0.45 * size), h - int(0.55 * size)
            else:
                lo_x, hi_x, lo_y, hi_y = 0, w - size, 0, h - size
            x0 = int(rng.integers(lo_x, max(hi_x, lo_x) + 1))
            y0 = int(rng.integers(lo_y, max(hi_y, lo_y) + 1))
            # the part of the patch inside the image
            ix0, iy0 = max(x0, 0), max(y0, 0)
            ix1, iy1 = min(x0 + size, w), min(y0 + size, h)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            visible = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            count = int(visible.sum())
            if count < 0.5 * mask.sum() or count < 12:
                continue
            rows = np.flatnonzero(visible.any(axis=1))
            cols = np.flatnonzero(visible.any(axis=0))
            box = (
                ix0 + int(cols[0]),
                iy0 + int(rows[0]),
                ix0 + int(cols[-1]) + 1,
                iy0 + int(rows[-1]) + 1,
            )
            if box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            if any(_boxes_overlap(box, o["box"], margin=2) for o in objects):
                continue
            region = image[iy0:iy1, ix0:ix1]
            colour = _pick_colour(rng, region, used_colours)
            used_colours.append(colour)
            region[visible] = colour
            objects.append({"label": label, "box": box, "area": count, "color": list(colour)})
            break
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _generator_params(num_images: int, image_size: Any, seed: int, **kwargs: Any) -> dict[str, Any]:
    params = dict(SHAPES_DEFAULTS)
    unknown = set(kwargs) - set(params)
    if unknown:
        raise TypeError(
            f"generate_shapes_dataset: unknown arguments {sorted(unknown)}; accepted: "
            f"{sorted(set(params) | {'num_images'})}"
        )
    params.update(kwargs)
    params.update(num_images=int(num_images), image_size=image_size, seed=int(seed))
    params["backgrounds"] = tuple(params["backgrounds"])
    _parse_image_size(params["image_size"])
    for kind in params["backgrounds"]:
        if kind not in BACKGROUNDS:
            raise ValueError(f"Unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    if params["image_format"] not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {params['image_format']!r}")
    if params["num_images"] < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    # a json-compatible record of what was asked for (tuples become lists)
    return json.loads(json.dumps({**params, "version": _VERSION}))


def _write_split(directory: str, split: str, params: dict[str, Any]) -> dict[str, Any]:
    """Draw all images of a split into `directory/<split>/`; returns the COCO dict."""
    rng = _split_rng(params["seed"], split)
    image_dir = os.path.join(directory, split)
    os.makedirs(image_dir, exist_ok=True)
    size_h, size_w = _parse_image_size(params["image_size"])
    images, annotations = [], []
    extension = params["image_format"]
    for index in range(params["num_images"]):
        h, w = _sample_range(rng, size_h), _sample_range(rng, size_w)
        pixels, objects = _draw_image(rng, h, w, params)
        file_name = f"{split}_{index + 1:06d}.{extension}"
        path = os.path.join(image_dir, file_name)
        if extension == "jpg":
            Image.fromarray(pixels).save(path, format="JPEG", quality=params["jpeg_quality"])
        else:
            Image.fromarray(pixels).save(path, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["label"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": obj["area"],
                    "iscrowd": 0,
                    "color": obj["color"],
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(SHAPE_CLASSES)
    ]
    return {
        "info": {"description": "detrkit synthetic shapes", "split": split, "generator": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"{split}.json")


def generate_shapes_dataset(
    root: str,
    split: str,
    num_images: int,
    image_size: Any = SHAPES_DEFAULTS["image_size"],
    seed: int = 0,
    **kwargs: Any,
) -> str:
    """Generate (or regenerate) one split; returns the path of its json.

    Args:
        root: the dataset folder; images go to `root/<split>/`, the json to
            `root/annotations/<split>.json`.
        image_size: int (square), (h, w), or ((hmin, hmax), (wmin, wmax)) drawn per image.
        seed: with `split`, determines every pixel and box.
        kwargs: `max_objects`, `empty_fraction`, `object_size` (min, max side in px),
            `border_fraction` (share of objects allowed to be cut by the border), `backgrounds`
            (subset of "flat", "noise", "gradient", "stripes"), `image_format` ("jpg"/"png"),
            `jpeg_quality`.

    The split is written to a temporary folder beside its destination and renamed into place; the
    json is written last, so an existing json means a complete split.
    """
    root = os.fspath(root)
    params = _generator_params(num_images, image_size, seed, **kwargs)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=root)
    try:
        coco = _write_split(tmp_dir, split, params)
        json_file = _json_path(root, split)
        with contextlib.suppress(FileNotFoundError):
            os.remove(json_file)  # from here until the end the split counts as missing
        final_dir = os.path.join(root, split)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.rename(os.path.join(tmp_dir, split), final_dir)
        tmp_json = os.path.join(tmp_dir, f"{split}.json")
        with open(tmp_json, "w") as f:
            json.dump(coco, f)
        os.replace(tmp_json, json_file)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(
        "Generated %d shapes images (%d objects) for split %r in %s",
        len(coco["images"]),
        len(coco["annotations"]),
        split,
        root,
    )
    return json_file


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the atomic renames alone
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recorded_params(json_file: str) -> dict[str, Any] | None:
    try:
        with open(json_file) as f:
            return json.load(f).get("info", {}).get("generator")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_shapes_dataset(
    root: str,
    split: str,
    num_images: int,
    image_size: Any = SHAPES_DEFAULTS["image_size"],
    seed: int = 0,
    **kwargs: Any,
) -> str:
    """Return the split's json path, generating the split first if it is missing or stale."""
    root = os.fspath(root)
    params = _generator_params(num_images, image_size, seed, **kwargs)
    json_file = _json_path(root, split)
    if _recorded_params(json_file) == params and os.path.isdir(os.path.join(root, split)):
        return json_file
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f".{split}.lock")):
        recorded = _recorded_params(json_file)  # another process may have finished meanwhile
        if recorded == params and os.path.isdir(os.path.join(root, split)):
            return json_file
        if recorded is not None:
            logger.warning(
                "%s was generated with different parameters (%s); regenerating it with %s",
                json_file,
                recorded,
                params,
            )
        return generate_shapes_dataset(root, split, num_images, image_size, seed, **kwargs)


def register_shapes(
    root: str | None = None,
    splits: dict[str, tuple[str, int]] | None = None,
    **generator_kwargs: Any,
) -> None:
    """Register the shapes datasets (default `shapes_train`, `shapes_val`).

    `root` defaults to `$DETRKIT_DATASETS/shapes`; `splits` maps dataset name -> (split folder,
    number of images); `generator_kwargs` go to `generate_shapes_dataset` (image_size, seed, ...).
    Registering a name again replaces the earlier registration.
    """
    from .coco import load_coco_json

    root = os.path.join(datasets_root(), "shapes") if root is None else os.fspath(root)
    splits = dict(SHAPES_SPLITS if splits is None else splits)
    # check the arguments now rather than at first use
    _generator_params(
        0, **{"image_size": SHAPES_DEFAULTS["image_size"], "seed": 0, **generator_kwargs}
    )
    for name, (split, num_images) in splits.items():
        json_file = _json_path(root, split)
        image_root = os.path.join(root, split)

        def load(name=name, split=split, num_images=num_images) -> list[dict]:
            path = ensure_shapes_dataset(root, split, num_images, **generator_kwargs)
            return load_coco_json(path, os.path.join(root, split), name)

        DatasetCatalog.pop(name, None)
        MetadataCatalog.remove(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPE_CLASSES))},
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
