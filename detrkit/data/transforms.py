"""Data augmentation on top of fvcore.transforms.

An `Augmentation` looks at its input (the image) and returns a deterministic fvcore `Transform`
(flip, resize, crop, ...) that is then applied to the image and to the boxes alike. `AugInput`
carries the image and boxes through a list of augmentations; `AugmentationList` chains them;
`RandomSelect` picks one of two chains (DETR's "resize" vs "resize, crop, resize").

The DETR recipe (detrex's `coco_detr` data config) is available as `detr_train_augmentation()`
(the two lists given to `DetrDatasetMapper`) and `detr_test_augmentation()`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fvcore.transforms.transform import (
    CropTransform,
    HFlipTransform,
    NoOpTransform,
    Transform,
    TransformList,
    VFlipTransform,
)
from PIL import Image

__all__ = [
    "AugInput",
    "Augmentation",
    "AugmentationList",
    "CropTransform",
    "HFlipTransform",
    "NoOpTransform",
    "RandomCrop",
    "RandomFlip",
    "RandomSelect",
    "ResizeShortestEdge",
    "ResizeTransform",
    "Transform",
    "TransformList",
    "VFlipTransform",
    "apply_augmentations",
    "apply_transform_to_boxes",
    "detr_test_augmentation",
    "detr_train_augmentation",
]


class ResizeTransform(Transform):
    """Resize an HxW(xC) image from (h, w) to (new_h, new_w).

    uint8 images go through PIL (bilinear by default, the interpolation detectron2/DETR train
    with); other dtypes through `torch.nn.functional.interpolate`.
    """

    def __init__(self, h: int, w: int, new_h: int, new_w: int, interp: int = Image.BILINEAR):
        super().__init__()
        self.h, self.w, self.new_h, self.new_w, self.interp = h, w, new_h, new_w, interp

    def apply_image(self, img: np.ndarray, interp: int | None = None) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"ResizeTransform was made for a {self.h}x{self.w} image, got {img.shape[:2]}"
            )
        interp = self.interp if interp is None else interp
        if img.dtype == np.uint8:
            if img.ndim == 3 and img.shape[2] == 1:
                pil = Image.fromarray(img[:, :, 0])
                return np.asarray(pil.resize((self.new_w, self.new_h), interp))[:, :, None]
            if img.ndim == 2 or img.shape[2] in (3, 4):
                pil = Image.fromarray(img)
                return np.asarray(pil.resize((self.new_w, self.new_h), interp))
            channels = [
                self.apply_image(np.ascontiguousarray(img[:, :, c])) for c in range(img.shape[2])
            ]
            return np.stack(channels, axis=2)
        mode = {Image.NEAREST: "nearest", Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}.get(
            interp, "bilinear"
        )
        tensor = torch.from_numpy(np.ascontiguousarray(img)).float()
        shape = tensor.shape
        tensor = tensor.reshape(shape[0], shape[1], -1).permute(2, 0, 1)[None]  # 1, C, H, W
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        out = torch.nn.functional.interpolate(tensor, (self.new_h, self.new_w), mode=mode, **kwargs)
        out = out[0].permute(1, 2, 0).reshape((self.new_h, self.new_w, *shape[2:]))
        return out.numpy().astype(img.dtype)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation, interp=Image.NEAREST)

    def inverse(self) -> Transform:
        return ResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)

    def __repr__(self) -> str:
        return f"ResizeTransform(h={self.h}, w={self.w}, new_h={self.new_h}, new_w={self.new_w})"


class AugInput:
    """The data an augmentation acts on: an HxWxC image and optional (N, 4) XYXY boxes.

    `transform(tfm)` applies a Transform to everything it holds, in place.
    """

    def __init__(self, image: np.ndarray, *, boxes: np.ndarray | None = None) -> None:
        if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
            raise ValueError(
                "AugInput: image must be an HxW or HxWxC numpy array, got "
                f"{type(image).__name__} {getattr(image, 'shape', '')}"
            )
        self.image = image
        self.boxes = boxes

    def transform(self, tfm: Transform) -> None:
        self.image = tfm.apply_image(self.image)
        if self.boxes is not None:
            self.boxes = tfm.apply_box(self.boxes)

    def apply_augmentations(self, augmentations: Sequence[Augmentation]) -> TransformList:
        return AugmentationList(augmentations)(self)


class Augmentation:
    """Base class: `get_transform(image)` returns the Transform to apply to this image.

    Random augmentations draw from numpy's global generator (seeded per data-loader worker).
    Calling an augmentation on an `AugInput` applies the transform to it and returns it.
    """

    def get_transform(self, image: np.ndarray) -> Transform:
        raise NotImplementedError

    def __call__(self, aug_input: AugInput) -> Transform:
        tfm = self.get_transform(aug_input.image)
        if not isinstance(tfm, (Transform, TransformList)):
            raise TypeError(
                f"{type(self).__name__}.get_transform must return an fvcore Transform, got "
                f"{type(tfm).__name__}"
            )
        aug_input.transform(tfm)
        return tfm

    @staticmethod
    def _rand_range(low: float = 1.0, high: float | None = None, size=None):
        """Uniform float in [low, high) (or [0, low) when high is None)."""
        if high is None:
            low, high = 0, low
        return np.random.uniform(low, high, size)

    def __repr__(self) -> str:
        params = inspect.signature(self.__init__).parameters
        args = []
        for name, param in params.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if hasattr(self, name):
                args.append(f"{name}={getattr(self, name)!r}")
        return f"{type(self).__name__}({', '.join(args)})"


def _as_augmentation(aug: Any) -> Augmentation:
    if isinstance(aug, Augmentation):
        return aug
    if isinstance(aug, (list, tuple)):
        return AugmentationList(aug)
    if isinstance(aug, Transform):
        return _FixedTransform(aug)
    raise TypeError(
        f"Expected an Augmentation, a Transform or a list of them, got {type(aug).__name__}: "
        f"{aug!r}"
    )


class _FixedTransform(Augmentation):
    """A Transform used where an Augmentation is expected: always the same transform."""

    def __init__(self, tfm: Transform) -> None:
        self.tfm = tfm

    def get_transform(self, image: np.ndarray) -> Transform:
        return self.tfm


class AugmentationList(Augmentation):
    """Apply several augmentations one after the other (each sees the previous one's output)."""

    def __init__(self, augmentations: Sequence[Any]) -> None:
        self.augmentations = [_as_augmentation(a) for a in augmentations]

    def __call__(self, aug_input: AugInput) -> TransformList:
        transforms = [aug(aug_input) for aug in self.augmentations]
        return TransformList(transforms)

    def get_transform(self, image: np.ndarray) -> TransformList:
        # the later augmentations depend on the earlier outputs, so run them on a copy
        return self(AugInput(image.copy()))

    def __repr__(self) -> str:
        return f"AugmentationList[{', '.join(repr(a) for a in self.augmentations)}]"


def apply_augmentations(augmentations: Sequence[Any], image: np.ndarray):
    """Apply augmentations to an image; returns (augmented image, TransformList)."""
    aug_input = AugInput(image)
    tfms = AugmentationList(augmentations)(aug_input)
    return aug_input.image, tfms


class RandomFlip(Augmentation):
    """Flip the image horizontally (or vertically) with probability `prob`."""

    def __init__(self, prob: float = 0.5, *, horizontal: bool = True, vertical: bool = False):
        if horizontal == vertical:
            raise ValueError("RandomFlip: set exactly one of horizontal=True or vertical=True")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomFlip: prob must be in [0, 1], got {prob}")
        self.prob, self.horizontal, self.vertical = prob, horizontal, vertical

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if self._rand_range() < self.prob:
            return HFlipTransform(w) if self.horizontal else VFlipTransform(h)
        return NoOpTransform()


class ResizeShortestEdge(Augmentation):
    """Resize so the short side is `short_edge_length` while the long side stays <= `max_size`.

    `short_edge_length` is an int or a list: with sample_style "choice" one of the values is
    picked, with "range" an integer in [min, max] is drawn. A short edge of 0 leaves the image.
    """

    def __init__(
        self,
        short_edge_length: int | Sequence[int],
        max_size: int = sys.maxsize,
        sample_style: str = "range",
        interp: int = Image.BILINEAR,
    ) -> None:
        if sample_style not in ("range", "choice"):
            raise ValueError(
                "ResizeShortestEdge: sample_style must be 'range' or 'choice', got "
                f"{sample_style!r}"
            )
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length, short_edge_length)
        short_edge_length = tuple(int(s) for s in short_edge_length)
        if not short_edge_length:
            raise ValueError("ResizeShortestEdge: short_edge_length must not be empty")
        if sample_style == "range" and len(short_edge_length) != 2:
            raise ValueError(
                "ResizeShortestEdge: sample_style='range' needs short_edge_length=(min, max), got "
                f"{short_edge_length}; use sample_style='choice' for a list of sizes"
            )
        self.short_edge_length = short_edge_length
        self.max_size = int(max_size)
        self.sample_style = sample_style
        self.interp = interp

    @staticmethod
    def get_output_shape(oldh: int, oldw: int, short_edge_length: int, max_size: int):
        """(new_h, new_w): scale the short side to `short_edge_length`, cap the long side."""
        scale = short_edge_length / min(oldh, oldw)
        if oldh < oldw:
            newh, neww = short_edge_length, scale * oldw
        else:
            newh, neww = scale * oldh, short_edge_length
        if max(newh, neww) > max_size:
            rescale = max_size / max(newh, neww)
            newh, neww = newh * rescale, neww * rescale
        return int(newh + 0.5), int(neww + 0.5)

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if self.sample_style == "range":
            size = int(np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1))
        else:
            size = int(np.random.choice(self.short_edge_length))
        if size == 0:
            return NoOpTransform()
        new_h, new_w = self.get_output_shape(h, w, size, self.max_size)
        return ResizeTransform(h, w, new_h, new_w, self.interp)


class RandomCrop(Augmentation):
    """Crop a random window.

    crop_type: "relative" (crop_size = fraction (h, w) of the image), "relative_range" (uniform in
    [crop_size, 1]), "absolute" (crop_size = (h, w) pixels, at most the image) or "absolute_range"
    (height and width each drawn in [crop_size[0], crop_size[1]], at most the image: DETR's
    RandomSizeCrop(384, 600)).
    """

    _TYPES = ("relative", "relative_range", "absolute", "absolute_range")

    def __init__(self, crop_type: str, crop_size: Sequence[float]) -> None:
        if crop_type not in self._TYPES:
            raise ValueError(
                f"RandomCrop: crop_type {crop_type!r} is not one of {', '.join(self._TYPES)}"
            )
        if len(crop_size) != 2:
            raise ValueError(f"RandomCrop: crop_size must have 2 numbers, got {crop_size!r}")
        self.crop_type, self.crop_size = crop_type, tuple(crop_size)

    def get_crop_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        if self.crop_type == "relative":
            ch, cw = self.crop_size
            return int(h * ch + 0.5), int(w * cw + 0.5)
        if self.crop_type == "relative_range":
            low = np.asarray(self.crop_size, dtype=np.float32)
            ch, cw = low + np.random.rand(2) * (1 - low)
            return int(h * ch + 0.5), int(w * cw + 0.5)
        if self.crop_type == "absolute":
            return min(int(self.crop_size[0]), h), min(int(self.crop_size[1]), w)
        low, high = int(self.crop_size[0]), int(self.crop_size[1])
        if low > high:
            raise ValueError(f"RandomCrop: absolute_range needs min <= max, got {self.crop_size}")
        ch = int(np.random.randint(min(h, low), min(h, high) + 1))
        cw = int(np.random.randint(min(w, low), min(w, high) + 1))
        return ch, cw

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        ch, cw = self.get_crop_size((h, w))
        if ch <= 0 or cw <= 0 or ch > h or cw > w:
            raise ValueError(f"RandomCrop: crop {ch}x{cw} does not fit in a {h}x{w} image")
        y0 = int(np.random.randint(h - ch + 1))
        x0 = int(np.random.randint(w - cw + 1))
        return CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)


class RandomSelect(Augmentation):
    """With probability `prob` apply `tfm_a`, otherwise `tfm_b` (each one or a list of augs)."""

    def __init__(self, tfm_a: Any, tfm_b: Any, prob: float = 0.5) -> None:
        self.tfm_a, self.tfm_b, self.prob = _as_augmentation(tfm_a), _as_augmentation(tfm_b), prob

    def __call__(self, aug_input: AugInput) -> Transform:
        chosen = self.tfm_a if self._rand_range() < self.prob else self.tfm_b
        return chosen(aug_input)

    def get_transform(self, image: np.ndarray) -> Transform:
        return self(AugInput(image.copy()))


def apply_transform_to_boxes(
    boxes: np.ndarray, transforms: Transform, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Transform (N, 4) XYXY_ABS boxes, clip them to `image_size` (h, w) after the transforms.

    Returns (boxes, keep): `keep` is False for boxes left with no width or height (e.g. cropped
    away entirely), which callers drop.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes):
        boxes = transforms.apply_box(boxes.copy())
    h, w = image_size
    boxes = np.minimum(np.maximum(boxes, 0.0), np.array([w, h, w, h], dtype=np.float64))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


def detr_train_augmentation(
    min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
) -> tuple[list[Augmentation], list[Augmentation]]:
    """DETR's training augmentation as the mapper's (augmentation, augmentation_with_crop)."""
    augmentation = [
        RandomFlip(),
        ResizeShortestEdge(min_sizes, max_size=max_size, sample_style="choice"),
    ]
    augmentation_with_crop = [
        RandomFlip(),
        ResizeShortestEdge(crop_resize_sizes, sample_style="choice"),
        RandomCrop("absolute_range", crop_size),
        ResizeShortestEdge(min_sizes, max_size=max_size, sample_style="choice"),
    ]
    return augmentation, augmentation_with_crop


def detr_test_augmentation(size: int = 800, max_size: int = 1333) -> list[Augmentation]:
    return [ResizeShortestEdge(size, max_size=max_size)]
