"""`DefaultPredictor`: a trained detector as a function from one image to its detections.

    predictor = DefaultPredictor(cfg)          # cfg: a LazyConfig with model, train, dataloader
    outputs = predictor(image)                 # HxWx3 uint8 numpy array -> {"instances": ...}
    outputs = predictor.predict_batch(images)  # a list of images -> a list of such dicts

It does what the evaluation path does (`inference_on_dataset` over `dataloader.test`), so its
detections equal the evaluator's: the model is built from `cfg.model`, loaded from
`cfg.train.init_checkpoint` by `DetectionCheckpointer` (every format it reads), put in eval mode
on `cfg.train.device` (CUDA falls back to the CPU with a warning), and each image is resized by
the augmentation objects of `cfg.dataloader.test.mapper`. Boxes come back in the original
image's pixels.

Channel order: the image is taken in the test mapper's `img_format`, which is "RGB" for every
bundled config (the model's `pixel_mean`/`pixel_std` are RGB statistics). An image read with
OpenCV is BGR: pass `image[:, :, ::-1]`, or use `detrkit.data.read_image(path, "RGB")`.

`build_inference_model(cfg)` is the loading step alone, shared with servers that batch requests
themselves; `predictor.preprocess(image)` turns one image into the model's input dict.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from detrkit.config import ConfigError, instantiate

from .config_checks import _dataset_names, resolve_device

if TYPE_CHECKING:
    from detrkit.data import Metadata

# detrkit.checkpoint and detrkit.data are imported where they are used, so that
# `import detrkit.engine` (which every config file does) stays light

logger = logging.getLogger(__name__)

__all__ = [
    "DefaultPredictor",
    "build_inference_model",
    "build_model",
    "inference_metadata",
]


def _config_node(cfg: Any, dotted: str) -> Any:
    """`cfg.<dotted>`, or a ConfigError naming the missing key."""
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(
                f"the config has no '{dotted}', which DefaultPredictor needs (a LazyConfig with "
                "model, train.init_checkpoint and dataloader.test.mapper)"
            )
        node = node[part]
    return node


def _classes_from_json(metadata: Metadata) -> Metadata:
    """A registered COCO-json dataset that was not loaded yet has no class names in its
    metadata: read them from its json's categories (contiguous ids follow the sorted ids, as
    when the dataset is loaded)."""
    from detrkit.data import Metadata
    from detrkit.data.coco import read_json

    json_file = metadata.get("json_file")
    if metadata.get("thing_classes") or not json_file or not os.path.isfile(json_file):
        return metadata
    categories = sorted(read_json(json_file).get("categories", []), key=lambda c: c["id"])
    fields = {k: v for k, v in metadata.as_dict().items() if k != "name"}
    fields["thing_classes"] = [c["name"] for c in categories]
    fields["thing_dataset_id_to_contiguous_id"] = {c["id"]: i for i, c in enumerate(categories)}
    return Metadata(name=metadata.name, **fields)


def inference_metadata(cfg: Any, checkpoint_data: Mapping[str, Any] | None = None) -> Metadata:
    """Class names (and the rest of the catalog metadata) for drawing and reporting detections.

    A checkpoint that carries its own `metadata` (a dict with `thing_classes`) wins, since it
    describes the classes the weights were trained on; otherwise the first test dataset's
    `MetadataCatalog` entry (class names read from its json if it was not loaded yet);
    otherwise an empty Metadata (callers then print class indices).
    """
    from detrkit.data import Metadata, MetadataCatalog

    stored = (checkpoint_data or {}).get("metadata")
    if isinstance(stored, Mapping) and stored.get("thing_classes"):
        return Metadata(name="checkpoint", **dict(stored))
    names = _dataset_names(cfg, "test")
    if names:
        return _classes_from_json(MetadataCatalog.get(names[0]))
    return Metadata(name="")


def build_model(
    cfg: Any, *, load: bool | None = True
) -> tuple[nn.Module, torch.device, dict[str, Any]]:
    """`cfg.model` on `cfg.train.device` (the CPU, with a warning, when CUDA is missing; the
    config is left as written). Weights: `load=True`
    loads `cfg.train.init_checkpoint` (an empty value keeps the initialization, with a
    warning); `load=None` loads it only when that file exists (tools whose numbers do not
    depend on the weights); `load=False` never. Returns (model, device, the checkpoint's other
    data such as `iteration` or `metadata`)."""
    from detrkit.checkpoint import DetectionCheckpointer

    _config_node(cfg, "model")
    train = _config_node(cfg, "train")
    device = resolve_device(cfg)
    model = instantiate(cfg.model)
    model.to(device)
    checkpoint = str(train.get("init_checkpoint", "") or "")
    extra: dict[str, Any] = {}
    if load is None:
        load = bool(checkpoint) and os.path.isfile(checkpoint)
        if not load:
            logger.info("Using the initial weights (train.init_checkpoint is not a file)")
    if load:
        if not checkpoint:
            logger.warning(
                "train.init_checkpoint is empty: predicting with the initial (untrained) weights; "
                "pass train.init_checkpoint=/path/to/model.pth"
            )
        extra = dict(DetectionCheckpointer(model).load(checkpoint) or {})
    return model, device, extra


def _load_inference_model(cfg: Any) -> tuple[nn.Module, torch.device, str, dict[str, Any]]:
    """Model in eval mode on its device, the input format, and the checkpoint's other data."""
    mapper = _config_node(cfg, "dataloader.test.mapper")
    model, device, extra = build_model(cfg, load=True)
    model.eval()
    input_format = str(mapper.get("img_format", "RGB") if hasattr(mapper, "get") else "RGB")
    return model, device, input_format, extra


def build_inference_model(cfg: Any) -> tuple[nn.Module, torch.device, str]:
    """Build `cfg.model`, load `cfg.train.init_checkpoint`, move it to `cfg.train.device` (CPU
    when CUDA is missing) in eval mode. Returns (model, device, input_format), where
    input_format is the test mapper's `img_format` ("RGB" or "BGR"), the channel order of the
    images the model takes."""
    model, device, input_format, _ = _load_inference_model(cfg)
    return model, device, input_format


class DefaultPredictor:
    """One trained model, ready to predict on numpy images (detectron2's DefaultPredictor).

    Attributes:
        cfg: a copy of the config it was built from (the caller's is left untouched).
        model: the model, in eval mode on `device`.
        aug: the test mapper's augmentation list (the test-time resize).
        input_format: channel order of the images `__call__` takes ("RGB" in the bundled
            configs).
        metadata: class names for the predicted class indices (`metadata.thing_classes`).
    """

    def __init__(self, cfg: Any) -> None:
        from detrkit.data.transforms import AugmentationList

        self.cfg = copy.deepcopy(cfg)
        self.model, self.device, self.input_format, extra = _load_inference_model(self.cfg)
        self.metadata = inference_metadata(self.cfg, extra)
        mapper = instantiate(self.cfg.dataloader.test.mapper)
        self.input_format = str(getattr(mapper, "img_format", self.input_format))
        augmentation = getattr(mapper, "augmentation", None)
        if augmentation is None:
            raise ConfigError(
                f"dataloader.test.mapper builds a {type(mapper).__name__} without an "
                "'augmentation' attribute; DefaultPredictor reuses the test mapper's augmentation "
                "(e.g. DetrDatasetMapper(augmentation=[ResizeShortestEdge(...)]))"
            )
        self.aug = (
            augmentation
            if isinstance(augmentation, AugmentationList)
            else AugmentationList(augmentation)
        )

    def _check_image(self, image: Any, index: int | None = None) -> np.ndarray:
        where = "DefaultPredictor: image" if index is None else f"DefaultPredictor: image {index}"
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"{where} must be a numpy array (H, W, 3) of uint8 in {self.input_format} order, "
                f"got {type(image).__name__}"
            )
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(
                f"{where} must have shape (H, W, 3) in {self.input_format} order, got "
                f"{tuple(image.shape)}"
            )
        if image.dtype != np.uint8:
            raise TypeError(f"{where} must be uint8 (0..255), got {image.dtype}")
        return image

    def preprocess(self, image: np.ndarray) -> dict[str, Any]:
        """One HxWx3 uint8 image -> the model's input dict: the test-time resized CHW tensor and
        the original `height`/`width` (so the model returns boxes in the original pixels)."""
        from detrkit.data.transforms import AugInput

        image = self._check_image(image)
        height, width = image.shape[:2]
        aug_input = AugInput(image)
        self.aug(aug_input)
        resized = np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
        return {"image": torch.as_tensor(resized), "height": height, "width": width}

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Detections of several images in one forward pass; image i's result equals
        `self(images[i])` (the model evaluates batches image-invariantly)."""
        if isinstance(images, np.ndarray):
            raise TypeError(
                "DefaultPredictor.predict_batch takes a list of (H, W, 3) images; for one image "
                "call the predictor itself"
            )
        inputs = []
        for i, image in enumerate(images):
            self._check_image(image, i)
            inputs.append(self.preprocess(image))
        if not inputs:
            return []
        with torch.no_grad():
            return self.model(inputs)

    def __call__(self, original_image: np.ndarray) -> dict[str, Any]:
        """Detections of one HxWx3 uint8 image in `input_format` order:
        `{"instances": Instances(pred_boxes XYXY in original pixels, scores, pred_classes)}`."""
        self._check_image(original_image)
        return self.predict_batch([original_image])[0]
