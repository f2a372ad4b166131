"""ImageNet ResNets for `train.init_checkpoint`: torchvision `.pth` (converted by the CLI or on
the fly by the checkpointer) and detectron2's torchvision-converted `R-50.pkl`.

The synthetic torchvision ResNet-50 is built from the fixture: the official checkpoint's
`backbone.0.body.*` entries are torchvision's names and shapes, and the fixture's detrex list
says where each lands in our model.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from torch import nn

from detrkit.checkpoint import CheckpointError, DetectionCheckpointer
from detrkit.checkpoint.convert import (
    ConversionError,
    convert_torchvision,
    resnet_layout,
    torchvision_to_detectron2_name,
)
from detrkit.config import LazyConfig, instantiate
from detrkit.modeling import BasicStem, ResNet
from projects.deformable_detr.convert import VARIANTS

CHECKPOINTER_LOGGER = "detrkit.checkpoint.checkpointer"
OFFICIAL_BACKBONE = "backbone.0.body."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(repo_root):
    cfg = LazyConfig.load(str(repo_root / VARIANTS["deformable_detr"].config))
    return instantiate(cfg.model).eval()


@pytest.fixture(scope="module")
def backbone_names(checkpoint_keys) -> list[tuple[str, str, list[int]]]:
    """(torchvision name, our model's name, shape) for every backbone tensor, from the fixture."""
    fixture = checkpoint_keys["variants"]["deformable_detr"]
    names = []
    for (official, shape), detrex in zip(fixture["official"].items(), fixture["detrex"]):
        if official.startswith(OFFICIAL_BACKBONE):
            names.append((official[len(OFFICIAL_BACKBONE) :], detrex, shape))
    assert len(names) == 53 + 53 * 4  # ResNet-50: 53 convs (4 shortcuts) and their norms
    return names


def torchvision_state(backbone_names) -> dict[str, torch.Tensor]:
    """A random ResNet-50 state dict as torchvision writes it: BatchNorm counters and fc too."""
    state = {}
    for name, _, shape in backbone_names:
        state[name] = torch.randn(shape)
        if name.endswith(".running_var"):
            state[name] = state[name].abs() + 0.1
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(1000)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_rules_match_the_fixture(backbone_names):
    assert [f"backbone.{torchvision_to_detectron2_name(tv)}" for tv, _, _ in backbone_names] == [
        ours for _, ours, _ in backbone_names
    ]
    assert resnet_layout(50) == {tv: tuple(shape) for tv, _, shape in backbone_names}
    assert torchvision_to_detectron2_name("fc.weight") is None


def test_cli_converts_resnet50_to_backbone_names(tmp_path, backbone_names, convert_weights, capsys):
    state = torchvision_state(backbone_names)
    source, output = tmp_path / "resnet50-0676ba61.pth", tmp_path / "R-50.pth"
    torch.save(state, source)
    argv = ["--source", "torchvision", "--input", str(source), "--output", str(output)]
    assert convert_weights.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fc.weight, fc.bias" in printed and "53 BatchNorm num_batches_tracked" in printed
    converted = torch.load(output, weights_only=True)["model"]
    assert list(converted) == [ours for _, ours, _ in backbone_names]
    for tv, ours, _ in backbone_names:
        assert torch.equal(converted[ours], state[tv]), ours


def _load_and_check(model, path, expected_backbone, caplog):
    """Load `path` as train.init_checkpoint; the backbone must equal `expected_backbone`
    ({our name: tensor}) and every other tensor keep its value. Returns the log text."""
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=CHECKPOINTER_LOGGER):
        DetectionCheckpointer(model).resume_or_load(str(path), resume=False)
    state = model.state_dict()
    backbone_keys = {k for k in state if k.startswith("backbone.")}
    assert backbone_keys == set(expected_backbone)
    for key, value in expected_backbone.items():
        assert torch.equal(state[key], value), key
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    # the rest of the model is reported as missing, grouped into a few readable lines
    text = caplog.text
    assert f"{len(before)} model parameters or buffers are not in the checkpoint" in text
    report = text.split("are not in the checkpoint:\n")[1].split("\n")
    group_lines = []
    for line in report:
        if not line.startswith("  "):
            break
        group_lines.append(line)
    assert 1 <= len(group_lines) <= 20
    assert any(line.strip().startswith("transformer.") for line in group_lines)
    assert any(line.strip().startswith("class_embed") for line in group_lines)
    return text


def test_torchvision_pth_as_init_checkpoint(tmp_path, model, backbone_names, caplog):
    state = torchvision_state(backbone_names)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    expected = {ours: state[tv] for tv, ours, _ in backbone_names}
    text = _load_and_check(model, path, expected, caplog)
    assert "is a torchvision ResNet" in text and "fc.bias, fc.weight" in text
    assert "not used by the model" not in text  # fc and the counters were dropped


def test_detectron2_r50_pkl_as_init_checkpoint(tmp_path, model, backbone_names, caplog):
    # detectron2's tools/convert-torchvision-to-d2.py output: names relative to the backbone,
    # numpy arrays, the classifier kept as stem.fc
    arrays = {}
    for _, ours, shape in backbone_names:
        arrays[ours[len("backbone.") :]] = torch.randn(shape).numpy()
    arrays["stem.fc.weight"] = torch.randn(1000, 2048).numpy()
    arrays["stem.fc.bias"] = torch.randn(1000).numpy()
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "torchvision", "matching_heuristics": True}, f)
    expected = {f"backbone.{k}": torch.from_numpy(v) for k, v in arrays.items() if "fc" not in k}
    text = _load_and_check(model, path, expected, caplog)
    assert "2 checkpoint keys are not used by the model" in text
    assert "stem.fc.{bias, weight}" in text


def test_converted_backbone_file_as_init_checkpoint(
    tmp_path, model, backbone_names, convert_weights, capsys, caplog
):
    state = torchvision_state(backbone_names)
    source, output = tmp_path / "resnet50.pth", tmp_path / "R-50.pth"
    torch.save({"state_dict": state}, source)
    argv = ["--source", "torchvision", "--input", str(source), "--output", str(output)]
    assert convert_weights.main(argv) == 0
    capsys.readouterr()
    expected = {ours: state[tv] for tv, ours, _ in backbone_names}
    text = _load_and_check(model, output, expected, caplog)
    assert "not used by the model" not in text


def test_resnet101_names_fit_our_resnet101():
    ours = ResNet(
        stem=BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=ResNet.make_default_stages(101, norm="FrozenBN"),
        out_features=["res5"],
    ).state_dict()
    state = {name: torch.randn(shape) for name, shape in resnet_layout(101).items()}
    state["fc.weight"] = torch.zeros(1000, 2048)
    result = convert_torchvision(state, "r101.pth", prefix="")
    assert {k: tuple(v.shape) for k, v in result.model.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    assert torch.equal(result.model["res4.22.conv2.weight"], state["layer3.22.conv2.weight"])
    assert any("depth=101" in note for note in result.notes)


def test_basic_block_resnet_is_refused():
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.running_var": torch.ones(64)}
    for stage in range(1, 5):
        for block in range(2):
            state[f"layer{stage}.{block}.conv1.weight"] = torch.zeros(1)
            state[f"layer{stage}.{block}.conv2.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"r18\.pth is a ResNet-18 \(basic blocks\)"):
        convert_torchvision(state, "r18.pth")


def test_official_checkpoint_through_the_checkpointer_names_the_converter(tmp_path):
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    official = {
        "transformer.level_embed": torch.zeros(4, 256),
        "input_proj.0.0.weight": torch.zeros(256, 512, 1, 1),
        "class_embed.0.weight": torch.zeros(91, 256),
    }
    torch.save({"model": official, "epoch": 49}, path)
    small = nn.Module()
    small.class_embed = nn.Linear(256, 80)
    with pytest.raises(CheckpointError) as info:
        DetectionCheckpointer(small).load(str(path))
    message = str(info.value)
    assert str(path) in message and "official Deformable-DETR checkpoint" in message
    assert "tools/convert_weights.py --source official" in message


def test_msra_caffe2_resnet_is_refused_with_the_alternatives(tmp_path, convert_weights, capsys):
    arrays = {
        "conv1_w": torch.zeros(64, 3, 7, 7).numpy(),
        "res_conv1_bn_s": torch.ones(64).numpy(),
        "res_conv1_bn_b": torch.zeros(64).numpy(),
        "res2_0_branch2a_w": torch.zeros(64, 64, 1, 1).numpy(),
    }
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(arrays, f)
    small = nn.Module()
    small.backbone = nn.Conv2d(3, 64, 7)
    with pytest.raises(CheckpointError) as info:
        DetectionCheckpointer(small).load(str(path))
    message = str(info.value)
    assert str(path) in message and "Caffe2 names" in message
    assert "stride_in_1x1=True" in message and "torchvision" in message

    argv = ["--source", "torchvision", "--input", str(path), "--output", str(tmp_path / "o.pth")]
    assert convert_weights.main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Caffe2 names" in err


def test_safetensors_output_loads_like_the_pth(tmp_path, backbone_names, convert_weights, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = torchvision_state(backbone_names)
    source, output = tmp_path / "resnet50.pth", tmp_path / "R-50.safetensors"
    torch.save(state, source)
    argv = ["--source", "torchvision", "--input", str(source), "--output", str(output)]
    assert convert_weights.main(argv) == 0
    capsys.readouterr()
    loaded = safetensors_torch.load_file(str(output))
    assert loaded.keys() == {ours for _, ours, _ in backbone_names}
    for tv, ours, _ in backbone_names:
        assert torch.equal(loaded[ours], state[tv]), ours
