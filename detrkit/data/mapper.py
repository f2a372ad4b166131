"""DetrDatasetMapper: one catalog record -> the dict the model takes.

Reads the image (EXIF orientation applied, any mode converted to RGB), applies DETR's
augmentation (in training: with probability 0.5 the plain list, otherwise the list with a crop),
and returns `{image: uint8 CHW tensor, height, width (original), image_id, file_name}` plus, in
training, `instances = Instances(gt_boxes XYXY in the augmented image, gt_classes int64)`.

Bad images: by default a missing or undecodable image raises an error naming the file and the
record's image_id. With `skip_bad_images=True` the mapper logs a warning naming them and returns
None; the loaders then draw another sample (training) or leave the image out (inference).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from detrkit.structures import BoxMode

from . import detection_utils as utils
from .transforms import AugInput, Augmentation, AugmentationList, apply_transform_to_boxes

logger = logging.getLogger(__name__)

__all__ = ["DetrDatasetMapper", "check_annotations"]


def check_annotations(annotations: Sequence[dict], record: dict) -> None:
    """Raise ValueError, naming the image and the annotation, on a category id that is not an
    integer >= 0 or a bbox that is not 4 finite numbers.

    Training data is checked here, where it enters, so that the model's forward need not check
    it on the device (a host sync per step on a GPU). That ids are below the class count is
    checked when a dataset is loaded (`get_detection_dataset_dicts`, against its thing_classes)
    and at start-up (thing_classes against `model.num_classes`).
    """
    for index, annotation in enumerate(annotations):
        where = (
            f"{record.get('file_name')} (image_id {record.get('image_id')!r}): annotation {index}"
        )
        category_id = annotation.get("category_id")
        if not utils.is_class_index(category_id):
            raise ValueError(
                f"{where} has category_id={category_id!r}; accepted: an integer >= 0 (the "
                "contiguous class index register_coco_instances maps category ids to)"
            )
        bbox = annotation.get("bbox")
        try:
            numbers = np.asarray(bbox, dtype=np.float64)
        except (TypeError, ValueError):
            numbers = None
        if numbers is None or numbers.shape != (4,) or not np.isfinite(numbers).all():
            raise ValueError(
                f"{where} has bbox={bbox!r}; accepted: 4 finite numbers (in its bbox_mode)"
            )


class DetrDatasetMapper:
    """Map a dataset record to the model's input dict, DETR style.

    Args:
        augmentation: augmentations applied to every image (the whole list in inference).
        augmentation_with_crop: the alternative list used with probability 0.5 in training
            (DETR's resize-crop-resize); None to always use `augmentation`.
        is_train: keep (and transform) the annotations; crowd boxes are dropped.
        mask_on: instance masks are not supported in detrkit; must be False.
        img_format: "RGB" (the model's contract) or "BGR".
        skip_bad_images: on a missing/corrupt image, warn and return None instead of raising.
    """

    def __init__(
        self,
        augmentation: Sequence[Augmentation],
        augmentation_with_crop: Sequence[Augmentation] | None = None,
        is_train: bool = True,
        mask_on: bool = False,
        img_format: str = "RGB",
        skip_bad_images: bool = False,
    ) -> None:
        if mask_on:
            raise NotImplementedError(
                "DetrDatasetMapper(mask_on=True): detrkit trains box detection only; set "
                "mask_on=False"
            )
        if img_format not in ("RGB", "BGR"):
            raise ValueError(
                f"DetrDatasetMapper: img_format must be 'RGB' (what the model expects) or 'BGR', "
                f"got {img_format!r}"
            )
        self.augmentation = AugmentationList(list(augmentation))
        self.augmentation_with_crop = (
            AugmentationList(list(augmentation_with_crop))
            if augmentation_with_crop is not None
            else None
        )
        self.is_train = is_train
        self.mask_on = mask_on
        self.img_format = img_format
        self.skip_bad_images = skip_bad_images
        mode = "training" if is_train else "inference"
        logger.info(
            "DetrDatasetMapper (%s): augmentation %s; with crop %s",
            mode,
            self.augmentation,
            self.augmentation_with_crop,
        )

    def _read(self, dataset_dict: dict) -> np.ndarray | None:
        file_name = dataset_dict.get("file_name")
        image_id = dataset_dict.get("image_id")
        try:
            image = utils.read_image(
                file_name, format=self.img_format, data=dataset_dict.get("image_bytes")
            )
        except utils.ImageLoadError as e:
            message = f"{e} (record image_id={image_id!r})"
            if self.skip_bad_images:
                logger.warning("Skipping a bad image: %s", message)
                return None
            raise type(e)(
                f"{message}. To skip such images with a warning instead, construct the mapper "
                "with skip_bad_images=True (config: dataloader.train.mapper.skip_bad_images=True)",
                e.file_name,
            ) from None
        utils.check_image_size(dataset_dict, image)
        return image

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        dataset_dict = copy.deepcopy(dataset_dict)  # the caller's record stays untouched
        image = self._read(dataset_dict)
        dataset_dict.pop("image_bytes", None)
        if image is None:
            return None

        augmentation = self.augmentation
        if self.is_train and self.augmentation_with_crop is not None and np.random.rand() >= 0.5:
            augmentation = self.augmentation_with_crop
        aug_input = AugInput(image)
        transforms = augmentation(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (h, w) after augmentation

        # HWC -> CHW; contiguous so that batching/pinning does not copy again
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        annotations = [
            a for a in dataset_dict.pop("annotations", []) if int(a.get("iscrowd", 0)) == 0
        ]
        check_annotations(annotations, dataset_dict)
        boxes = np.asarray(
            [
                BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in annotations
            ],
            dtype=np.float64,
        ).reshape(-1, 4)
        boxes, keep = apply_transform_to_boxes(boxes, transforms, image_shape)
        kept = [
            {"bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": a["category_id"]}
            for a, box, k in zip(annotations, boxes, keep)
            if k
        ]
        dataset_dict["instances"] = utils.annotations_to_instances(kept, image_shape)
        return dataset_dict
