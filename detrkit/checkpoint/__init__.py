"""Checkpoints: `DetectionCheckpointer` (.pth/.pt, .pkl, .safetensors; atomic saves), the file
readers it uses (`io.py`), and weight conversion (`convert/`).

`PeriodicCheckpointer` is fvcore's; it drives a `DetectionCheckpointer`.
"""

from fvcore.common.checkpoint import PeriodicCheckpointer

from detrkit.utils.file_io import atomic_write

from .checkpointer import DetectionCheckpointer
from .io import CheckpointError, CheckpointNotFoundError
from .keys import align_by_suffix, summarize_keys

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "DetectionCheckpointer",
    "PeriodicCheckpointer",
    "align_by_suffix",
    "atomic_write",
    "summarize_keys",
]
