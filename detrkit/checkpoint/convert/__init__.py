"""Weight conversion into our (detrex) state-dict names.

- `official`: checkpoints of the official Deformable-DETR code (renamed, 91-way class heads cut
  to the 80 COCO rows, variant detected);
- `detrex`: checkpoints already in our names (checked, written as `{"model": ...}`);
- `torchvision`: ImageNet ResNets in torchvision's names (renamed to `backbone.*`).

`tools/convert_weights.py` is the command line; `convert_file` does the same from Python.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpointer import atomic_write
from .common import (
    SOURCES,
    VARIANTS,
    ConversionError,
    ConversionResult,
    Variant,
    guess_source,
    read_checkpoint,
)
from .detrex import convert_detrex, detrex_layout
from .official import convert_official, head_aliases, official_layout, official_to_detrex_name
from .torchvision import (
    convert_torchvision,
    is_torchvision_resnet,
    rename_torchvision_resnet,
    resnet_layout,
    torchvision_to_detectron2_name,
)

__all__ = [
    "SOURCES",
    "VARIANTS",
    "ConversionError",
    "ConversionResult",
    "Variant",
    "convert_checkpoint",
    "convert_detrex",
    "convert_file",
    "convert_official",
    "convert_torchvision",
    "detrex_layout",
    "guess_source",
    "head_aliases",
    "is_torchvision_resnet",
    "official_layout",
    "official_to_detrex_name",
    "read_checkpoint",
    "rename_torchvision_resnet",
    "resnet_layout",
    "save_converted",
    "torchvision_to_detectron2_name",
]


def convert_checkpoint(
    source: str,
    path: str,
    *,
    variant: str | None = None,
    keep_all_classes: bool = False,
    use_ema: bool = False,
) -> ConversionResult:
    """Read `path` and convert it from `source` ("official", "detrex" or "torchvision")."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; accepted: {', '.join(SOURCES)}")
    if keep_all_classes and source == "torchvision":
        raise ConversionError("--keep-all-classes applies to --source official or detrex")
    if use_ema and source != "detrex":
        raise ConversionError("--use-ema applies to --source detrex")
    if variant is not None and source == "torchvision":
        raise ConversionError("--variant applies to --source official or detrex")
    data = read_checkpoint(path)
    if source == "official":
        return convert_official(data, path, variant=variant, keep_all_classes=keep_all_classes)
    if source == "detrex":
        return convert_detrex(
            data, path, variant=variant, use_ema=use_ema, keep_all_classes=keep_all_classes
        )
    return convert_torchvision(data, path)


def save_converted(result: ConversionResult, output: str) -> None:
    """Write `{"model": state_dict}` atomically: a `.safetensors` file (aliases stored once per
    name, as safetensors cannot share storage) or a torch file (aliases share one tensor)."""
    output = os.fspath(output)
    if os.path.splitext(output)[1].lower() == ".safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().clone() for k, v in result.model.items()}
        blob = save(tensors)
        atomic_write(output, lambda f: f.write(blob))
        return
    payload: dict[str, Any] = {"model": result.model}
    atomic_write(output, lambda f: torch.save(payload, f))


def convert_file(
    source: str,
    path: str,
    output: str,
    *,
    variant: str | None = None,
    keep_all_classes: bool = False,
    use_ema: bool = False,
) -> ConversionResult:
    """`convert_checkpoint` then `save_converted`; refuses to overwrite the input."""
    if os.path.exists(path) and os.path.exists(output) and os.path.samefile(path, output):
        raise ConversionError(f"--output {output} is the input file; write to another path")
    result = convert_checkpoint(
        source, path, variant=variant, keep_all_classes=keep_all_classes, use_ema=use_ema
    )
    save_converted(result, output)
    return result
