"""DetectionCheckpointer: formats, name matching, reports, atomic saves, clear errors."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import detrkit.checkpoint.checkpointer as ckpt_module
from detrkit.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    DetectionCheckpointer,
    align_by_suffix,
    summarize_keys,
)

LOGGER = "detrkit.checkpoint.checkpointer"


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.res2 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


class Detector(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.backbone = Backbone()
        self.class_embed = nn.Linear(4, num_classes)
        self.bbox_embed = nn.Linear(4, 4)


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    return model


def _assert_same_weights(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model, optimizer):
    loss = model.bbox_embed(torch.randn(2, 4)).sum() + model.class_embed(torch.randn(2, 4)).sum()
    loss.backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------
# save / load / resume


def test_save_load_round_trip_with_checkpointables(tmp_path):
    model = _randomize(Detector())
    optimizer = _optimizer(model)
    _step(model, optimizer)
    iteration = random.randint(1, 10_000)
    DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer).save(
        "model_0000009", iteration=iteration
    )

    saved = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert set(saved) == {"model", "optimizer", "iteration"}
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"

    fresh = Detector()
    fresh_opt = _optimizer(fresh)
    extra = DetectionCheckpointer(fresh, str(tmp_path), optimizer=fresh_opt).load(
        str(tmp_path / "model_0000009.pth")
    )
    _assert_same_weights(model, fresh)
    assert extra == {"iteration": iteration}
    state, fresh_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert state and state.keys() == fresh_state.keys()
    for index in state:
        assert torch.equal(fresh_state[index]["momentum_buffer"], state[index]["momentum_buffer"])


def test_resume_or_load_prefers_last_checkpoint(tmp_path):
    model = _randomize(Detector())
    optimizer = _optimizer(model)
    checkpointer = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_0000009", iteration=9)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _randomize(model)
    _step(model, optimizer)
    checkpointer.save("model_0000019", iteration=19)

    init = tmp_path / "init.pth"
    torch.save({"model": first}, init)

    fresh = Detector()
    fresh_opt = _optimizer(fresh)
    resumer = DetectionCheckpointer(fresh, str(tmp_path), optimizer=fresh_opt)
    assert resumer.has_checkpoint()
    assert resumer.get_checkpoint_file() == str(tmp_path / "model_0000019.pth")
    extra = resumer.resume_or_load(str(init), resume=True)
    assert extra["iteration"] == 19
    _assert_same_weights(model, fresh)
    assert fresh_opt.state_dict()["state"]  # optimizer state restored on resume

    other = Detector()
    other_opt = _optimizer(other)
    DetectionCheckpointer(other, str(tmp_path), optimizer=other_opt).resume_or_load(
        str(init), resume=False
    )
    for key, value in first.items():
        assert torch.equal(other.state_dict()[key], value), key
    assert not other_opt.state_dict()["state"]  # weights only without resume


def test_resume_with_dangling_last_checkpoint_names_it(tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    checkpointer = DetectionCheckpointer(Detector(), str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match=r"last_checkpoint names .*model_0000099"):
        checkpointer.resume_or_load("", resume=True)


def test_save_to_disk_false_writes_nothing(tmp_path):
    DetectionCheckpointer(Detector(), str(tmp_path), save_to_disk=False).save("model_final")
    assert os.listdir(tmp_path) == []


def test_empty_path_loads_nothing(tmp_path):
    model = _randomize(Detector())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert DetectionCheckpointer(model).load("") == {}
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


# ---------------------------------------------------------------------------------------------
# formats


def test_bare_state_dict_and_official_checkpoint_with_namespace(tmp_path):
    source = _randomize(Detector())
    bare = tmp_path / "bare.pt"
    torch.save(source.state_dict(), bare)
    target = Detector()
    DetectionCheckpointer(target).load(str(bare))
    _assert_same_weights(source, target)

    official = tmp_path / "checkpoint0049.pth"
    args = argparse.Namespace(lr=2e-4, lr_backbone=2e-5, two_stage=False)
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 49, "args": args}, official)
    target = Detector()
    extra = DetectionCheckpointer(target).load(str(official))
    _assert_same_weights(source, target)
    assert extra["args"].lr_backbone == 2e-5 and extra["epoch"] == 49


def test_numpy_scalars_in_extra_data_load(tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"model": Detector().state_dict(), "best_ap": np.float64(41.5)}, path)
    extra = DetectionCheckpointer(Detector()).load(str(path))
    assert extra["best_ap"] == 41.5


def test_numpy_1_scalars_load_under_numpy_2(tmp_path):
    # a file written under numpy 1.x names its scalars numpy.core.multiarray.scalar; the legacy
    # (non-zip) format is a plain pickle stream, so the global can be renamed in place
    if not hasattr(np, "_core"):
        pytest.skip("numpy 1.x writes these names itself")
    path = tmp_path / "np1.pth"
    state = {"model": Detector().state_dict(), "best_ap": np.float64(41.5)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    extra = DetectionCheckpointer(Detector()).load(str(path))
    assert extra["best_ap"] == 41.5


class NotAllowed:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused_naming_them(tmp_path):
    path = tmp_path / "weird.pth"
    torch.save({"model": Detector().state_dict(), "thing": NotAllowed()}, path)
    with pytest.raises(CheckpointError) as info:
        DetectionCheckpointer(Detector()).load(str(path))
    message = str(info.value)
    assert str(path) in message and "NotAllowed" in message

    # numpy scalars are admitted in a .pth, numpy arrays are not (they belong in a .pkl)
    path = tmp_path / "array.pth"
    torch.save({"model": Detector().state_dict(), "mean": np.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"array\.pth contains numpy\S*_reconstruct"):
        DetectionCheckpointer(Detector()).load(str(path))


def test_pkl_holding_torch_tensors_is_refused(tmp_path):
    path = tmp_path / "tensors.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"weight": torch.zeros(2)}}, f)
    with pytest.raises(
        CheckpointError, match=r"tensors\.pkl contains a pickled object of type torch"
    ):
        DetectionCheckpointer(Detector()).load(str(path))


def test_pkl_numpy_weights_matched_by_suffix(tmp_path, caplog):
    source = _randomize(Detector())
    backbone_arrays = {
        key: value.numpy() for key, value in source.backbone.state_dict().items()
    }  # names relative to the backbone, as in R-50.pkl
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": backbone_arrays, "__author__": "torchvision", "matching_heuristics": True}, f
        )
    target = Detector()
    head_before = target.class_embed.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        DetectionCheckpointer(target).load(str(path))
    _assert_same_weights(source.backbone, target.backbone)
    assert torch.equal(target.class_embed.weight, head_before)
    assert "not in the checkpoint" in caplog.text and "class_embed" in caplog.text

    raw = tmp_path / "raw.pkl"  # a bare dict of arrays
    with open(raw, "wb") as f:
        pickle.dump({"stem.weight": backbone_arrays["stem.weight"]}, f)
    target = Detector()
    DetectionCheckpointer(target).load(str(raw))
    assert torch.equal(target.backbone.stem.weight, source.backbone.stem.weight)


def test_pkl_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": os.getcwd}}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pkl.*getcwd"):
        DetectionCheckpointer(Detector()).load(str(path))


def test_align_by_suffix_longest_match_and_ambiguity():
    model_keys = [
        "backbone.body.layer1.weight",
        "transformer.encoder.norm.weight",
        "transformer.decoder.norm.weight",
        "class_embed.weight",
    ]
    ckpt_keys = [
        "layer1.weight",
        "body.layer1.weight",
        "norm.weight",
        "module.class_embed.weight",
    ]
    matched, ambiguous = align_by_suffix(model_keys, ckpt_keys)
    assert matched["backbone.body.layer1.weight"] == "body.layer1.weight"
    assert matched["class_embed.weight"] == "module.class_embed.weight"
    assert "transformer.encoder.norm.weight" not in matched
    assert "transformer.decoder.norm.weight" not in matched
    assert (
        "norm.weight",
        ["transformer.decoder.norm.weight", "transformer.encoder.norm.weight"],
    ) in ambiguous
    # no partial-component matches: "ayer1.weight" is not a suffix on a '.' boundary
    matched, _ = align_by_suffix(["backbone.layer1.weight"], ["ayer1.weight"])
    assert matched == {}


def test_ambiguous_pkl_names_are_reported_and_not_loaded(tmp_path, caplog):
    model = nn.Module()
    model.a = nn.Linear(2, 2)
    model.b = nn.Linear(2, 2)
    before = model.a.weight.detach().clone()
    path = tmp_path / "amb.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"weight": np.ones((2, 2), dtype=np.float32)}}, f)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DetectionCheckpointer(model).load(str(path))
    assert torch.equal(model.a.weight, before)
    assert "Ambiguous" in caplog.text and "a.weight" in caplog.text and "b.weight" in caplog.text


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = _randomize(Detector())
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(source.state_dict(), str(path))
    target = Detector()
    DetectionCheckpointer(target).load(str(path))
    _assert_same_weights(source, target)


def test_safetensors_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("no safetensors")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"")
    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(CheckpointError, match=r"m\.safetensors needs the safetensors package"):
        DetectionCheckpointer(Detector()).load(str(path))


# ---------------------------------------------------------------------------------------------
# incompatible keys


def test_shape_mismatch_is_skipped_with_a_warning(tmp_path, caplog):
    source = _randomize(Detector(num_classes=91))
    path = tmp_path / "coco91.pth"
    torch.save({"model": source.state_dict()}, path)
    target = Detector(num_classes=5)
    head_before = target.class_embed.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DetectionCheckpointer(target).load(str(path))
    assert torch.equal(target.class_embed.weight, head_before)
    _assert_same_weights(source.backbone, target.backbone)
    assert torch.equal(target.bbox_embed.weight, source.bbox_embed.weight)
    assert "class_embed.weight" in caplog.text
    assert "(91, 4)" in caplog.text and "(5, 4)" in caplog.text


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    state = Detector().state_dict()
    del state["bbox_embed.weight"], state["bbox_embed.bias"]
    state["extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DetectionCheckpointer(Detector()).load(str(path))
    assert "2 model parameters or buffers are not in the checkpoint" in caplog.text
    assert "bbox_embed.{bias, weight}" in caplog.text
    assert "1 checkpoint keys are not used by the model" in caplog.text
    assert "extra_head.weight" in caplog.text


def test_ddp_prefix_is_stripped(tmp_path, caplog):
    source = _randomize(Detector())
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "ddp.pth"
    torch.save({"model": state}, path)
    target = Detector()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DetectionCheckpointer(target).load(str(path))
    _assert_same_weights(source, target)
    assert "not in the checkpoint" not in caplog.text and "not used" not in caplog.text


class SharedHeads(nn.Module):
    """One head registered under two names, as Deformable DETR shares its class heads."""

    def __init__(self):
        super().__init__()
        head = nn.Linear(4, 3)
        self.class_embed = nn.ModuleList([head, head])
        self.other = nn.Linear(4, 2)


def test_a_shared_tensor_saved_under_one_of_its_names_is_not_missing(tmp_path, caplog):
    source = _randomize(SharedHeads())
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("class_embed.1.")}
    del state["other.bias"]
    path = tmp_path / "one_name.pth"
    torch.save(state, path)
    target = SharedHeads()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DetectionCheckpointer(target).load(str(path))
    assert torch.equal(target.class_embed[1].weight, source.class_embed[0].weight)
    assert "1 model parameters or buffers are not in the checkpoint" in caplog.text
    assert "other.bias" in caplog.text and "class_embed.1" not in caplog.text


def test_state_dict_entry_is_the_model(tmp_path):
    source = _randomize(Detector())
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    target = Detector()
    extra = DetectionCheckpointer(target).load(str(path))
    _assert_same_weights(source, target)
    assert extra == {"epoch": 3}


def test_a_registered_layout_renames_a_file_on_load(tmp_path, monkeypatch, caplog):
    from detrkit.checkpoint.convert import register_layout, registry

    monkeypatch.setattr(registry, "_LAYOUTS", dict(registry._LAYOUTS))  # undone after the test

    def rename(checkpoint, path, model_keys):
        assert "class_embed.weight" in model_keys
        old = checkpoint["model"]
        checkpoint["model"] = {k.replace("cls_head.", "class_embed."): v for k, v in old.items()}
        return f"{path} is in toy names: renamed cls_head -> class_embed"

    register_layout("toy", lambda keys: "cls_head.weight" in keys, hint="", on_load=rename)
    source = _randomize(Detector())
    state = {k.replace("class_embed.", "cls_head."): v for k, v in source.state_dict().items()}
    path = tmp_path / "toy.pth"
    torch.save(state, path)
    target = Detector()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        DetectionCheckpointer(target).load(str(path))
    _assert_same_weights(source, target)
    assert f"{path} is in toy names" in caplog.text


def test_summarize_keys_shows_a_bare_key_beside_its_dotted_namesakes():
    lines = summarize_keys(["pos_embed", "pos_embed.weight", "pos_embed.bias", "query"])
    assert lines == ["pos_embed", "pos_embed.{bias, weight}", "query"]


def test_summarize_keys_keeps_many_keys_short():
    n_layers = random.randint(30, 60)
    keys = [
        f"transformer.encoder.layers.{i}.{part}.{p}"
        for i in range(n_layers)
        for part in ("self_attn.value_proj", "linear1", "norm1")
        for p in ("weight", "bias")
    ] + ["class_embed.weight"]
    lines = summarize_keys(keys, max_lines=20)
    assert len(lines) <= 20
    counted = 0
    for line in lines:
        if line.endswith(" keys)"):
            counted += int(line.rsplit("(", 1)[1].split()[0])
        else:
            counted += 1
    assert counted == len(keys)
    assert any(line.startswith("transformer.encoder.layers.") for line in lines)
    assert summarize_keys(["a.b.weight", "a.b.bias", "c"]) == ["a.b.{bias, weight}", "c"]


# ---------------------------------------------------------------------------------------------
# errors and atomicity


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        DetectionCheckpointer(Detector()).load(str(missing))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_file_is_named(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    state = _randomize(Detector()).state_dict()
    if suffix == ".pth":
        torch.save({"model": state}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}}, f)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path}.*truncated"):
        DetectionCheckpointer(Detector()).load(str(path))


def test_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=rf"{path} is truncated or not a torch file"):
        DetectionCheckpointer(Detector()).load(str(path))
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match=rf"{listing} has no model state dict"):
        DetectionCheckpointer(Detector()).load(str(listing))


def test_failed_save_keeps_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model = _randomize(Detector())
    checkpointer = DetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _randomize(model)

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)  # half-written file ...
        raise OSError("disk full")  # ... and the process dies here

    monkeypatch.setattr(ckpt_module.torch, "save", crash_mid_write)
    with pytest.raises(CheckpointError, match=r"model_0000019\.pth .*disk full"):
        checkpointer.save("model_0000019", iteration=19)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000009.pth",
        "model_0000009.pth.sha256",
    ]
    restored = Detector()
    extra = DetectionCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for key, value in good.items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_last_checkpoint_only_ever_names_complete_files(tmp_path, monkeypatch):
    """Observe every rename: the tag is written after its checkpoint is complete, and never
    names a temporary file."""
    model = _randomize(Detector())
    checkpointer = DetectionCheckpointer(model, str(tmp_path))
    real_replace = os.replace
    events = []

    def watching_replace(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            with open(src) as f:
                named = f.read()
            assert not named.startswith(".") and named.endswith(".pth")
            # the checkpoint it names is already in place and loads
            torch.load(os.path.join(tmp_path, named), weights_only=True)
        events.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", watching_replace)
    checkpointer.save("model_0000004")
    checkpointer.save("model_0000009")
    assert events == [
        "model_0000004.pth",
        "model_0000004.pth.sha256",
        "last_checkpoint",
        "model_0000009.pth",
        "model_0000009.pth.sha256",
        "last_checkpoint",
    ]

    # a crash while writing the tag leaves the previous tag whole
    def failing_replace(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="killed"):
        checkpointer.save("model_0000014")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    from detrkit.utils.file_io import atomic_write

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic = tmp_path / "atomic.bin"
    atomic_write(atomic, lambda f: f.write(b"x"))
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert atomic.read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
