"""Checkpoints: `DetectionCheckpointer` (fvcore-based; .pth/.pt, .pkl, .safetensors; atomic
saves) and fvcore's `Checkpointer`/`PeriodicCheckpointer`."""

from fvcore.common.checkpoint import Checkpointer, PeriodicCheckpointer

from .checkpointer import (
    CheckpointError,
    CheckpointNotFoundError,
    DetectionCheckpointer,
    align_by_suffix,
    atomic_write,
    summarize_keys,
)

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "DetectionCheckpointer",
    "PeriodicCheckpointer",
    "align_by_suffix",
    "atomic_write",
    "summarize_keys",
]
