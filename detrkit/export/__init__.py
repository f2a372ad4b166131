"""Deployment exports: ONNX (onnxruntime), torch.export programs and AOTInductor packages of a
detector with a `detect(images)` method (see `ExportableDetector` for the input/output contract
and docs/deploy.md for running the artifacts). onnx, onnxruntime and onnxscript are imported
only when an ONNX function runs."""

from .artifacts import (
    ARTIFACT_FILES,
    EXPORT_FORMATS,
    artifact_path,
    check_onnx,
    compile_aoti,
    dynamic_ranges,
    dynamic_shapes,
    export_onnx,
    export_program,
    load_runner,
)
from .onnx_ms_deform_attn import (
    DEFAULT_ONNX_ATTENTION,
    ONNX_ATTENTION_FORMS,
    ONNX_OPSET,
    onnx_translation_table,
)
from .verify import BOX_TOLERANCE, SCORE_TOLERANCE, DetectionDifference, compare_detections
from .wrapper import ExportableDetector

__all__ = [
    "ARTIFACT_FILES",
    "BOX_TOLERANCE",
    "DEFAULT_ONNX_ATTENTION",
    "EXPORT_FORMATS",
    "ONNX_ATTENTION_FORMS",
    "ONNX_OPSET",
    "SCORE_TOLERANCE",
    "DetectionDifference",
    "ExportableDetector",
    "artifact_path",
    "check_onnx",
    "compare_detections",
    "compile_aoti",
    "dynamic_ranges",
    "dynamic_shapes",
    "export_onnx",
    "export_program",
    "load_runner",
    "onnx_translation_table",
]
