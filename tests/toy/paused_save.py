"""Run tools/train_net.py with checkpoint writes that stall half-way, so a test can SIGKILL the
process in the middle of writing a checkpoint.

    TOY_PAUSE_AT_SAVE=2 TOY_PAUSE_MARKER=/tmp/m python tests/toy/paused_save.py <train_net args>

The N-th `torch.save` into an open file writes the first half of the serialized checkpoint,
flushes it to disk, creates the marker file and then sleeps until killed. Every other save is
untouched. Nothing in the product knows about this: only `torch.save` is replaced.
"""

from __future__ import annotations

import io
import os
import runpy
import sys
import time

import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TRAIN_NET = os.path.join(_REPO_ROOT, "tools", "train_net.py")

_pause_at = int(os.environ["TOY_PAUSE_AT_SAVE"])
_marker = os.environ["TOY_PAUSE_MARKER"]
_real_save = torch.save
_file_saves = 0


def _stalling_save(obj, f, *args, **kwargs):
    global _file_saves
    if not hasattr(f, "write"):  # a path: not the checkpointer's temp-file write
        return _real_save(obj, f, *args, **kwargs)
    _file_saves += 1
    if _file_saves != _pause_at:
        return _real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    with open(_marker, "w") as m:
        m.write(f"{len(data) // 2} of {len(data)} bytes written\n")
    while True:  # wait for SIGKILL
        time.sleep(0.5)


torch.save = _stalling_save

if __name__ == "__main__":
    sys.argv = [_TRAIN_NET, *sys.argv[1:]]
    sys.path.insert(0, os.path.dirname(_TRAIN_NET))
    runpy.run_path(_TRAIN_NET, run_name="__main__")
