"""Reading checkpoint files, and finding the model's state dict inside what was read.

- `load_torch_file` (.pth/.pt): `torch.load(weights_only=True)`, plus `argparse.Namespace` and
  numpy scalars; anything else (code, custom classes) is refused, naming it.
- `load_pkl_file` (.pkl): detectron2 model-zoo pickles, numpy arrays in dicts only.
- `load_safetensors_file` (.safetensors).
- `read_checkpoint_file`: one of the three, by the file's extension.
- `unwrap_state_dict`: `{"model": sd, ...}`, `{"state_dict": sd, ...}` or a bare `sd`, as
  `{"model": sd, ...}`; `is_tensor_dict` tells whether an object is a state dict.

Every error is a `CheckpointError` whose one-line message names the file and what is wrong.
Both `DetectionCheckpointer` and the weight converters read files through this module.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "is_tensor_dict",
    "load_pkl_file",
    "load_safetensors_file",
    "load_torch_file",
    "read_checkpoint_file",
    "unwrap_state_dict",
]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def _numpy_safe_globals() -> list[Any]:
    """Globals needed to unpickle numpy scalars and dtypes (e.g. a float logged by a hook)."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [
        type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")
    ]
    allowed: list[Any] = [core.multiarray.scalar, np.dtype, *dtypes]
    if core is not getattr(np, "core", None):
        # numpy >= 2 keeps them in numpy._core; files written under numpy 1.x name numpy.core
        allowed.append((core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    return allowed


_TORCH_SAFE_GLOBALS = [argparse.Namespace, *_numpy_safe_globals()]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles detectron2-zoo `.pkl` files: containers of numpy arrays, nothing executable."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (
            module.startswith("numpy") and name.endswith("DType")
        ):
            module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_pkl_file(path: str) -> dict[str, Any]:
    """Read a detectron2-zoo `.pkl` (numpy arrays in dicts, nothing executable) as
    `{"model": arrays, ..., "matching_heuristics": True}`: its names are relative to some
    submodule, so they are matched to the model by suffix. A Caffe2 `blobs` pickle is refused."""
    with open(path, "rb") as f:
        try:
            data = _ArrayUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            reason = str(e)
            if re.fullmatch(r"[\w.]+", reason):  # our refusal: the name of the global
                raise CheckpointError(
                    f"checkpoint {path} contains a pickled object of type {reason}; .pkl weight "
                    "files may only hold numpy arrays in dicts (detectron2's model-zoo format)"
                ) from None
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a pickle file: {e}"
            ) from None
        except Exception as e:  # garbage input can fail in many ways; all mean "not readable"
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a pickle file: {type(e).__name__}: {e}"
            ) from None
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(data).__name__}; expected a dict of arrays"
        )
    if "blobs" in data:
        raise CheckpointError(
            f"checkpoint {path} is a Caffe2 'blobs' pickle, whose names detrkit does not convert; "
            "use a torchvision- or detectron2-style weight file (tools/convert_weights.py)"
        )
    if "model" in data and isinstance(data["model"], Mapping):
        out = dict(data)
    else:  # a bare dict of arrays (pycls-style)
        out = {"model": dict(data)}
    # Model-zoo pickles use names relative to some submodule (e.g. "res2.0.conv1.weight" for the
    # backbone): match them to the model by suffix.
    out["matching_heuristics"] = True
    return out


def load_safetensors_file(path: str) -> dict[str, Any]:
    """Read a `.safetensors` file as `{"model": tensors}` (needs the safetensors package)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"reading {path} needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return {"model": load_file(path, device="cpu")}
    except Exception as e:  # SafetensorError, OSError, ...: not a readable file
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a safetensors file: {e}"
        ) from None


def load_torch_file(path: str) -> Any:
    """Read a torch file with `weights_only=True`: tensors, plain containers, numbers, strings,
    numpy scalars and `argparse.Namespace` (official Deformable-DETR files carry one)."""
    try:
        with torch.serialization.safe_globals(_TORCH_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = found.group(1) if found else "objects other than tensors and plain containers"
            raise CheckpointError(
                f"checkpoint {path} contains {what}, which detrkit does not unpickle (it reads "
                "tensors, plain containers, numbers, strings and argparse.Namespace). If you "
                "trust the file, re-save its state dict with torch.save or convert it with "
                "tools/convert_weights.py"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch file: {e}") from None
    except Exception as e:  # garbage input can fail in many ways; all mean "not readable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        first = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch file: {first}"
        ) from None


def read_checkpoint_file(path: str) -> Any:
    """Read a checkpoint by its extension: `.pkl`, `.safetensors`, else a torch file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pkl":
        return load_pkl_file(path)
    if ext == ".safetensors":
        return load_safetensors_file(path)
    return load_torch_file(path)


def is_tensor_dict(obj: Any) -> bool:
    """True for a non-empty mapping of names to tensors (or numpy arrays): a state dict."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values())
    )


def unwrap_state_dict(obj: Any) -> dict[str, Any] | None:
    """A loaded checkpoint as `{"model": state_dict, **other entries}`, or None when it holds no
    state dict.

    Accepted: `{"model": sd, ...}` (detectron2, detrex, official Deformable-DETR),
    `{"state_dict": sd, ...}` (e.g. PyTorch Lightning) and a bare state dict. The mapping found
    under "model" or "state_dict" is returned as it is; callers check its values.
    """
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("model"), Mapping):
        return dict(obj)
    if isinstance(obj.get("state_dict"), Mapping):
        rest = {k: v for k, v in obj.items() if k != "state_dict"}
        return {"model": obj["state_dict"], **rest}
    if is_tensor_dict(obj):
        return {"model": obj}
    return None
