"""Evaluation: running a model over a dataset and scoring its detections with pycocotools."""

from .inference import (
    DatasetEvaluator,
    DatasetEvaluators,
    inference_context,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_context",
    "inference_on_dataset",
    "print_csv_format",
    "verify_results",
]
