"""ImageNet ResNets in torchvision's names -> our (detectron2-layout) ResNet's names.

torchvision: `conv1`, `bn1`, `layer1..4.<block>.{conv1,bn1,conv2,bn2,conv3,bn3}`, the projection
shortcut as `downsample.0` (conv) and `downsample.1` (BatchNorm), the classifier `fc`.
Ours: `stem.conv1` (+ `.norm`), `res2..res5.<block>.{conv1,conv2,conv3}` each with `.norm`, the
shortcut as `shortcut` (+ `.norm`). Both are the v1.5 bottleneck (stride on the 3x3 conv), so the
tensors carry over unchanged. The classifier has no counterpart and `num_batches_tracked` is not
kept by FrozenBatchNorm2d: both are dropped.

Registered as a layout (`DetectionCheckpointer` renames such a file on load, so an ImageNet
`.pth` initializes the backbone as it is) and as `--source torchvision`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Set
from typing import Any

import torch

from .common import (
    ConversionError,
    ConversionResult,
    check_layout,
    first,
    model_state,
    strip_prefix,
)
from .registry import register_converter, register_layout, wrong_source_message

__all__ = [
    "convert_torchvision",
    "is_torchvision_resnet",
    "rename_torchvision_resnet",
    "resnet_layout",
    "torchvision_to_detectron2_name",
]

# bottleneck blocks per stage (layer1..layer4)
_DEPTH_TO_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_BASIC_BLOCK_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")

_STEM_NAME = re.compile(r"(conv1|bn1)\.(\w+)")
_BLOCK_NAME = re.compile(r"layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)")
_BLOCK_PARTS = {
    "conv1": "conv1",
    "bn1": "conv1.norm",
    "conv2": "conv2",
    "bn2": "conv2.norm",
    "conv3": "conv3",
    "bn3": "conv3.norm",
    "downsample.0": "shortcut",
    "downsample.1": "shortcut.norm",
}


def is_torchvision_resnet(keys: Iterable[str]) -> bool:
    """True for a state dict in torchvision's ResNet names (at the top level)."""
    return {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight"} <= set(keys)


def torchvision_to_detectron2_name(key: str) -> str | None:
    """`layer1.0.bn2.running_mean` -> `res2.0.conv2.norm.running_mean`; None for other names
    (e.g. the classifier `fc.*`)."""
    stem = _STEM_NAME.fullmatch(key)
    if stem:
        part = "conv1" if stem[1] == "conv1" else "conv1.norm"
        return f"stem.{part}.{stem[2]}"
    block = _BLOCK_NAME.fullmatch(key)
    if block:
        stage, index, part, field = block.groups()
        return f"res{int(stage) + 1}.{index}.{_BLOCK_PARTS[part]}.{field}"
    return None


def resnet_layout(depth: int = 50, prefix: str = "") -> OrderedDict[str, tuple[int, ...]]:
    """`{name: shape}` of torchvision's bottleneck ResNet without the classifier and without
    `num_batches_tracked`, in the order torchvision's state dict lists them."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def conv(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        shapes[f"{prefix}{name}.weight"] = (out_channels, in_channels, kernel, kernel)

    def norm(name: str, channels: int) -> None:
        for field in _NORM_FIELDS:
            shapes[f"{prefix}{name}.{field}"] = (channels,)

    conv("conv1", 64, 3, 7)
    norm("bn1", 64)
    in_channels = 64
    for stage, num_blocks in enumerate(_DEPTH_TO_BLOCKS[depth], start=1):
        width = 64 * 2 ** (stage - 1)  # bottleneck width; the block outputs 4x as many
        out_channels = 4 * width
        for index in range(num_blocks):
            block = f"layer{stage}.{index}"
            conv(f"{block}.conv1", width, in_channels, 1)
            norm(f"{block}.bn1", width)
            conv(f"{block}.conv2", width, width, 3)
            norm(f"{block}.bn2", width)
            conv(f"{block}.conv3", out_channels, width, 1)
            norm(f"{block}.bn3", out_channels)
            if index == 0:
                conv(f"{block}.downsample.0", out_channels, in_channels, 1)
                norm(f"{block}.downsample.1", out_channels)
            in_channels = out_channels
    return shapes


def rename_torchvision_resnet(
    state: Mapping[str, Any],
) -> tuple[OrderedDict[str, Any], list[str]]:
    """Rename torchvision ResNet keys to ours (relative to the backbone: `stem.conv1.weight`,
    `res2.0.conv1.norm.weight`); drop `fc.*` and `num_batches_tracked`. Keys of neither kind
    are kept as they are. Returns the renamed dict and the dropped keys."""
    renamed: OrderedDict[str, Any] = OrderedDict()
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith(".num_batches_tracked"):
            dropped.append(key)
            continue
        renamed[torchvision_to_detectron2_name(key) or key] = value
    return renamed, dropped


def _depth(path: str, keys: Iterable[str]) -> int:
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    has_conv3 = False
    for key in keys:
        match = _BLOCK_NAME.fullmatch(key)
        if match:
            blocks[int(match[1])].add(int(match[2]))
            has_conv3 |= match[3] == "conv3"
    counts = tuple(len(blocks[s]) for s in (1, 2, 3, 4))
    for depth, expected in _DEPTH_TO_BLOCKS.items():
        if counts == expected and has_conv3:
            return depth
    if not has_conv3 and counts in _BASIC_BLOCK_DEPTHS:
        raise ConversionError(
            f"{path} is a ResNet-{_BASIC_BLOCK_DEPTHS[counts]} (basic blocks); the converter "
            "takes bottleneck ResNets of depth 50, 101 or 152"
        )
    raise ConversionError(
        f"{path}: a torchvision-style ResNet with {counts} blocks in layer1..layer4; expected "
        "a bottleneck ResNet-50 (3, 4, 6, 3), -101 (3, 4, 23, 3) or -152 (3, 8, 36, 3)"
    )


def convert_torchvision(data: Any, path: str, prefix: str = "backbone.") -> ConversionResult:
    """An ImageNet ResNet in torchvision's layout (a bare state dict, or under "model" or
    "state_dict") -> our names under `prefix`, for `train.init_checkpoint`."""
    state = model_state(data, path, expected="a torchvision ResNet state dict")
    state = strip_prefix(state, "module.")
    if not is_torchvision_resnet(state):
        raise ConversionError(wrong_source_message(path, "torchvision", state.keys()))
    depth = _depth(path, state.keys())
    fc_keys = [k for k in state if k.startswith("fc.")]
    counters = [k for k in state if k.endswith(".num_batches_tracked")]
    dropped = set(fc_keys) | set(counters)
    kept = OrderedDict((k, v) for k, v in state.items() if k not in dropped)
    check_layout(path, kept, resnet_layout(depth), f"torchvision's ResNet-{depth}")

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in kept.items():
        new = torchvision_to_detectron2_name(key)
        assert new is not None, key  # check_layout admitted only ResNet names
        out[prefix + new] = value
    notes = [f"torchvision ResNet-{depth}: {len(out)} tensors renamed to {prefix}*"]
    if fc_keys:
        notes.append(f"dropped the ImageNet classifier: {first(fc_keys)}")
    if counters:
        notes.append(f"dropped {len(counters)} BatchNorm num_batches_tracked counters")
    if depth != 50:
        notes.append(
            f"the bundled configs build a ResNet-50; set model.backbone.stages.depth={depth}"
        )
    return ConversionResult(model=out, notes=notes)


def _rename_on_load(checkpoint: dict[str, Any], path: str, model_keys: Set[str]) -> str | None:
    """A torchvision ResNet loaded into a model in detectron2's names: renamed, then matched to
    the model by suffix (`res2.0.conv1.weight` finds `backbone.res2.0.conv1.weight`)."""
    if "conv1.weight" in model_keys:  # the model itself uses torchvision's names
        return None
    renamed, dropped = rename_torchvision_resnet(checkpoint["model"])
    checkpoint["model"] = renamed
    checkpoint["matching_heuristics"] = True
    classifier = sorted(k for k in dropped if not k.endswith("num_batches_tracked"))
    return (
        f"{path} is a torchvision ResNet: renamed its keys to detectron2's ResNet names "
        f"(conv1 -> stem.conv1, layer1 -> res2, bn1 -> conv1.norm, downsample -> "
        f"shortcut) and dropped {len(dropped)} keys without a counterpart"
        + (f" ({', '.join(classifier)} and the BatchNorm counters)" if classifier else "")
    )


register_layout(
    "torchvision",
    is_torchvision_resnet,
    hint="{path} is a torchvision ResNet (conv1.weight, layer1.*), not {expected}: "
    "use --source torchvision",
    on_load=_rename_on_load,
)
register_converter(
    "torchvision", convert_torchvision, description="a torchvision ResNet state dict"
)
