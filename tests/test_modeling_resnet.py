"""ResNet (detectron2 layout) and FrozenBatchNorm2d."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detrkit.layers import ShapeSpec
from detrkit.modeling import BasicBlock, BasicStem, BottleneckBlock, FrozenBatchNorm2d, ResNet


class _Parent(nn.Module):
    """Holds the backbone as `backbone`, like the detector does, for the `backbone.` key prefix."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def _resnet(depth: int, norm: str = "FrozenBN", out_features=("res3", "res4", "res5"), **kw):
    stem_kw = {k: kw.pop(k) for k in ["stem_out_channels"] if k in kw}
    freeze_at = kw.pop("freeze_at", 0)
    return ResNet(
        stem=BasicStem(3, stem_kw.get("stem_out_channels", 64), norm=norm),
        stages=ResNet.make_default_stages(depth, norm=norm, **stem_kw, **kw),
        out_features=list(out_features),
        freeze_at=freeze_at,
    )


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# parameter counts, by hand
# ----------------------------------------------------------------------------------------------
def _bottleneck_params(cin: int, width: int, cout: int, shortcut: bool) -> int:
    convs = cin * width + 9 * width * width + width * cout
    norms = 2 * (width + width + cout)  # gamma + beta per channel
    projection = cin * cout + 2 * cout if shortcut else 0
    return convs + norms + projection


def _basic_params(cin: int, cout: int, shortcut: bool) -> int:
    convs = 9 * cin * cout + 9 * cout * cout
    norms = 2 * (cout + cout)
    projection = cin * cout + 2 * cout if shortcut else 0
    return convs + norms + projection


def test_resnet50_trunk_parameter_count() -> None:
    stem = 3 * 64 * 7 * 7 + 2 * 64
    expected = stem
    # (in, bottleneck width, out, blocks) for res2..res5
    for cin, width, cout, blocks in [
        (64, 64, 256, 3),
        (256, 128, 512, 4),
        (512, 256, 1024, 6),
        (1024, 512, 2048, 3),
    ]:
        expected += _bottleneck_params(cin, width, cout, shortcut=True)
        expected += (blocks - 1) * _bottleneck_params(cout, width, cout, shortcut=False)
    # torchvision's resnet50 has 25,557,032 parameters, of which its fc holds 2048*1000+1000
    assert expected == 25_557_032 - (2048 * 1000 + 1000) == 23_508_032
    model = _resnet(50, norm="BN", out_features=["res5"])
    assert _num_params(model) == expected


def test_resnet18_trunk_parameter_count() -> None:
    expected = 3 * 64 * 49 + 2 * 64
    for cin, cout, blocks in [(64, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 2)]:
        expected += _basic_params(cin, cout, shortcut=cin != cout)
        expected += (blocks - 1) * _basic_params(cout, cout, shortcut=False)
    # torchvision's resnet18: 11,689,512 parameters, fc 512*1000+1000
    assert expected == 11_689_512 - 513_000
    assert _num_params(_resnet(18, norm="BN", out_features=["res5"])) == expected


# ----------------------------------------------------------------------------------------------
# checkpoint keys
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "res5_dilation"), [("deformable_detr", 1), ("single_scale_dc5", 2)]
)
def test_state_dict_matches_checkpoint_fixture(
    checkpoint_keys: dict, variant: str, res5_dilation: int
) -> None:
    backbone = ResNet(
        stem=BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=ResNet.make_default_stages(
            depth=50, stride_in_1x1=False, norm="FrozenBN", res5_dilation=res5_dilation
        ),
        out_features=["res3", "res4", "res5"],
        freeze_at=1,
    )
    got = {k: list(v.shape) for k, v in _Parent(backbone).state_dict().items()}
    entries = checkpoint_keys["variants"][variant]["detrex"]
    expected = {k: v for k, v in entries.items() if k.startswith("backbone.")}
    assert got == expected
    # the frozen-BN backbone has convs only as parameters
    assert all(
        name.endswith(".weight") and "norm" not in name for name, _ in backbone.named_parameters()
    )
    shapes = backbone.output_shape()
    assert shapes == {
        "res3": ShapeSpec(channels=512, stride=8),
        "res4": ShapeSpec(channels=1024, stride=16),
        "res5": ShapeSpec(channels=2048, stride=32 if res5_dilation == 1 else 16),
    }


# ----------------------------------------------------------------------------------------------
# shapes and strides
# ----------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("res5_dilation", [1, 2])
def test_output_shapes_and_strides(depth: int, res5_dilation: int) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    model = _resnet(
        depth,
        norm="BN",
        out_features=["stem", "res2", "res3", "res4", "res5"],
        stem_out_channels=8,
        res2_out_channels=16,
        width_per_group=4,
        res5_dilation=res5_dilation,
    ).eval()
    height, width = 67, 93  # odd sizes: every stride-2 layer rounds up
    features = model(torch.randn(2, 3, height, width))
    strides = {
        "stem": 4,
        "res2": 4,
        "res3": 8,
        "res4": 16,
        "res5": 32 if res5_dilation == 1 else 16,
    }
    channels = {"stem": 8, "res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert list(features) == ["stem", "res2", "res3", "res4", "res5"]
    for name, feature in features.items():
        assert feature.shape == (
            2,
            channels[name],
            _ceil_div(height, strides[name]),
            _ceil_div(width, strides[name]),
        ), name
    assert model.output_shape() == {
        name: ShapeSpec(channels=channels[name], stride=strides[name]) for name in features
    }


def test_dc5_dilates_res5_and_keeps_its_stride() -> None:
    model = _resnet(
        50, stem_out_channels=8, res2_out_channels=16, width_per_group=4, res5_dilation=2
    )
    # torchvision's layout (the official backbone): the first res5 block is not dilated, it only
    # loses its stride; the two after it are dilated by 2 with padding 2 (same size out)
    first = model.res5[0]
    assert first.conv2.dilation == (1, 1) and first.conv2.padding == (1, 1)
    assert first.conv2.stride == (1, 1) and first.shortcut.stride == (1, 1)
    for block in model.res5[1:]:
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
        assert block.conv2.stride == (1, 1)
    assert all(block.conv2.dilation == (1, 1) for block in model.res4)
    assert model.res4[0].conv2.stride == (2, 2)


def test_stride_position() -> None:
    default = _resnet(50, stem_out_channels=8, res2_out_channels=16, width_per_group=4)
    assert default.res3[0].conv1.stride == (1, 1) and default.res3[0].conv2.stride == (2, 2)
    msra = _resnet(
        50, stem_out_channels=8, res2_out_channels=16, width_per_group=4, stride_in_1x1=True
    )
    assert msra.res3[0].conv1.stride == (2, 2) and msra.res3[0].conv2.stride == (1, 1)


def test_grouped_bottleneck_widths() -> None:
    # ResNeXt-style: num_groups * width_per_group channels in the 3x3 conv of res2
    model = _resnet(50, stem_out_channels=8, res2_out_channels=32, num_groups=4, width_per_group=2)
    conv2 = model.res2[0].conv2
    assert conv2.groups == 4 and conv2.in_channels == 8 and model.res5[0].conv2.in_channels == 64


def test_unrequested_stages_are_not_built() -> None:
    model = _resnet(18, norm="BN", out_features=["res3"], stem_out_channels=8, res2_out_channels=8)
    assert not hasattr(model, "res4") and not hasattr(model, "res5")
    assert list(model(torch.randn(1, 3, 32, 32))) == ["res3"]


def _assert_kaiming_fan_out(conv: nn.Conv2d, fan_out: int) -> None:
    """He normal init over fan_out (std sqrt(2 / fan_out)), bias 0 where there is one."""
    weight = conv.weight
    assert weight.shape[0] * weight[0, 0].numel() == fan_out
    assert weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    assert abs(weight.mean().item()) < 0.05 * (2.0 / fan_out) ** 0.5
    if conv.bias is not None:
        assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize("norm", ["BN", ""])
def test_basic_block_conv_init_is_kaiming_fan_out(norm: str) -> None:
    # 128 -> 256 channels at stride 2: conv1 and the shortcut have fan_out != fan_in, so a fan_in
    # init (or PyTorch's default) would give another std; without a norm the convs have a bias
    block = BasicBlock(128, 256, stride=2, norm=norm)
    _assert_kaiming_fan_out(block.conv1, 256 * 9)  # (256, 128, 3, 3)
    _assert_kaiming_fan_out(block.conv2, 256 * 9)  # (256, 256, 3, 3)
    _assert_kaiming_fan_out(block.shortcut, 256)  # (256, 128, 1, 1)
    assert (block.conv1.bias is None) == bool(norm)


def test_bottleneck_block_conv_init_is_kaiming_fan_out() -> None:
    block = BottleneckBlock(256, 512, bottleneck_channels=128, stride=2, norm="BN")
    _assert_kaiming_fan_out(block.conv1, 128)  # (128, 256, 1, 1)
    _assert_kaiming_fan_out(block.conv2, 128 * 9)  # (128, 128, 3, 3)
    _assert_kaiming_fan_out(block.conv3, 512)  # (512, 128, 1, 1)
    _assert_kaiming_fan_out(block.shortcut, 512)  # (512, 256, 1, 1)


# ----------------------------------------------------------------------------------------------
# freezing
# ----------------------------------------------------------------------------------------------
def _tiny(freeze_at: int, norm: str = "BN") -> ResNet:
    return _resnet(
        50,
        norm=norm,
        stem_out_channels=8,
        res2_out_channels=16,
        width_per_group=4,
        freeze_at=freeze_at,
    )


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3])
def test_freeze_at(freeze_at: int) -> None:
    model = _tiny(freeze_at)
    parts = {"stem": model.stem, "res2": model.res2, "res3": model.res3, "res4": model.res4}
    for index, (name, part) in enumerate(parts.items(), start=1):
        frozen = freeze_at >= index
        assert all(p.requires_grad != frozen for p in part.parameters()), name
        norms = [m for m in part.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), name


def test_freezing_keeps_the_function() -> None:
    model = _tiny(0).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 40, 48)
    before = model(x)
    model.freeze(3)
    after = model(x)
    assert isinstance(model.res3[0].conv1.norm, FrozenBatchNorm2d)
    assert isinstance(model.res4[0].conv1.norm, nn.BatchNorm2d)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-4, rtol=1e-4)


def test_frozen_stages_get_no_gradient() -> None:
    model = _tiny(2)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for p in model.stem.parameters())
    assert all(p.grad is None for p in model.res2.parameters())
    assert all(p.grad is not None for p in model.res3.parameters())


# ----------------------------------------------------------------------------------------------
# FrozenBatchNorm2d
# ----------------------------------------------------------------------------------------------
def test_frozen_bn_math_matches_batchnorm_eval() -> None:
    channels = 6
    bn = nn.BatchNorm2d(channels, eps=1e-5)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 3.0)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    frozen = FrozenBatchNorm2d(channels)
    frozen.load_state_dict(bn.state_dict())  # carries num_batches_tracked: dropped
    x = torch.randn(3, channels, 5, 4)
    torch.testing.assert_close(frozen(x), bn(x))
    # the formula written out
    expected = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + 1e-5
    ) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(frozen(x), expected.detach())
    # and train mode changes nothing
    frozen.train()
    torch.testing.assert_close(frozen(x), expected.detach())


def test_frozen_bn_has_only_four_buffers_and_starts_as_identity() -> None:
    frozen = FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), x)
    assert frozen(x.half()).dtype == torch.float16


def test_convert_frozen_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    for bn in (model[1], model[2][0]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    converted = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    assert isinstance(converted[1], FrozenBatchNorm2d)
    assert isinstance(converted[2][0], FrozenBatchNorm2d)
    torch.testing.assert_close(converted(x), expected)
    single = FrozenBatchNorm2d.convert_frozen_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(single, FrozenBatchNorm2d)


# ----------------------------------------------------------------------------------------------
# errors a config can cause
# ----------------------------------------------------------------------------------------------
def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"depth 42.*\[18, 34, 50, 101, 152\]"):
        ResNet.make_default_stages(depth=42)
    with pytest.raises(ValueError, match="res5_dilation must be 1 or 2; got 3"):
        ResNet.make_default_stages(depth=50, res5_dilation=3)
    with pytest.raises(ValueError, match="unknown norm 'LN'"):
        ResNet.make_default_stages(depth=18, norm="LN")
    stages = ResNet.make_default_stages(depth=18, stem_out_channels=8, res2_out_channels=8)
    with pytest.raises(ValueError, match=r"unknown out_features \['res6'\].*'res5'"):
        ResNet(stem=BasicStem(3, 8), stages=stages, out_features=["res3", "res6"])
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(stem=BasicStem(3, 8), stages=stages, out_features=["res5"], freeze_at=7)
    model = ResNet(stem=BasicStem(3, 8), stages=stages, out_features=["res5"])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))


def test_bottleneck_block_forward_by_hand() -> None:
    # a block is relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x)), norms folded in
    block = BottleneckBlock(4, 8, bottleneck_channels=2, stride=2, norm="").eval()
    x = torch.randn(1, 4, 6, 6)
    f = nn.functional
    h = f.relu(f.conv2d(x, block.conv1.weight, block.conv1.bias))
    h = f.relu(f.conv2d(h, block.conv2.weight, block.conv2.bias, stride=2, padding=1))
    h = f.conv2d(h, block.conv3.weight, block.conv3.bias)
    s = f.conv2d(x, block.shortcut.weight, block.shortcut.bias, stride=2)
    torch.testing.assert_close(block(x), f.relu(h + s))


def test_builds_from_a_lazy_config() -> None:
    # the detrex config shape, with widths shrunk for a CPU model
    from detrkit.config import LazyCall as L
    from detrkit.config import instantiate

    config = L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=16, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(
            depth=18, norm="FrozenBN", stem_out_channels=16, res2_out_channels=16
        ),
        out_features=["res3", "res4", "res5"],
        freeze_at=1,
    )
    model = instantiate(config)
    assert isinstance(model, ResNet)
    assert model.output_shape() == {
        "res3": ShapeSpec(channels=32, stride=8),
        "res4": ShapeSpec(channels=64, stride=16),
        "res5": ShapeSpec(channels=128, stride=32),
    }
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.res2.parameters())
