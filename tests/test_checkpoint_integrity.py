"""Checkpoint integrity: the `.sha256` file beside each checkpoint, falling back to the newest
intact checkpoint on resume, pruning that keeps what a resume needs, and saves into a full disk
(an injected ENOSPC, and a real 1 MiB tmpfs where one can be mounted)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import subprocess
import types

import pytest
import torch
from helpers import capture_logs
from torch import nn

import detrkit.checkpoint.checkpointer as ckpt_module
from detrkit.checkpoint import CheckpointError, CheckpointNotFoundError, DetectionCheckpointer
from detrkit.engine.hooks import PeriodicCheckpointer


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)


def _save(checkpointer: DetectionCheckpointer, iteration: int) -> dict[str, torch.Tensor]:
    """Fresh random weights saved as model_{iteration}; returns them."""
    with torch.no_grad():
        for p in checkpointer.model.parameters():
            p.copy_(torch.randn_like(p))
    checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    return {k: v.clone() for k, v in checkpointer.model.state_dict().items()}


def _assert_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_checksum_file_is_the_sha256_of_the_checkpoint(tmp_path):
    _save(DetectionCheckpointer(Net(), str(tmp_path)), 4)
    data = (tmp_path / "model_0000004.pth").read_bytes()
    line = (tmp_path / "model_0000004.pth.sha256").read_text()
    assert line == f"{hashlib.sha256(data).hexdigest()}  model_0000004.pth\n"
    if shutil.which("sha256sum"):  # the format the coreutils tool checks
        check = subprocess.run(
            ["sha256sum", "-c", "model_0000004.pth.sha256"], cwd=tmp_path, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def _flip_one_tensor_byte(path):
    # a silent bit flip in a weight: torch.load still succeeds, only the checksum tells
    weight = torch.load(path, weights_only=True)["model"]["fc.weight"]
    data = bytearray(path.read_bytes())
    position = data.index(weight.numpy().tobytes()) + 5
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [_truncate, _random_bytes, _flip_one_tensor_byte, lambda p: p.unlink()]
)
def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    older = _save(checkpointer, 4)
    good = _save(checkpointer, 9)
    _save(checkpointer, 14)
    damage(tmp_path / "model_0000014.pth")

    restored = Net()
    resumer = DetectionCheckpointer(restored, str(tmp_path))
    with capture_logs("detrkit.checkpoint", logging.WARNING) as records:
        extra = resumer.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    _assert_weights(restored, good)
    assert not any(torch.equal(restored.fc.weight, older[k]) for k in ["fc.weight"])
    assert resumer.resumed_from == str(tmp_path / "model_0000009.pth")
    warnings = [r.getMessage() for r in records]
    assert len(warnings) == 1
    assert str(tmp_path / "model_0000014.pth") in warnings[0]
    assert str(tmp_path / "model_0000009.pth") in warnings[0]


def test_flipped_byte_would_load_silently_without_the_checksum(tmp_path):
    """The oracle for the test above: the damaged file is still a loadable checkpoint."""
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    saved = _save(checkpointer, 4)
    _flip_one_tensor_byte(tmp_path / "model_0000004.pth")
    loaded = torch.load(tmp_path / "model_0000004.pth", weights_only=True)["model"]
    assert not all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_empty_last_checkpoint_tag_falls_back_to_the_newest_file(tmp_path):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    _save(checkpointer, 4)
    good = _save(checkpointer, 9)
    (tmp_path / "last_checkpoint").write_text("")
    restored = Net()
    assert DetectionCheckpointer(restored, str(tmp_path)).resume_or_load("")["iteration"] == 9
    _assert_weights(restored, good)


def test_no_intact_checkpoint_is_a_one_line_error_listing_what_was_tried(tmp_path):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    _save(checkpointer, 4)
    _save(checkpointer, 9)
    _truncate(tmp_path / "model_0000009.pth")
    _random_bytes(tmp_path / "model_0000004.pth")
    with pytest.raises(CheckpointNotFoundError) as info:
        DetectionCheckpointer(Net(), str(tmp_path)).resume_or_load("", resume=True)
    message = str(info.value)
    assert "\n" not in message
    assert "no intact checkpoint" in message
    position_9 = message.index(str(tmp_path / "model_0000009.pth"))
    position_4 = message.index(str(tmp_path / "model_0000004.pth"))
    assert position_9 < position_4  # newest first


def test_checkpoint_without_checksum_file_is_still_resumed(tmp_path):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    good = _save(checkpointer, 4)
    (tmp_path / "model_0000004.pth.sha256").unlink()
    restored = Net()
    assert DetectionCheckpointer(restored, str(tmp_path)).resume_or_load("")["iteration"] == 4
    _assert_weights(restored, good)


# --- pruning ------------------------------------------------------------------------------------


def _periodic(checkpointer, *, iteration: int, max_iter: int = 100, max_to_keep: int = 1):
    hook = PeriodicCheckpointer(checkpointer, period=5, max_to_keep=max_to_keep)
    hook.trainer = types.SimpleNamespace(iter=iteration, max_iter=max_iter)
    hook.before_train()
    return hook


def _run(hook, iterations) -> None:
    for i in iterations:
        hook.trainer.iter = i
        hook.after_step()


def test_pruning_keeps_the_checkpoint_resumed_from(tmp_path):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    _run(_periodic(checkpointer, iteration=0), range(15))
    # max_to_keep=1: only the newest periodic checkpoint is left
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000014.pth"]
    _truncate(tmp_path / "model_0000014.pth")
    shutil.copy(tmp_path / "model_0000014.pth", tmp_path / "model_0000009.pth")  # damaged too

    # keep a good older one by hand and resume: it becomes the file resumed from
    _save(checkpointer, 4)
    (tmp_path / "last_checkpoint").write_text("model_0000014.pth")
    resumer = DetectionCheckpointer(Net(), str(tmp_path))
    assert resumer.resume_or_load("")["iteration"] == 4
    hook = _periodic(resumer, iteration=4)
    _run(hook, range(5, 25))
    names = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert names == ["model_0000004.pth", "model_0000024.pth"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [n + ".sha256" for n in names]


def test_pruning_never_deletes_the_newest(tmp_path):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    hook = _periodic(checkpointer, iteration=0, max_to_keep=2)
    _run(hook, range(20))
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000014.pth",
        "model_0000019.pth",
    ]
    # the same iteration saved again (a preemption save right after a periodic one) is no new
    # file: nothing is pruned for it
    hook.save_periodic(19)
    assert len(list(tmp_path.glob("model_*.pth"))) == 2


# --- full disks ---------------------------------------------------------------------------------


def _assert_previous_state_intact(folder, expected: dict[str, torch.Tensor]) -> None:
    assert (folder / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(os.listdir(folder)) == [
        "last_checkpoint",
        "model_0000004.pth",
        "model_0000004.pth.sha256",
    ]
    restored = Net(expected["fc.weight"].shape[0])
    assert DetectionCheckpointer(restored, str(folder)).resume_or_load("")["iteration"] == 4
    _assert_weights(restored, expected)


def test_enospc_during_the_write_is_one_line_naming_the_file(tmp_path, monkeypatch):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    good = _save(checkpointer, 4)
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_module.torch, "save", disk_fills_up)
    with pytest.raises(CheckpointError) as info:
        _save(checkpointer, 9)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "model_0000009.pth") in message
    assert "No space left on device" in message
    _assert_previous_state_intact(tmp_path, good)


def test_enospc_on_the_checksum_file_leaves_no_unverified_checkpoint(tmp_path, monkeypatch):
    checkpointer = DetectionCheckpointer(Net(), str(tmp_path))
    good = _save(checkpointer, 4)
    real_atomic_write = ckpt_module.atomic_write

    def full_at_checksum(path, write):
        if str(path).endswith(".sha256"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_atomic_write(path, write)

    monkeypatch.setattr(ckpt_module, "atomic_write", full_at_checksum)
    with pytest.raises(CheckpointError, match=r"model_0000009\.pth .*ENOSPC"):
        _save(checkpointer, 9)
    monkeypatch.setattr(ckpt_module, "atomic_write", real_atomic_write)
    _assert_previous_state_intact(tmp_path, good)


@contextlib.contextmanager
def _small_tmpfs(folder, size: str):
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_save_into_a_full_tmpfs(tmp_path):
    with _small_tmpfs(tmp_path / "small", "1m") as folder:
        # 384 x 384 float32 weights: ~590 KB per checkpoint; the second one cannot fit in 1 MiB
        checkpointer = DetectionCheckpointer(Net(384), str(folder))
        good = _save(checkpointer, 4)
        with pytest.raises(CheckpointError) as info:
            _save(checkpointer, 9)
        message = str(info.value)
        assert "\n" not in message
        assert str(folder / "model_0000009.pth") in message
        assert "No space left on device" in message
        _assert_previous_state_intact(folder, good)
