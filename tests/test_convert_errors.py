"""tools/convert_weights.py on bad input: one line on stderr naming the file and what was
expected, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from detrkit.checkpoint.convert import ConversionError
from projects.deformable_detr.convert import (
    convert_detrex,
    convert_official,
    official_to_detrex_name,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_error(convert_weights, capsys, tmp_path, source, input_path, *extra) -> str:
    """Run the CLI expecting failure; return its single stderr line."""
    output = tmp_path / "out.pth"
    argv = ["--source", source, "--input", str(input_path), "--output", str(output), *extra]
    assert convert_weights.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert lines[0].startswith("convert_weights.py: error: ")
    assert not output.exists()
    return lines[0]


def zeros_state(shapes: dict) -> dict[str, torch.Tensor]:
    """Cheap full-layout state dicts (all zeros: aliases are equal)."""
    return {key: torch.zeros(shape) for key, shape in shapes.items()}


def small_official_like(levels: int = 4, classes: int = 91) -> dict[str, torch.Tensor]:
    """A few official keys: enough to be recognized, far from complete."""
    return {
        "transformer.level_embed": torch.zeros(levels, 256),
        "class_embed.0.weight": torch.zeros(classes, 256),
        "class_embed.0.bias": torch.zeros(classes),
        "input_proj.0.0.weight": torch.zeros(256, 2048 if levels == 1 else 512, 1, 1),
        "backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7),
    }


# ---------------------------------------------------------------------------------------------
# unreadable files


def test_missing_input_is_named(convert_weights, capsys, tmp_path):
    line = run_error(convert_weights, capsys, tmp_path, "official", tmp_path / "nope.pth")
    assert "nope.pth does not exist" in line


@pytest.mark.parametrize("source", ["official", "detrex", "torchvision"])
def test_truncated_file_is_named(convert_weights, capsys, tmp_path, source):
    whole = tmp_path / "whole.pth"
    torch.save({"model": small_official_like(), "epoch": 3}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "checkpoint0049.pth"
    cut.write_bytes(data[: len(data) // 2])
    line = run_error(convert_weights, capsys, tmp_path, source, cut)
    assert str(cut) in line and "truncated" in line


def test_text_and_json_files_are_not_checkpoints(convert_weights, capsys, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    line = run_error(convert_weights, capsys, tmp_path, "official", text)
    assert str(text) in line and "not a torch file" in line

    as_json = tmp_path / "config.json"
    as_json.write_text(json.dumps({"model": {"a": 1}}))
    line = run_error(convert_weights, capsys, tmp_path, "detrex", as_json)
    assert str(as_json) in line


def test_torch_file_without_a_state_dict(convert_weights, capsys, tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    line = run_error(convert_weights, capsys, tmp_path, "official", path)
    assert str(path) in line and "not a checkpoint" in line and "a list" in line
    assert "official Deformable-DETR" in line

    path = tmp_path / "metrics.pth"
    torch.save({"epoch": 3, "ap": 44.5}, path)
    line = run_error(convert_weights, capsys, tmp_path, "torchvision", path)
    assert str(path) in line and "not a checkpoint" in line and "epoch" in line


def test_pickled_code_is_refused(convert_weights, capsys, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": small_official_like(), "hook": argparse.ArgumentParser}, path)
    line = run_error(convert_weights, capsys, tmp_path, "official", path)
    assert str(path) in line and "ArgumentParser" in line


# ---------------------------------------------------------------------------------------------
# checkpoints of other models or layouts


def test_checkpoint_of_another_model_names_its_first_unknown_keys(
    convert_weights, capsys, tmp_path
):
    # a DETR checkpoint: same backbone names, a different transformer and heads
    detr = {
        "transformer.encoder.layers.0.self_attn.in_proj_weight": torch.zeros(768, 256),
        "transformer.encoder.layers.0.self_attn.in_proj_bias": torch.zeros(768),
        "class_embed.weight": torch.zeros(92, 256),
        "query_embed.weight": torch.zeros(100, 256),
        "input_proj.weight": torch.zeros(256, 2048, 1, 1),
        "backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7),
    }
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": detr}, path)
    line = run_error(convert_weights, capsys, tmp_path, "official", path)
    assert str(path) in line and "not an official Deformable-DETR checkpoint" in line
    assert "first: transformer.encoder.layers.0.self_attn.in_proj_weight" in line
    assert "class_embed.weight" in line and "input_proj.weight" in line
    assert "backbone.0.body.conv1.weight" not in line  # a known key is not blamed

    # something else entirely, as detrex
    other = {"0.weight": torch.zeros(3, 3), "0.bias": torch.zeros(3)}
    path = tmp_path / "mlp.pth"
    torch.save(other, path)
    line = run_error(convert_weights, capsys, tmp_path, "detrex", path)
    assert str(path) in line and "not a detrex Deformable DETR checkpoint" in line
    assert "0.weight, 0.bias" in line


def _layout_error(state: dict) -> str:
    with pytest.raises(ConversionError) as info:
        convert_official({"model": state}, "ckpt.pth")
    message = str(info.value)
    assert message.startswith("ckpt.pth does not match the official Deformable-DETR layout")
    return message


def test_official_layout_errors_count_and_name_the_first_offenders(checkpoint_keys):
    """Unknown keys, missing keys and wrong shapes: each error counts them all and names the
    first ones (five keys, three shapes)."""
    shapes = checkpoint_keys["variants"]["deformable_detr"]["official"]

    state = zeros_state(shapes)
    unknown = [f"transformer.decoder.layers.{i}.extra_gate.weight" for i in range(6)]
    unknown.append("transformer.encoder.layers.0.extra_gate.weight")
    for key in unknown:
        state[key] = torch.zeros(4)
    message = _layout_error(state)
    assert f"7 unknown keys, first: {', '.join(unknown[:5])} (and 2 more)" in message

    state = zeros_state(shapes)
    missing = [
        "transformer.encoder.layers.3.norm2.bias",
        "transformer.encoder.layers.4.linear1.weight",
        "transformer.decoder.layers.5.norm3.weight",
    ]
    for key in missing:
        del state[key]
    message = _layout_error(state)
    assert "3 keys are missing, first: " in message and "more)" not in message
    assert all(key in message for key in missing)

    state = zeros_state(shapes)
    wrong = [f"transformer.encoder.layers.{i}.linear1.weight" for i in range(4)]
    for key in wrong:
        state[key] = torch.zeros(2048, 256)
    message = _layout_error(state)
    assert "4 tensors have other shapes, first: " in message and "(and 1 more)" in message
    named = [key for key in wrong if f"{key} is (2048, 256), expected (1024, 256)" in message]
    assert len(named) == 3


@pytest.mark.parametrize(
    ("source", "make", "hint"),
    [
        ("official", lambda: {"conv1.weight": torch.zeros(64, 3, 7, 7),
                              "bn1.running_var": torch.ones(64),
                              "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
         "--source torchvision"),
        ("official", lambda: {"transformer.level_embeds": torch.zeros(4, 256),
                              "neck.convs.0.conv.weight": torch.zeros(256, 512, 1, 1)},
         "loads without conversion"),
        ("torchvision", small_official_like, "--source official"),
        ("detrex", lambda: {"conv1.weight": torch.zeros(64, 3, 7, 7),
                            "bn1.running_var": torch.ones(64),
                            "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
         "--source torchvision"),
    ],
)  # fmt: skip
def test_wrong_source_suggests_the_right_one(convert_weights, capsys, tmp_path, source, make, hint):
    path = tmp_path / "weights.pth"
    torch.save(make(), path)
    line = run_error(convert_weights, capsys, tmp_path, source, path)
    assert str(path) in line and hint in line


# ---------------------------------------------------------------------------------------------
# 91-class heads as detrex; class counts; aliases; variants


def test_official_checkpoint_passed_as_detrex(convert_weights, capsys, tmp_path):
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    torch.save({"model": small_official_like(), "args": argparse.Namespace(dilation=False)}, path)
    line = run_error(convert_weights, capsys, tmp_path, "detrex", path)
    assert str(path) in line and "official Deformable-DETR checkpoint" in line
    assert "--source official" in line


def test_91_class_head_in_detrex_names_is_refused(convert_weights, capsys, tmp_path):
    # renamed to detrex names but still 91 rows: the official class layout
    official = small_official_like()
    renamed = {official_to_detrex_name(k, 4): v for k, v in official.items()}
    path = tmp_path / "renamed_only.pth"
    torch.save({"model": renamed}, path)
    line = run_error(convert_weights, capsys, tmp_path, "detrex", path)
    assert str(path) in line and "91-way class heads" in line and "(91, 256)" in line
    assert "--source official" in line and "--keep-all-classes" in line


def test_detrex_with_91_classes_accepted_with_keep_all_classes(checkpoint_keys):
    shapes = dict(checkpoint_keys["variants"]["deformable_detr"]["detrex"])
    shapes = {k: ([91, *v[1:]] if v[0] == 80 else v) for k, v in shapes.items()}
    result = convert_detrex({"model": zeros_state(shapes)}, "m.pth", keep_all_classes=True)
    assert result.model["class_embed.0.weight"].shape == (91, 256)


def test_other_class_counts_need_keep_all_classes(checkpoint_keys, tmp_path):
    shapes = dict(checkpoint_keys["variants"]["deformable_detr"]["official"])
    shapes = {k: ([21, *v[1:]] if v[0] == 91 else v) for k, v in shapes.items()}
    state = zeros_state(shapes)
    with pytest.raises(ConversionError, match=r"voc\.pth: the class heads have 21 outputs.*"
                       r"--keep-all-classes"):  # fmt: skip
        convert_official({"model": state}, "voc.pth")
    for k in range(6):  # one head shared by the six layers
        state[f"class_embed.{k}.bias"] = torch.arange(21.0)
    result = convert_official({"model": state}, "voc.pth", keep_all_classes=True)
    for k in range(6):
        assert torch.equal(result.model[f"class_embed.{k}.bias"], torch.arange(21.0))


def test_self_contradicting_aliases_are_named(checkpoint_keys):
    state = zeros_state(checkpoint_keys["variants"]["deformable_detr"]["official"])
    state["class_embed.3.weight"] = state["class_embed.3.weight"] + 1
    with pytest.raises(ConversionError) as info:
        convert_official({"model": state}, "shared.pth")
    message = str(info.value)
    assert "shared.pth contradicts itself" in message
    assert "class_embed.3.weight and class_embed.0.weight differ" in message

    state = zeros_state(checkpoint_keys["variants"]["two_stage"]["official"])
    state["transformer.decoder.bbox_embed.2.layers.1.bias"] = torch.ones(256)
    with pytest.raises(ConversionError, match=r"transformer\.decoder\.bbox_embed\.2\.layers\.1\."
                       r"bias and bbox_embed\.2\.layers\.1\.bias differ"):  # fmt: skip
        convert_official({"model": state}, "refined.pth")

    state = zeros_state(checkpoint_keys["variants"]["two_stage"]["official"])
    state["transformer.decoder.class_embed.6.bias"] = torch.ones(91)
    with pytest.raises(ConversionError, match=r"transformer\.decoder\.class_embed\.6\.bias and "
                       r"class_embed\.6\.bias differ"):  # fmt: skip
        convert_official({"model": state}, "two_stage.pth")


def test_variant_that_contradicts_the_file_names_both(convert_weights, capsys, tmp_path):
    path = tmp_path / "multi_scale.pth"
    torch.save({"model": small_official_like(levels=4)}, path)
    line = run_error(convert_weights, capsys, tmp_path, "official", path, "--variant", "refine")
    assert "--variant refine does not match" in line and str(path) in line
    assert "deformable_detr" in line

    path = tmp_path / "dc5.pth"
    args = argparse.Namespace(dilation=True, num_feature_levels=1)
    torch.save({"model": small_official_like(levels=1), "args": args}, path)
    line = run_error(
        convert_weights, capsys, tmp_path, "official", path, "--variant", "single_scale"
    )
    assert "--variant single_scale does not match" in line and str(path) in line
    assert "single_scale_dc5" in line and "args.dilation=True" in line


def test_single_scale_without_dilation_asks_for_variant(convert_weights, capsys, tmp_path):
    path = tmp_path / "single.pth"
    torch.save({"model": small_official_like(levels=1)}, path)
    line = run_error(convert_weights, capsys, tmp_path, "official", path)
    assert str(path) in line and "args.dilation" in line
    assert "--variant single_scale or --variant single_scale_dc5" in line


def test_unknown_structure_is_named(tmp_path):
    state = small_official_like(levels=3)
    with pytest.raises(ConversionError, match=r"x\.pth: the weights describe 3 feature levels"):
        convert_official({"model": state}, "x.pth")


def test_bad_command_lines(convert_weights, capsys, tmp_path):
    assert convert_weights.main(["--source", "caffe2", "--input", "a", "--output", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caffe2" in err[0] and "official" in err[0]
    path = tmp_path / "tv.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    line = run_error(convert_weights, capsys, tmp_path, "torchvision", path, "--variant", "refine")
    assert "--variant applies to --source official or detrex" in line
    line = run_error(convert_weights, capsys, tmp_path, "official", path, "--use-ema")
    assert "--use-ema applies to --source detrex" in line


def test_output_may_not_overwrite_the_input(convert_weights, capsys, tmp_path):
    path = tmp_path / "in.pth"
    torch.save({"model": small_official_like()}, path)
    argv = ["--source", "official", "--input", str(path), "--output", str(path)]
    assert convert_weights.main(argv) == 2
    assert "is the input file" in capsys.readouterr().err


def test_detrex_use_ema_without_ema_state(tmp_path):
    with pytest.raises(ConversionError, match=r"m\.pth has no 'ema_state'.*drop --use-ema"):
        convert_detrex({"model": {"a": torch.zeros(1)}}, "m.pth", use_ema=True)
