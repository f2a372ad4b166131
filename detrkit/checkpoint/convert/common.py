"""What every converter uses: the error and result types, reading the input, checking a state
dict against the layout it should have, and writing the output."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from detrkit.utils.file_io import atomic_write

from ..io import CheckpointError, is_tensor_dict, read_checkpoint_file, unwrap_state_dict

__all__ = [
    "ConversionError",
    "ConversionResult",
    "check_aliases",
    "check_layout",
    "first",
    "model_state",
    "read_checkpoint",
    "save_converted",
    "strip_prefix",
]


class ConversionError(CheckpointError):
    """A file the converter cannot use; the message names the file and what was expected."""


@dataclass
class ConversionResult:
    """A converted state dict (the model's key names) and what the conversion did, for the user.

    `variant` is the converter's description of the model the weights belong to (e.g. one of
    the Deformable-DETR project's `VARIANTS`), or None when the weights are a backbone alone.
    """

    model: OrderedDict[str, torch.Tensor]
    variant: Any = None
    notes: list[str] = field(default_factory=list)


def read_checkpoint(path: str) -> Any:
    """Read a .pth/.pt (weights only, plus argparse.Namespace), .pkl or .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"input {path} does not exist (or is not a file)")
    return read_checkpoint_file(path)


def model_state(data: Any, path: str, expected: str) -> OrderedDict[str, torch.Tensor]:
    """The model state dict inside a loaded file: `{"model": sd, ...}`, `{"state_dict": sd}` or
    a bare state dict; numpy arrays become tensors."""
    checkpoint = unwrap_state_dict(data)
    if checkpoint is None or not is_tensor_dict(checkpoint["model"]):
        if isinstance(data, Mapping):
            found = f"a dict with keys {first(data.keys(), 6)}"
        else:
            found = f"a {type(data).__name__}"
        raise ConversionError(
            f"{path} is not a checkpoint: it holds {found}; expected {expected} "
            "({'model': state_dict, ...} or a bare state dict of tensors)"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in checkpoint["model"].items():
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
