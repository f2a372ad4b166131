"""`DetectionCheckpointer`: saves and loads a model plus its checkpointables (trainer, EMA).

- reads `.pth`/`.pt` (weights only), detectron2-zoo `.pkl` and `.safetensors` files (`io.py`),
  laid out as `{"model": state_dict, ...}`, `{"state_dict": ...}` or a bare state dict;
- lets a registered layout rename or refuse a file in other names (a torchvision ResNet is
  renamed; an official Deformable-DETR checkpoint is refused with the conversion command; see
  `convert/registry.py`);
- matches names by suffix where the file asks for it (detectron2-zoo pickles), strips a DDP
  `module.` prefix, skips tensors whose shape differs from the model's, and reports missing and
  unexpected keys grouped by prefix;
- writes checkpoints and `last_checkpoint` atomically (temp file, fsync, rename), so a kill at
  any moment leaves the previous checkpoint and its tag intact;
- writes beside each checkpoint a `<name>.pth.sha256` file (`sha256sum -c` reads it) with the
  hash of its bytes, computed while writing; resuming verifies the checkpoint `last_checkpoint`
  names and falls back to the newest intact one when it is missing, truncated or corrupt;
- turns a failed save (full disk, permissions) into a `CheckpointError` naming the file and the
  cause, leaving no temporary file and the previous checkpoint and tag untouched.

A saved checkpoint is `{"model": state_dict, <checkpointable>: state, ..., **extra}`; the engine
passes the trainer (and EMA state) as checkpointables and `iteration` as extra data. The public
methods are those of fvcore's and detectron2's checkpointers, so fvcore's
`PeriodicCheckpointer` drives this one too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import torch
from iopath.common.file_io import PathManager
from torch import nn

from detrkit.utils import comm
from detrkit.utils.file_io import atomic_write

from .convert import find_layout
from .io import CheckpointError, CheckpointNotFoundError, read_checkpoint_file, unwrap_state_dict
from .keys import align_by_suffix, summarize_keys

__all__ = ["CHECKSUM_SUFFIX", "DetectionCheckpointer", "IncompatibleKeys", "verify_checkpoint"]

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
# files `resume_or_load` may fall back to: <prefix>_<7 digits>.pth and <prefix>_final.pth
_RESUMABLE = re.compile(r"(.+)_(\d{7}|final)\.pth")


class _HashingWriter:
    """Passes writes on to a file while hashing them, so the checksum costs no second read."""

    def __init__(self, f) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None  # torch.save reports a failed write as a RuntimeError

    def write(self, data) -> int:
        self.sha256.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def verify_checkpoint(path: str) -> str | None:
    """None when `path` matches its `.sha256` file; otherwise what is wrong with it.

    A checkpoint without a checksum file (written by another tool) passes here; reading it
    is then the only check.
    """
    if not os.path.isfile(path):
        return "missing"
    sidecar = path + CHECKSUM_SUFFIX
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar) as f:
            expected = f.read().split()[0].lower()
        actual = _file_sha256(path)
    except (OSError, IndexError) as e:
        return f"unreadable ({e})"
    if actual != expected:
        return f"corrupt: sha256 {actual[:12]}... differs from {os.path.basename(sidecar)}"
    return None


def _checkpoint_order(name: str) -> float:
    match = _RESUMABLE.fullmatch(name)
    if match is None:
        return -1.0
    return float("inf") if match.group(2) == "final" else float(match.group(2))


def _os_error_text(e: OSError) -> str:
    if e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {os.strerror(e.errno)}"
    return str(e)


class IncompatibleKeys(NamedTuple):
    """What `load_state_dict` could not match, plus the tensors skipped for their shape."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    incorrect_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, file, model


class DetectionCheckpointer:
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
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.model = model
        self.save_dir = save_dir
        self.save_to_disk = comm.is_main_process() if save_to_disk is None else save_to_disk
        self.checkpointables: dict[str, Any] = {}
        for key, obj in checkpointables.items():
            self.add_checkpointable(key, obj)
        self.logger = logger
        self.resumed_from = ""  # the file `resume_or_load` resumed from
        # fvcore's PeriodicCheckpointer deletes old checkpoints through it; local files only
        self.path_manager = PathManager()

    def add_checkpointable(self, key: str, checkpointable: Any) -> None:
        """Save and load `checkpointable` (anything with `state_dict`) under `key`."""
        if key in self.checkpointables or key == "model":
            raise KeyError(f"checkpointable name {key!r} is already used")
        if not hasattr(checkpointable, "state_dict"):
            raise TypeError(
                f"checkpointable {key!r} is a {type(checkpointable).__name__}, which has no "
                "state_dict() method"
            )
        self.checkpointables[key] = checkpointable

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
        sidecar = save_file + CHECKSUM_SUFFIX
        digest = {}

        def write_checkpoint(f) -> None:
            writer = _HashingWriter(f)
            try:
                torch.save(data, writer)
            except RuntimeError:
                if writer.error is not None:  # the cause, not torch's "unexpected pos"
                    raise writer.error from None
                raise
            digest["sha256"] = writer.sha256.hexdigest()

        try:
            atomic_write(save_file, write_checkpoint)
            line = f"{digest['sha256']}  {basename}\n".encode()
            try:
                atomic_write(sidecar, lambda f: f.write(line))
            except BaseException:
                # a checkpoint without its checksum is not left behind (nor a stale checksum)
                for leftover in (save_file, sidecar):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
                raise
            self.tag_last_checkpoint(basename)
        except OSError as e:
            raise CheckpointError(
                f"could not save checkpoint {save_file} ({_os_error_text(e)}); the previous "
                "checkpoint and last_checkpoint are unchanged"
            ) from e

    def delete_checkpoint(self, path: str) -> None:
        """Remove a checkpoint and its checksum file."""
        for name in (path, path + CHECKSUM_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically record the newest checkpoint's file name in `save_dir/last_checkpoint`."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode("utf-8")))

    # -- finding checkpoints -------------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        """Whether `save_dir` has a `last_checkpoint` tag."""
        return os.path.exists(os.path.join(self.save_dir, "last_checkpoint"))

    def get_checkpoint_file(self) -> str:
        """The checkpoint `last_checkpoint` names ("" when there is no tag)."""
        try:
            with open(os.path.join(self.save_dir, "last_checkpoint")) as f:
                last_saved = f.read().strip()
        except OSError:  # no tag (or it was just deleted by another process)
            return ""
        return os.path.join(self.save_dir, last_saved)

    def resumable_checkpoints(self) -> list[str]:
        """`<prefix>_<iteration>.pth` and `<prefix>_final.pth` in save_dir, newest first."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        names = [n for n in os.listdir(self.save_dir) if _checkpoint_order(n) >= 0]
        names.sort(key=_checkpoint_order, reverse=True)
        return [os.path.join(self.save_dir, n) for n in names]

    def get_all_checkpoint_files(self) -> list[str]:
        """Every `.pth` file in `save_dir`."""
        return [
            os.path.join(self.save_dir, name)
            for name in sorted(os.listdir(self.save_dir))
            if name.endswith(".pth") and os.path.isfile(os.path.join(self.save_dir, name))
        ]

    # -- loading -------------------------------------------------------------------------------

    def resume_or_load(self, path: str, resume: bool = True) -> dict[str, Any]:
        """With `resume` and a `last_checkpoint` in save_dir, load everything from the checkpoint
        it names (or, when that one is missing or damaged, from the newest intact one); otherwise
        load only the model weights from `path` ("" loads nothing)."""
        if resume and self.has_checkpoint():
            return self._resume()
        return self.load(path, checkpointables=[])

    def _resume(self) -> dict[str, Any]:
        """Load the newest intact checkpoint, trying `last_checkpoint`'s first.

        `resumed_from` is set to the file loaded (pruning keeps it).
        """
        named = self.get_checkpoint_file()
        candidates = [named] if named else []
        candidates += [p for p in self.resumable_checkpoints() if p != named]
        tried = []
        for candidate in candidates:
            problem = verify_checkpoint(candidate)
            if problem is None:
                try:
                    checkpoint = self._load_file(candidate)
                except CheckpointError as e:
                    problem = f"unreadable: {e}"
            if problem is not None:
                tried.append(f"{candidate} ({problem})")
                continue
            if candidate != named:
                self.logger.warning(
                    f"last_checkpoint names {named or '(nothing)'}, which is "
                    f"{tried[0].split(' (', 1)[1][:-1] if named else 'empty'}; resuming from "
                    f"{candidate}, the newest intact checkpoint"
                )
            self.logger.info(f"Resuming from {candidate}")
            self.resumed_from = candidate
            return self._apply_checkpoint(checkpoint, candidate, None)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        raise CheckpointNotFoundError(
            f"no intact checkpoint to resume from: {tag} names {named or '(nothing)'}; tried "
            f"{'; '.join(tried) or 'nothing'}. Delete {tag} to start from "
            "train.init_checkpoint"
        )

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        """Load weights (and the named checkpointables, default all) from `path`; return the
        remaining data of the checkpoint (e.g. `iteration`)."""
        if not path:
            self.logger.info("No checkpoint given: the model keeps its initialization.")
            return {}
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
        self.logger.info(f"Loading checkpoint from {path}")
        return self._apply_checkpoint(self._load_file(path), path, checkpointables)

    def _apply_checkpoint(
        self, checkpoint: dict[str, Any], path: str, checkpointables: list[str] | None
    ) -> dict[str, Any]:
        self._apply_layout_hook(checkpoint, path)
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
        data = read_checkpoint_file(filename)
        checkpoint = unwrap_state_dict(data)
        if checkpoint is None:
            top = list(data.keys())[:10] if isinstance(data, Mapping) else type(data).__name__
            raise CheckpointError(
                f"checkpoint {filename} has no model state dict: expected "
                f"{{'model': state_dict, ...}} or a bare state dict, found {top}"
            )
        return checkpoint

    def _apply_layout_hook(self, checkpoint: dict[str, Any], path: str) -> None:
        """A file in a registered layout (a torchvision ResNet, an official Deformable-DETR
        checkpoint, ...) is renamed or refused by that layout's `on_load` hook."""
        layout = find_layout(checkpoint["model"].keys())
        if layout is None or layout.on_load is None:
            return
        note = layout.on_load(checkpoint, path, set(self.model.state_dict().keys()))
        if note:
            self.logger.info(note)

    def _load_model(self, checkpoint: dict[str, Any]) -> IncompatibleKeys:
        """Load `checkpoint["model"]` into the model, skipping tensors of another shape."""
        state_dict = checkpoint.pop("model")
        loaded: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor):
                loaded[key] = value
            elif isinstance(value, np.ndarray):
                loaded[key] = torch.from_numpy(np.ascontiguousarray(value))
            elif isinstance(value, (int, float, np.number)):
                loaded[key] = torch.as_tensor(value)
            else:
                self.logger.warning(
                    f"Skipping checkpoint entry '{key}': a {type(value).__name__}, not a tensor"
                )
        # module versions, which some modules' loading reads (e.g. BatchNorm's counter)
        metadata = getattr(state_dict, "_metadata", None)
        if checkpoint.get("matching_heuristics", False):
            loaded = self._align_by_suffix(loaded)
        # a model saved inside DistributedDataParallel names everything "module.*"
        if loaded and all(key.startswith("module.") for key in loaded):
            loaded = OrderedDict((key[len("module.") :], v) for key, v in loaded.items())
            if metadata is not None:  # "module" (the model itself) becomes the root ""
                metadata = OrderedDict(
                    (k[len("module.") :] if k else k, v) for k, v in metadata.items()
                )
        if metadata is not None:
            loaded._metadata = metadata

        model_state = self.model.state_dict()
        incorrect_shapes = []
        for key in list(loaded):
            if key not in model_state:
                continue
            target = model_state[key]
            if isinstance(target, nn.parameter.UninitializedParameter):
                continue  # a lazy module takes the checkpoint's shape
            shapes = (tuple(loaded[key].shape), tuple(target.shape))
            if shapes[0] != shapes[1]:
                incorrect_shapes.append((key, *shapes))
                del loaded[key]
        result = self.model.load_state_dict(loaded, strict=False)
        return IncompatibleKeys(result.missing_keys, result.unexpected_keys, incorrect_shapes)

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

    def _log_incompatible_keys(self, incompatible: IncompatibleKeys) -> None:
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
        missing = self._drop_loaded_aliases(missing)
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

    def _drop_loaded_aliases(self, missing: list[str]) -> list[str]:
        """A tensor registered under several names (a head shared by decoder layers) is not
        missing when the checkpoint had it under one of them."""
        names_of: dict[int, set[str]] = defaultdict(set)  # id(tensor) -> all its names
        named = chain(
            self.model.named_parameters(remove_duplicate=False),
            self.model.named_buffers(remove_duplicate=False),
        )
        for name, tensor in named:
            names_of[id(tensor)].add(name)
        missing_set = set(missing)
        for names in names_of.values():
            if names & missing_set and not names <= missing_set:
                missing_set -= names
        return [key for key in missing if key in missing_set]
