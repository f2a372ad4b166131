"""`DetectionCheckpointer`: fvcore's Checkpointer with the file formats and safety detrkit needs.

On top of fvcore (which handles `last_checkpoint`, checkpointables, "module." prefixes and
shape-mismatched tensors) this adds:

- reading `.pth`/`.pt` with `torch.load(weights_only=True)` (plus `argparse.Namespace`, which
  official Deformable-DETR checkpoints carry, and numpy scalars), detectron2-zoo `.pkl` files
  (numpy arrays, names matched to the model by suffix) and `.safetensors`;
- checkpoints laid out as `{"model": state_dict, ...}` or as a bare state dict;
- atomic writes of checkpoints and of `last_checkpoint` (temp file, fsync, rename), so a kill at
  any moment leaves the previous checkpoint and its tag intact;
- one-line errors naming the file for missing, truncated or unsupported checkpoints, and a
  compact report of missing/unexpected keys grouped by prefix.

A saved checkpoint is `{"model": state_dict, <checkpointable>: state, ..., **extra}`; the engine
passes the trainer (and EMA state) as checkpointables and `iteration` as extra data.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from fvcore.common.checkpoint import Checkpointer, _filter_reused_missing_keys, _IncompatibleKeys
from iopath.common.file_io import PathManager
from torch import nn

from detrkit.utils import comm
from detrkit.utils.file_io import atomic_write

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "DetectionCheckpointer",
    "align_by_suffix",
    "atomic_write",
    "summarize_keys",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


# ---------------------------------------------------------------------------------------------
# atomic writes


# ---------------------------------------------------------------------------------------------
# reading files


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


def _load_pkl(path: str) -> dict[str, Any]:
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


def _load_safetensors(path: str) -> dict[str, Any]:
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


def _load_torch(path: str) -> Any:
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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()
    )


# ---------------------------------------------------------------------------------------------
# matching names by suffix


def _suffix_match(a: str, b: str) -> bool:
    """True when one key ends with the other on a '.' boundary."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return long == short or long.endswith("." + short)


def align_by_suffix(
    model_keys: Iterable[str], ckpt_keys: Iterable[str]
) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """Match checkpoint keys to model keys when one ends with the other on a '.' boundary.

    The longest match (most dotted components in common) wins, exact names first. Returns
    `{model_key: ckpt_key}` and the ambiguous cases as `(key, [equally good candidates])`;
    ambiguous keys are left unmatched.
    """
    model_keys, ckpt_keys = list(model_keys), list(ckpt_keys)
    by_last: dict[str, list[str]] = defaultdict(list)
    for ck in ckpt_keys:
        by_last[ck.rsplit(".", 1)[-1]].append(ck)

    proposals: dict[str, tuple[str, int]] = {}
    ambiguous: list[tuple[str, list[str]]] = []
    for mk in model_keys:
        candidates = [ck for ck in by_last.get(mk.rsplit(".", 1)[-1], []) if _suffix_match(mk, ck)]
        if not candidates:
            continue
        scores = {ck: min(mk.count("."), ck.count(".")) + 1 + (ck == mk) for ck in candidates}
        best = max(scores.values())
        winners = [ck for ck, s in scores.items() if s == best]
        if len(winners) > 1:
            ambiguous.append((mk, sorted(winners)))
            continue
        proposals[mk] = (winners[0], best)

    # A checkpoint key may feed one model key: the best-scoring claim keeps it.
    claims: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for mk, (ck, score) in proposals.items():
        claims[ck].append((mk, score))
    matched: dict[str, str] = {}
    for ck, claimants in claims.items():
        best = max(score for _, score in claimants)
        winners = [mk for mk, score in claimants if score == best]
        if len(winners) > 1:
            ambiguous.append((ck, sorted(winners)))
        else:
            matched[winners[0]] = ck
    return matched, ambiguous


# ---------------------------------------------------------------------------------------------
# reporting keys


def summarize_keys(keys: Iterable[str], max_lines: int = 20) -> list[str]:
    """Readable lines for many parameter names, at most `max_lines` of them.

    Keys sharing everything up to their last '.' are shown as `prefix.{a, b}`. When that gives
    too many lines, keys are grouped by prefix as `prefix.* (N keys)`, starting from the first
    name component and splitting the largest groups further while the lines fit.
    """
    keys = sorted(set(keys))
    if not keys:
        return []
    # (prefix, whether the keys continue after it) -> last components; a key without a dot
    # is its own group, so `a` is not hidden by `a.b`
    leaf_groups: dict[tuple[str, bool], list[str]] = defaultdict(list)
    for key in keys:
        head, dot, tail = key.rpartition(".")
        leaf_groups[(head, True) if dot else (key, False)].extend([tail] if dot else [])
    if len(leaf_groups) <= max_lines:
        return [_leaf_group_line(head, tails) for (head, _), tails in leaf_groups.items()]

    split = [tuple(key.split(".")) for key in keys]
    groups: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for parts in split:
        groups[parts[:1]].append(parts)
    frozen: set[tuple[str, ...]] = set()
    while True:
        expandable = [p for p, members in groups.items() if p not in frozen and len(members) > 1]
        if not expandable:
            break
        prefix = max(expandable, key=lambda p: len(groups[p]))
        children: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
        for parts in groups[prefix]:
            children[parts[: len(prefix) + 1]].append(parts)
        if len(children) == 1 and next(iter(children)) != prefix:
            groups[next(iter(children))] = groups.pop(prefix)  # a longer common prefix
        elif len(groups) - 1 + len(children) <= max_lines and len(children) > 1:
            del groups[prefix]
            groups.update(children)
        else:
            frozen.add(prefix)
    lines = []
    for prefix in sorted(groups):
        members = groups[prefix]
        if len(members) == 1:
            lines.append(".".join(members[0]))
        else:
            lines.append(f"{'.'.join(prefix)}.* ({len(members)} keys)")
    if len(lines) > max_lines:  # only when the first components alone are too many
        rest = sum(len(groups[p]) for p in sorted(groups)[max_lines - 1 :])
        lines = [*lines[: max_lines - 1], f"... and {rest} more keys"]
    return lines


def _leaf_group_line(head: str, tails: list[str]) -> str:
    if not tails:
        return head
    if len(tails) == 1:
        return f"{head}.{tails[0]}"
    return f"{head}.{{{', '.join(tails)}}}"


# ---------------------------------------------------------------------------------------------
# the checkpointer


class DetectionCheckpointer(Checkpointer):
    """Save and load models plus checkpointables (trainer, EMA) in detrkit's layout.

    Args:
        model: the model (a DDP/DataParallel wrapper is unwrapped).
        save_dir: folder for `model_*.pth` and `last_checkpoint`; "" disables saving.
        save_to_disk: defaults to True on the main process only.
        checkpointables: objects with `state_dict`/`load_state_dict`, saved under their names.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: bool | None = None,
        **checkpointables: Any,
    ) -> None:
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.logger = logger
        # Local files only: nothing is downloaded at run time.
        self.path_manager = PathManager()

    # -- saving --------------------------------------------------------------------------------

    def save(self, name: str, **kwargs: Any) -> None:
        """Write `save_dir/name.pth` atomically, then point `last_checkpoint` at it."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a file name, not a path")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically record the newest checkpoint's file name in `save_dir/last_checkpoint`."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode("utf-8")))

    # -- loading -------------------------------------------------------------------------------

    def resume_or_load(self, path: str, resume: bool = True) -> dict[str, Any]:
        """With `resume` and a `last_checkpoint` in save_dir, load everything from the checkpoint
        it names; otherwise load only the model weights from `path` ("" loads nothing)."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if not os.path.isfile(last):
                raise CheckpointNotFoundError(
                    f"{os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which does "
                    "not exist; delete last_checkpoint to start from train.init_checkpoint, or "
                    "point it at an existing model_*.pth"
                )
            return self.load(last)
        return self.load(path, checkpointables=[])

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        """Load weights (and the named checkpointables, default all) from `path`; return the
        remaining data of the checkpoint (e.g. `iteration`)."""
        if not path:
            self.logger.info("No checkpoint given: the model keeps its initialization.")
            return {}
        path = os.fspath(path)
        local = path
        if not os.path.isfile(local):
            with contextlib.suppress(Exception):
                local = self.path_manager.get_local_path(path)
        if not os.path.isfile(local):
            raise CheckpointNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
        self.logger.info(f"Loading checkpoint from {path}")
        checkpoint = self._load_file(local)
        self._convert_known_layouts(checkpoint, path)
        incompatible = self._load_model(checkpoint)
        self._log_incompatible_keys(incompatible)
        names = self.checkpointables if checkpointables is None else checkpointables
        for key in names:
            if key in checkpoint:
                self.logger.info(f"Loading {key} from {path}")
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        checkpoint.pop("matching_heuristics", None)
        return checkpoint

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Read a checkpoint file into `{"model": state_dict, ...}`."""
        ext = os.path.splitext(filename)[1].lower()
        if ext == ".pkl":
            return _load_pkl(filename)
        if ext == ".safetensors":
            return _load_safetensors(filename)
        data = _load_torch(filename)
        if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
            return dict(data)
        if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            rest = {k: v for k, v in data.items() if k != "state_dict"}
            return {"model": data["state_dict"], **rest}
        if _is_state_dict(data):
            return {"model": data}
        top = list(data.keys())[:10] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"checkpoint {filename} has no model state dict: expected {{'model': state_dict, ...}}"
            f" or a bare state dict, found {top}"
        )

    def _convert_known_layouts(self, checkpoint: dict[str, Any], path: str) -> None:
        """Recognize layouts that are not the model's own names.

        - a torchvision ResNet (`conv1.weight`, `layer1.0.conv1.weight`, `fc.*`): renamed to our
          ResNet's names (`stem.conv1.weight`, `res2.0.conv1.weight`) and matched to the model by
          suffix, so an ImageNet `.pth` initializes the backbone; `fc.*` and `num_batches_tracked`
          are dropped;
        - an official Deformable-DETR checkpoint: refused, naming the conversion command (its
          keys and its 91-way class heads need tools/convert_weights.py);
        - detectron2's MSRA Caffe2-named ResNet (`conv1_w`, `res_conv1_bn_s`): refused (BGR
          input, stride_in_1x1=True; not converted).
        """
        from .convert.common import CAFFE2_MESSAGE, guess_source
        from .convert.torchvision import rename_torchvision_resnet

        state = checkpoint["model"]
        model_keys = self.model.state_dict().keys()
        source = guess_source(state.keys())
        if source == "official" and "transformer.level_embed" not in model_keys:
            raise CheckpointError(
                f"checkpoint {path} is an official Deformable-DETR checkpoint, whose names and "
                "91-way class heads differ from this model's; convert it first: python "
                f"tools/convert_weights.py --source official --input {path} --output "
                "converted.pth, then load converted.pth"
            )
        if source == "caffe2" and "conv1_w" not in model_keys:
            raise CheckpointError(f"checkpoint {path} is {CAFFE2_MESSAGE}")
        if source == "torchvision" and "conv1.weight" not in model_keys:
            renamed, dropped = rename_torchvision_resnet(state)
            checkpoint["model"] = renamed
            checkpoint["matching_heuristics"] = True
            classifier = sorted(k for k in dropped if not k.endswith("num_batches_tracked"))
            self.logger.info(
                f"{path} is a torchvision ResNet: renamed its keys to detectron2's ResNet names "
                f"(conv1 -> stem.conv1, layer1 -> res2, bn1 -> conv1.norm, downsample -> "
                f"shortcut) and dropped {len(dropped)} keys without a counterpart"
                + (f" ({', '.join(classifier)} and the BatchNorm counters)" if classifier else "")
            )

    def _load_model(self, checkpoint: dict[str, Any]) -> _IncompatibleKeys:
        state_dict = checkpoint["model"]
        converted = OrderedDict()
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor):
                converted[key] = value
            elif isinstance(value, np.ndarray):
                converted[key] = torch.from_numpy(np.ascontiguousarray(value))
            elif isinstance(value, (int, float, np.number)):
                converted[key] = torch.as_tensor(value)
            else:
                self.logger.warning(
                    f"Skipping checkpoint entry '{key}': a {type(value).__name__}, not a tensor"
                )
        if hasattr(state_dict, "_metadata"):
            converted._metadata = state_dict._metadata
        if checkpoint.get("matching_heuristics", False):
            converted = self._align_by_suffix(converted)
        checkpoint["model"] = converted
        # fvcore strips a DDP "module." prefix and skips tensors whose shape differs.
        return super()._load_model(checkpoint)

    def _align_by_suffix(self, state_dict: dict[str, torch.Tensor]) -> OrderedDict:
        model_keys = list(self.model.state_dict().keys())
        matched, ambiguous = align_by_suffix(model_keys, state_dict.keys())
        for key, candidates in ambiguous:
            self.logger.warning(
                f"Ambiguous name match for '{key}': {', '.join(candidates)} match equally well; "
                "not loaded"
            )
        renamed = OrderedDict((mk, state_dict[ck]) for mk, ck in matched.items())
        used = set(matched.values())
        for ck, value in state_dict.items():  # unmatched keys are reported as unexpected
            if ck not in used and ck not in renamed:
                renamed[ck] = value
        examples = [f"{ck} -> {mk}" for mk, ck in matched.items() if mk != ck][:2]
        self.logger.info(
            f"Matched {len(matched)} of {len(model_keys)} model keys to the checkpoint by name "
            f"suffix" + (f" (e.g. {', '.join(examples)})" if examples else "")
        )
        return renamed

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        skipped = incompatible.incorrect_shapes
        if skipped:
            # one block per (checkpoint shape, model shape), naming every key
            by_shapes: dict[tuple, list[str]] = defaultdict(list)
            for key, shape_checkpoint, shape_model in skipped:
                by_shapes[(tuple(shape_checkpoint), tuple(shape_model))].append(key)
            lines = []
            for (shape_checkpoint, shape_model), keys in by_shapes.items():
                lines.append(f"{shape_checkpoint} in the checkpoint, {shape_model} in the model:")
                lines.extend(f"  {line}" for line in summarize_keys(keys, max_lines=30))
            self.logger.warning(
                f"Skip loading {len(skipped)} tensors whose shape differs between the checkpoint "
                "and the model; they keep the model's initialization (expected for class heads "
                "when fine-tuning to a new number of classes):\n  " + "\n  ".join(lines)
            )
        skipped_keys = {key for key, _, _ in skipped}
        missing = [k for k in incompatible.missing_keys if k not in skipped_keys]
        missing = _filter_reused_missing_keys(self.model, missing)
        if missing:
            self.logger.warning(
                f"{len(missing)} model parameters or buffers are not in the checkpoint:\n  "
                + "\n  ".join(summarize_keys(missing))
            )
        if incompatible.unexpected_keys:
            self.logger.warning(
                f"{len(incompatible.unexpected_keys)} checkpoint keys are not used by the model:"
                "\n  " + "\n  ".join(summarize_keys(incompatible.unexpected_keys))
            )
