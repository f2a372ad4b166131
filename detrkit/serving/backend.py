"""What the server needs from a model (`DetectionBackend`), and the backend built on
`DefaultPredictor`: the config's model, checkpoint, device, test-time resize and class names.

The app only sees the protocol: `prepare` turns a decoded image into a model input (on the
decoding threads), `predict` runs a list of prepared inputs as one batch (on the inference
thread) and returns, per image, its detections sorted by decreasing score.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

__all__ = ["DetectionBackend", "PredictorBackend", "instances_to_detections"]

logger = logging.getLogger(__name__)

Detection = dict[str, Any]  # {"bbox": [x0, y0, x1, y1], "score", "category_id", "label"}


class DetectionBackend(Protocol):
    """A model the server can run. `model_id`, `created` (unix seconds) and `owned_by` describe
    it in `/v1/models`."""

    model_id: str
    created: int
    owned_by: str

    def prepare(self, image: Image.Image) -> Any:
        """A decoded image (any PIL mode, EXIF applied) -> the model's input for it."""

    def predict(self, inputs: list[Any]) -> list[list[Detection]]:
        """Prepared inputs -> per input, its detections by decreasing score, boxes in the
        original image's pixels."""

    def warmup(self) -> None:
        """Run the model once so that the first request does not pay for lazy set-up."""


def instances_to_detections(
    instances: Any, class_names: list[str] | None, dataset_ids: list[int] | None
) -> list[Detection]:
    """`Instances(pred_boxes, scores, pred_classes)` -> JSON-ready detections by decreasing
    score. `dataset_ids[c]` is the category id reported for class index c (the dataset's own
    ids, as in COCO results); `class_names[c]` its label."""
    scores = instances.scores.detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = instances.pred_boxes.tensor.detach().float().cpu()[order].tolist()
    classes = instances.pred_classes.detach().cpu()[order].tolist()
    detections = []
    for box, score, cls in zip(boxes, scores[order].tolist(), classes):
        cls = int(cls)
        detections.append(
            {
                "bbox": box,
                "score": score,
                "category_id": dataset_ids[cls] if dataset_ids and cls < len(dataset_ids) else cls,
                "label": class_names[cls] if class_names and cls < len(class_names) else str(cls),
            }
        )
    return detections


def _dataset_ids(metadata: Any, num_classes: int) -> list[int] | None:
    """Contiguous class index -> the dataset's category id, from
    `thing_dataset_id_to_contiguous_id` when the metadata has it."""
    mapping = metadata.get("thing_dataset_id_to_contiguous_id") if metadata else None
    if not isinstance(mapping, Mapping) or not mapping:
        return None
    ids = [0] * max(num_classes, max(mapping.values()) + 1)
    for dataset_id, index in mapping.items():
        ids[int(index)] = int(dataset_id)
    return ids


class PredictorBackend:
    """`DefaultPredictor` behind the `DetectionBackend` protocol.

    `predictor.preprocess` (the test-time resize) runs per image on the decoding threads and
    `predictor.model` on a batch of those inputs on the inference thread, which is what
    `predictor.predict_batch` does in one call.
    """

    def __init__(self, predictor: Any, model_id: str, created: int | None = None) -> None:
        self.predictor = predictor
        self.model_id = model_id
        self.created = int(time.time() if created is None else created)
        self.owned_by = "detrkit"
        metadata = getattr(predictor, "metadata", None)
        self.class_names = list(metadata.get("thing_classes") or []) if metadata else []
        self.dataset_ids = _dataset_ids(metadata, len(self.class_names))
        self.input_format = str(getattr(predictor, "input_format", "RGB"))

    @classmethod
    def from_config(cls, cfg: Any, config_file: str) -> PredictorBackend:
        """Build `DefaultPredictor(cfg)`; the model id is the config file's name without
        `.py`, `created` the checkpoint's (else the config's) modification time."""
        from detrkit.engine.defaults import DefaultPredictor

        predictor = DefaultPredictor(cfg)
        model_id = os.path.splitext(os.path.basename(config_file))[0]
        checkpoint = str(cfg.train.get("init_checkpoint", "") or "")
        stamped = checkpoint if os.path.isfile(checkpoint) else config_file
        created = int(os.path.getmtime(stamped)) if os.path.exists(stamped) else None
        return cls(predictor, model_id, created)

    def prepare(self, image: Image.Image) -> dict[str, Any]:
        from detrkit.data.detection_utils import convert_PIL_to_numpy

        array = convert_PIL_to_numpy(image, self.input_format)  # (H, W, 3) uint8
        return self.predictor.preprocess(array)

    def predict(self, inputs: list[dict[str, Any]]) -> list[list[Detection]]:
        with torch.no_grad():
            outputs = self.predictor.model(inputs)
        return [
            instances_to_detections(out["instances"], self.class_names, self.dataset_ids)
            for out in outputs
        ]

    def warmup(self) -> None:
        image = Image.fromarray(np.full((480, 640, 3), 114, dtype=np.uint8))
        self.predict([self.prepare(image)])
