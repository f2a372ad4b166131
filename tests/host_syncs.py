"""Finds the places where the host reads a tensor's values (on a GPU: a sync with the device).

`HostReads` records, for each such read, the innermost frame in this repository: a read of a
scalar (`item()`, `bool()`, `int()`, `float()`), `tolist()`, `numpy()`, and a copy to the CPU
(`cpu()`). The instrumented code runs on the CPU here, so the mode also tracks which tensors are
host copies (results of `cpu()` and everything computed from them): reading those needs no
sync on a GPU and is not recorded.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_THIS_FILE = os.path.abspath(__file__)
_SCALAR_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
}
_MARK = "_host_copy"


def _is_host_copy(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and getattr(tensor, _MARK, False)


def _site() -> str:
    """`path:function` of the innermost frame in the repository (tests excluded)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _THIS_FILE or not path.startswith(REPO_ROOT + os.sep):
            continue
        relative = os.path.relpath(path, REPO_ROOT)
        if relative.startswith("tests" + os.sep):
            continue
        return f"{relative}:{frame.name}"
    return "?"


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads: ...`; then `reads.sites` counts `(site, kind)` pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[tuple[str, str]] = Counter()
        self._patched: dict[str, object] = {}

    def record(self, kind: str) -> None:
        self.sites[(_site(), kind)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs, _ = tree_flatten((args, kwargs or {}))
        from_host = any(_is_host_copy(t) for t in inputs)
        if func in _SCALAR_READS and not from_host:
            self.record("scalar")
        out = func(*args, **(kwargs or {}))
        if from_host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    setattr(t, _MARK, True)
        return out

    def _wrap(self, name: str, kind: str, marks_result: bool) -> None:
        original = getattr(torch.Tensor, name)
        self._patched[name] = original
        mode = self

        def wrapper(tensor, *args, **kwargs):
            if not _is_host_copy(tensor):
                mode.record(kind)
            result = original(tensor, *args, **kwargs)
            if marks_result and isinstance(result, torch.Tensor):
                if result is tensor:  # already on the CPU: mark a view, not the input
                    result = result.view_as(result)
                setattr(result, _MARK, True)
            return result

        setattr(torch.Tensor, name, wrapper)

    def __enter__(self):
        self._wrap("cpu", "to CPU", marks_result=True)
        self._wrap("tolist", "tolist", marks_result=False)
        self._wrap("numpy", "numpy", marks_result=False)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)
