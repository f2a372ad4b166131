"""Evaluation: running a model over a dataset and scoring its detections with pycocotools."""

from .coco import COCOEvaluator, evaluate_box_predictions, instances_to_coco_json
from .inference import (
    DatasetEvaluator,
    DatasetEvaluators,
    inference_context,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)

__all__ = [
    "COCOEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "evaluate_box_predictions",
    "inference_context",
    "inference_on_dataset",
    "instances_to_coco_json",
    "print_csv_format",
    "verify_results",
]
