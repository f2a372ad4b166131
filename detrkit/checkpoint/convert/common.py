"""What the converters share: the released variants, the result type, reading files, messages."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checkpointer import CheckpointError, _load_pkl, _load_safetensors, _load_torch

__all__ = [
    "SOURCES",
    "VARIANTS",
    "ConversionError",
    "ConversionResult",
    "Variant",
    "guess_source",
    "read_checkpoint",
]

# what each --source expects, for messages
SOURCES = {
    "official": "an official Deformable-DETR checkpoint",
    "detrex": "a detrex Deformable DETR checkpoint",
    "torchvision": "a torchvision ResNet state dict",
}


class ConversionError(CheckpointError):
    """A file the converter cannot use; the message names the file and what was expected."""


@dataclass(frozen=True)
class Variant:
    """One released Deformable-DETR model: its structure and the config that builds it."""

    name: str
    title: str
    config: str  # relative to the repository root
    num_feature_levels: int
    dilated_res5: bool
    with_box_refine: bool
    as_two_stage: bool
    official_ap: float

    @property
    def structure(self) -> tuple[int, bool, bool]:
        """What the weights alone tell apart: (levels, box refinement, two-stage)."""
        return (self.num_feature_levels, self.with_box_refine, self.as_two_stage)


_CONFIGS = "projects/deformable_detr/configs"

# The five models of the official repository's results table (ResNet-50, 50 epochs).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "single_scale", "single scale", f"{_CONFIGS}/deformable_detr_r50_single_scale_50ep.py",
            1, False, False, False, 39.4,
        ),
        Variant(
            "single_scale_dc5", "single scale DC5",
            f"{_CONFIGS}/deformable_detr_r50_single_scale_dc5_50ep.py", 1, True, False, False, 41.5,
        ),
        Variant(
            "deformable_detr", "multi-scale", f"{_CONFIGS}/deformable_detr_r50_50ep.py",
            4, False, False, False, 44.5,
        ),
        Variant(
            "refine", "+ iterative box refinement",
            f"{_CONFIGS}/deformable_detr_r50_with_box_refinement_50ep.py",
            4, False, True, False, 46.2,
        ),
        Variant(
            "two_stage", "++ two-stage", f"{_CONFIGS}/deformable_detr_r50_two_stage_50ep.py",
            4, False, True, True, 46.9,
        ),
    )
}  # fmt: skip


@dataclass
class ConversionResult:
    """A converted state dict (our key names) and what the conversion did, for the user."""

    model: OrderedDict[str, torch.Tensor]
    variant: Variant | None = None
    notes: list[str] = field(default_factory=list)


def describe_structure(structure: tuple[int, bool, bool]) -> str:
    levels, refine, two_stage = structure
    return (
        f"{levels} feature level{'s' if levels != 1 else ''}, "
        f"box refinement {'on' if refine else 'off'}, two-stage {'on' if two_stage else 'off'}"
    )


def resolve_variant(
    path: str,
    structure: tuple[int, bool, bool],
    requested: str | None,
    dilation: bool | None,
    dilation_source: str = "args.dilation",
) -> Variant:
    """The variant a file holds, from its structure, its recorded `dilation` and `--variant`.

    Single scale and single scale DC5 have identical weights; only the recorded training
    arguments (or the user) can tell them apart.
    """
    candidates = [v for v in VARIANTS.values() if v.structure == structure]
    if not candidates:
        known = "; ".join(f"{v.name}: {describe_structure(v.structure)}" for v in VARIANTS.values())
        raise ConversionError(
            f"{path}: the weights describe {describe_structure(structure)}, which is none of the "
            f"released variants ({known})"
        )
    if requested is not None and requested not in VARIANTS:
        raise ConversionError(
            f"--variant {requested!r} is unknown; accepted: {', '.join(VARIANTS)}"
        )
    if dilation is not None:
        matching = [v for v in candidates if v.dilated_res5 == bool(dilation)]
        if not matching:
            raise ConversionError(
                f"{path}: {dilation_source}={dilation} but the weights describe "
                f"{describe_structure(structure)}, and no released variant has both"
            )
        candidates = matching
    if requested is not None:
        chosen = VARIANTS[requested]
        if chosen not in candidates:
            found = " or ".join(v.name for v in candidates)
            why = f" ({dilation_source}={dilation})" if dilation is not None else ""
            raise ConversionError(
                f"--variant {requested} does not match {path}, which holds {found}{why}: "
                f"{describe_structure(structure)}"
            )
        return chosen
    if len(candidates) > 1:
        names = " or ".join(f"--variant {v.name}" for v in candidates)
        raise ConversionError(
            f"{path} holds single-scale weights but does not record {dilation_source} (single "
            f"scale and DC5 have the same weights); say which it is with {names}"
        )
    return candidates[0]


def read_checkpoint(path: str) -> Any:
    """Read a .pth/.pt (weights only, plus argparse.Namespace), .pkl or .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"input {path} does not exist (or is not a file)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pkl":
        return _load_pkl(path)
    if ext == ".safetensors":
        return _load_safetensors(path)
    return _load_torch(path)


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values())
    )


def model_state(data: Any, path: str, expected: str) -> OrderedDict[str, torch.Tensor]:
    """The model state dict inside a loaded file: `{"model": sd, ...}`, `{"state_dict": sd}` or
    a bare state dict; numpy arrays become tensors."""
    state: Any = None
    if isinstance(data, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), Mapping):
                state = data[key]
                break
        else:
            if _is_tensor_dict(data):
                state = data
    if state is None or not _is_tensor_dict(state):
        if isinstance(data, Mapping):
            found = f"a dict with keys {first(data.keys(), 6)}"
        else:
            found = f"a {type(data).__name__}"
        raise ConversionError(
            f"{path} is not a checkpoint: it holds {found}; expected {expected} "
            "({'model': state_dict, ...} or a bare state dict of tensors)"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = value
    return out


def first(items: Iterable[Any], n: int = 5) -> str:
    """`a, b, c (and 12 more)`: the first `n` items of a list, for messages."""
    items = [str(x) for x in items]
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def strip_prefix(state: OrderedDict[str, torch.Tensor], prefix: str) -> OrderedDict:
    """Remove a prefix every key carries (e.g. DistributedDataParallel's "module.")."""
    if state and all(k.startswith(prefix) for k in state):
        return OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    return state


def check_layout(
    path: str,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
) -> None:
    """Compare a state dict with the expected `{key: shape}`: unknown keys, then missing keys,
    then shapes, each a one-line error naming the file and the first offending keys."""
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise ConversionError(
            f"{path} does not match {what}: {len(unknown)} unknown keys, first: {first(unknown)}"
        )
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConversionError(
            f"{path} does not match {what}: {len(missing)} keys are missing, first: "
            f"{first(missing)}"
        )
    wrong = [
        f"{k} is {tuple(state[k].shape)}, expected {tuple(shape)}"
        for k, shape in expected.items()
        if tuple(state[k].shape) != tuple(shape)
    ]
    if wrong:
        raise ConversionError(
            f"{path} does not match {what}: {len(wrong)} tensors have other shapes, first: "
            f"{first(wrong, 3)}"
        )


def check_aliases(
    path: str, state: Mapping[str, torch.Tensor], aliases: Mapping[str, tuple[str, str]]
) -> None:
    """Keys that name one shared module in the model must hold identical tensors.

    `aliases` maps each alias key to `(canonical key, why they must be equal)`.
    """
    for alias, (canonical, why) in aliases.items():
        if not torch.equal(state[alias], state[canonical]):
            raise ConversionError(
                f"{path} contradicts itself: {alias} and {canonical} differ, but {why}"
            )


def is_torchvision_resnet(keys: Iterable[str]) -> bool:
    """True for a state dict in torchvision's ResNet names (at the top level)."""
    return {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight"} <= set(keys)


def guess_source(keys: Iterable[str]) -> str | None:
    """Which known layout a state dict's names follow, from tell-tale keys (None: none)."""
    keys = set(keys)
    if "transformer.level_embed" in keys:
        return "official"
    if "transformer.level_embeds" in keys or any(k.startswith("neck.convs.") for k in keys):
        return "detrex"
    if is_torchvision_resnet(keys):
        return "torchvision"
    if {"conv1_w", "res_conv1_bn_s"} <= keys:
        return "caffe2"
    return None


CAFFE2_MESSAGE = (
    "detectron2's MSRA ResNet in Caffe2 names (conv1_w, res_conv1_bn_s, res2_0_branch2a_w, ...), "
    "which detrkit does not convert: those weights expect BGR input in 0..255 and "
    "stride_in_1x1=True; use torchvision's ImageNet ResNet-50 (resnet50-*.pth) or detectron2's "
    "torchvision-converted R-50.pkl instead"
)


def wrong_source_message(
    path: str, source: str, keys: Iterable[str], unknown: list[str] | None = None
) -> str:
    """Why a file is not what `--source` says, and which source it looks like instead."""
    keys = list(keys)
    guess = guess_source(keys)
    expected = SOURCES[source]
    if guess == source:  # the right family of names, but not a layout we know
        guess = None
    if guess == "official":
        return (
            f"{path} is an official Deformable-DETR checkpoint (transformer.level_embed, "
            "input_proj.*, backbone.0.body.*; class heads indexed by COCO category id), not "
            f"{expected}: convert it with --source official"
        )
    if guess == "detrex":
        return (
            f"{path} already uses detrex names (transformer.level_embeds, neck.*), not "
            f"{expected}: it loads without conversion (--source detrex checks it)"
        )
    if guess == "caffe2":
        return f"{path} is {CAFFE2_MESSAGE}"
    if guess == "torchvision":
        return (
            f"{path} is a torchvision ResNet (conv1.weight, layer1.*), not {expected}: "
            "use --source torchvision"
        )
    unknown = keys if unknown is None else unknown
    return (
        f"{path} is not {expected}: {len(unknown)} of its {len(keys)} keys belong to no known "
        f"layout, first: {first(unknown)}"
    )


def read_structure(
    path: str,
    state: Mapping[str, torch.Tensor],
    source: str,
    level_key: str,
    known_keys: set[str],
    description: str,
) -> tuple[int, bool, bool]:
    """(feature levels, box refinement, two-stage) of a Deformable DETR state dict whose level
    embedding is named `level_key`; a file without it is refused, naming its unknown keys."""
    if level_key not in state:
        unknown = [k for k in state if k not in known_keys]
        if not unknown:
            raise ConversionError(
                f"{path} is not a complete {description} checkpoint: it lacks {level_key}"
            )
        raise ConversionError(wrong_source_message(path, source, state.keys(), unknown))
    levels = int(state[level_key].shape[0])
    with_box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    as_two_stage = "transformer.enc_output.weight" in state
    return levels, with_box_refine, as_two_stage
