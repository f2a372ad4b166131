"""Image reading and annotation helpers shared by the mappers.

`read_image` decodes a file (or bytes already in memory) into an HxWxC uint8 array, applies the
EXIF orientation and converts any PIL mode (grayscale, palette, RGBA, CMYK, ...) to the requested
format. A file that is missing, empty, not an image or truncated raises `ImageLoadError` naming it.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
import torch
from fvcore.transforms import Transform
from iopath.common.file_io import PathManager
from PIL import Image, ImageOps, UnidentifiedImageError

from detrkit.structures import Boxes, BoxMode, Instances

logger = logging.getLogger(__name__)
_path_manager = PathManager()

__all__ = [
    "SUPPORTED_IMAGE_FORMATS",
    "ImageLoadError",
    "ImageNotFoundError",
    "annotations_to_instances",
    "check_image_size",
    "convert_PIL_to_numpy",
    "filter_empty_instances",
    "read_image",
    "read_image_bytes",
    "transform_instance_annotations",
]

SUPPORTED_IMAGE_FORMATS = ("RGB", "BGR", "L")


class ImageLoadError(OSError):
    """An image could not be read or decoded. `file_name` names the file."""

    def __init__(self, message: str, file_name: str | None = None) -> None:
        super().__init__(message)
        self.file_name = file_name

    def __str__(self) -> str:
        return str(self.args[0])


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image file does not exist."""


def _check_format(format: str) -> None:
    if format not in SUPPORTED_IMAGE_FORMATS:
        raise ValueError(
            f"Unsupported image format {format!r}; accepted: {', '.join(SUPPORTED_IMAGE_FORMATS)}"
        )


def read_image_bytes(file_name: str) -> bytes:
    """The raw (encoded) bytes of an image file; a missing file raises ImageNotFoundError."""
    file_name = os.fspath(file_name)
    try:
        with _path_manager.open(file_name, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageNotFoundError(f"Image file {file_name} does not exist", file_name) from None
    except IsADirectoryError:
        raise ImageLoadError(
            f"Image path {file_name} is a directory, not a file", file_name
        ) from None


def convert_PIL_to_numpy(image: Image.Image, format: str) -> np.ndarray:
    """A PIL image in any mode -> HxWx3 (RGB/BGR) or HxWx1 (L) uint8 array."""
    _check_format(format)
    target = "L" if format == "L" else "RGB"
    if image.mode != target:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit / float images: scale to 8 bits instead of letting PIL clip at 255; values
            # above 255 are read as 16-bit (0..65535), float images within [0, 1] as fractions
            array = np.asarray(image, dtype=np.float64)
            peak = array.max() if array.size else 0.0
            if peak > 255:
                scale = 255.0 / 65535.0
            elif image.mode == "F" and peak <= 1.0:
                scale = 255.0
            else:
                scale = 1.0
            array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
            image = Image.fromarray(array, mode="L")
        image = image.convert(target)
    array = np.asarray(image, dtype=np.uint8)
    if format == "L":
        array = array[:, :, None]
    elif format == "BGR":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


def read_image(file_name: str, format: str = "RGB", data: bytes | None = None) -> np.ndarray:
    """Decode an image into an HxWxC uint8 array in `format` ("RGB", "BGR" or "L").

    `data` holds the file's bytes when they are already in memory (cache mode); `file_name` is then
    only used in messages. The EXIF orientation, if any, is applied.
    """
    _check_format(format)
    file_name = os.fspath(file_name)
    if data is None:
        data = read_image_bytes(file_name)
    if len(data) == 0:
        raise ImageLoadError(f"Image file {file_name} is empty (0 bytes)", file_name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now, so truncated files fail here and not later
            image = _apply_exif_orientation(image, file_name)
            return convert_PIL_to_numpy(image, format)
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"Image file {file_name} is not an image format Pillow can read "
            "(corrupt or not an image)",
            file_name,
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation as OSError
        raise ImageLoadError(
            f"Image file {file_name} could not be decoded ({e}); the file may be truncated or "
            "corrupt",
            file_name,
        ) from None


def _apply_exif_orientation(image: Image.Image, file_name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # a broken EXIF block should not make a readable image unusable
        logger.warning("Ignoring the unreadable EXIF data of %s: %s", file_name, e)
        return image


def check_image_size(dataset_dict: dict, image: np.ndarray) -> None:
    """Check the decoded image against the record's `height`/`width`; fill them in if absent."""
    h, w = image.shape[:2]
    expected = (dataset_dict.get("height"), dataset_dict.get("width"))
    if expected[0] is not None and expected[1] is not None and (h, w) != tuple(expected):
        raise ValueError(
            f"Image file {dataset_dict.get('file_name')} (image_id "
            f"{dataset_dict.get('image_id')!r}) is {w}x{h} (width x height) after applying its "
            f"EXIF orientation, but the annotations say {expected[1]}x{expected[0]}; fix the "
            "'width'/'height' of this image in the annotation file"
        )
    dataset_dict.setdefault("height", h)
    dataset_dict.setdefault("width", w)


def transform_instance_annotations(
    annotation: dict[str, Any], transforms: Transform, image_size: tuple[int, int]
) -> dict[str, Any]:
    """Apply `transforms` to one annotation's box; the result is XYXY_ABS clipped to the image."""
    box = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)
    box = transforms.apply_box(np.asarray([box], dtype=np.float64))[0]
    h, w = image_size
    box = np.minimum(np.maximum(box, 0.0), [w, h, w, h])
    annotation = dict(annotation)
    annotation["bbox"] = box.tolist()
    annotation["bbox_mode"] = BoxMode.XYXY_ABS
    return annotation


def is_class_index(value: Any) -> bool:
    """An integer >= 0 (also a numpy integer or an integral float), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return value >= 0 and int(value) == value


def annotations_to_instances(annotations: list[dict], image_size: tuple[int, int]) -> Instances:
    """Annotations (boxes in XYXY_ABS after transforms) -> Instances(gt_boxes, gt_classes)."""
    boxes = [
        BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations
    ]
    target = Instances(image_size)
    target.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    target.gt_classes = torch.as_tensor(
        [int(a["category_id"]) for a in annotations], dtype=torch.int64
    )
    return target


def filter_empty_instances(instances: Instances, threshold: float = 0.0) -> Instances:
    """Drop instances whose box has width or height <= `threshold` (e.g. cropped away)."""
    if len(instances.get_fields()) == 0:
        return instances
    return instances[instances.gt_boxes.nonempty(threshold)]
