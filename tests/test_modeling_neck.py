"""ChannelMapper: checkpoint keys, forward against F.conv2d + F.group_norm, and validation."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detrkit.layers import ShapeSpec
from detrkit.modeling import ChannelMapper

R50_SHAPES = {
    "res3": ShapeSpec(channels=512, stride=8),
    "res4": ShapeSpec(channels=1024, stride=16),
    "res5": ShapeSpec(channels=2048, stride=32),
}


def _neck_entries(checkpoint_keys: dict, variant: str) -> dict[str, list[int]]:
    entries = checkpoint_keys["variants"][variant]["detrex"]
    return {k[len("neck.") :]: v for k, v in entries.items() if k.startswith("neck.")}


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_multi_scale_keys_match_checkpoint(checkpoint_keys: dict) -> None:
    neck = ChannelMapper(
        input_shapes=R50_SHAPES,
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        num_outs=4,
        norm_layer=nn.GroupNorm(num_groups=32, num_channels=256),
    )
    assert _shapes(neck) == _neck_entries(checkpoint_keys, "deformable_detr")


@pytest.mark.parametrize("variant", ["single_scale", "single_scale_dc5"])
def test_single_scale_keys_match_checkpoint(checkpoint_keys: dict, variant: str) -> None:
    neck = ChannelMapper(input_shapes=R50_SHAPES, in_features=["res5"], out_channels=256)
    assert _shapes(neck) == _neck_entries(checkpoint_keys, variant)


def _tiny_inputs(channels: dict[str, int], sizes: dict[str, tuple[int, int]]) -> dict:
    return {name: torch.randn(2, c, *sizes[name]) for name, c in channels.items()}


def test_forward_matches_functional_oracle() -> None:
    channels = {"res3": 12, "res4": 20, "res5": 32}
    sizes = {"res3": (16, 20), "res4": (8, 10), "res5": (4, 5)}
    shapes = {name: ShapeSpec(channels=c) for name, c in channels.items()}
    # out_channels == res5's channels: using the projected res5 for the extra level would not
    # fail on shapes, only on values
    neck = ChannelMapper(shapes, ["res3", "res4", "res5"], out_channels=32, num_outs=5)
    with torch.no_grad():
        for module in neck.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_()
                module.bias.normal_()
            if isinstance(module, nn.Conv2d):
                module.bias.normal_()
    inputs = _tiny_inputs(channels, sizes)
    outputs = neck(inputs)
    assert len(outputs) == 5

    def level(conv_norm, x, stride=1, padding=0):
        conv, norm = conv_norm.conv, conv_norm.norm
        y = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
        return F.group_norm(y, 32, norm.weight, norm.bias)

    expected = [level(neck.convs[i], inputs[n]) for i, n in enumerate(["res3", "res4", "res5"])]
    expected.append(level(neck.extra_convs[0], inputs["res5"], stride=2, padding=1))
    expected.append(level(neck.extra_convs[1], expected[-1], stride=2, padding=1))
    for got, exp in zip(outputs, expected):
        torch.testing.assert_close(got, exp)
    assert [tuple(o.shape[-2:]) for o in outputs] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert all(o.shape[:2] == (2, 32) for o in outputs)


def test_default_norm_is_group_norm_32_per_level() -> None:
    shapes = {"a": ShapeSpec(channels=8), "b": ShapeSpec(channels=8)}
    neck = ChannelMapper(shapes, ["a", "b"], out_channels=64, num_outs=3)
    norms = [m.norm for m in [*neck.convs, *neck.extra_convs]]
    assert all(isinstance(n, nn.GroupNorm) and n.num_groups == 32 for n in norms)
    assert len({id(n) for n in norms}) == 3


def test_norm_layer_module_is_copied_and_factory_is_called() -> None:
    shapes = {"a": ShapeSpec(channels=8), "b": ShapeSpec(channels=4)}
    template = nn.GroupNorm(4, 16)
    neck = ChannelMapper(shapes, ["a", "b"], out_channels=16, norm_layer=template, num_outs=3)
    norms = [m.norm for m in [*neck.convs, *neck.extra_convs]]
    assert all(n is not template and n.num_groups == 4 for n in norms)
    assert norms[0].weight.data_ptr() != norms[1].weight.data_ptr()

    neck = ChannelMapper(
        shapes, ["a"], out_channels=16, norm_layer=functools.partial(nn.GroupNorm, 2)
    )
    assert neck.convs[0].norm.num_groups == 2 and neck.convs[0].norm.num_channels == 16

    neck = ChannelMapper(shapes, ["a"], out_channels=16, norm_layer=None, activation=nn.ReLU)
    assert sorted(neck.state_dict()) == ["convs.0.conv.bias", "convs.0.conv.weight"]
    assert (neck({"a": torch.randn(1, 8, 3, 3)})[0] >= 0).all()


def test_kernel_size_dilation_keep_size_and_init() -> None:
    shapes = {"a": ShapeSpec(channels=6)}
    neck = ChannelMapper(shapes, ["a"], out_channels=32, kernel_size=3, dilation=2)
    assert neck({"a": torch.randn(1, 6, 9, 7)})[0].shape == (1, 32, 9, 7)
    conv = neck.convs[0].conv
    assert torch.equal(conv.bias, torch.zeros(32))
    bound = math.sqrt(6.0 / (6 * 9 + 32 * 9))  # xavier_uniform
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.abs().max().item() > 0.8 * bound


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ValueError, match=r"\['res6'\].*available.*'res5'"):
        ChannelMapper(R50_SHAPES, ["res5", "res6"])
    with pytest.raises(ValueError, match=r"num_outs \(2\).*\(3\)"):
        ChannelMapper(R50_SHAPES, ["res3", "res4", "res5"], num_outs=2)
    with pytest.raises(ValueError, match="non-empty list"):
        ChannelMapper(R50_SHAPES, [])
    neck = ChannelMapper({"a": ShapeSpec(channels=8)}, ["a"], out_channels=32)
    with pytest.raises(KeyError, match=r"\['a'\]"):
        neck({"b": torch.randn(1, 8, 2, 2)})


def test_builds_from_a_lazy_config_with_one_norm_per_level() -> None:
    from detrkit.config import LazyCall as L
    from detrkit.config import instantiate

    config = L(ChannelMapper)(
        input_shapes={"res4": ShapeSpec(channels=8), "res5": ShapeSpec(channels=16)},
        in_features=["res4", "res5"],
        out_channels=32,
        num_outs=3,
        norm_layer=L(nn.GroupNorm)(num_groups=32, num_channels=32),
    )
    neck = instantiate(config)
    norms = [m.norm for m in [*neck.convs, *neck.extra_convs]]
    assert len({id(n) for n in norms}) == 3
    outputs = neck({"res4": torch.randn(2, 8, 8, 8), "res5": torch.randn(2, 16, 4, 4)})
    assert [tuple(o.shape) for o in outputs] == [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
