"""Eval-time oneDNN fusion of a ResNet convolution (FrozenBN folded) with its residual sum and
ReLU, against the convolution, norm, sum and ReLU computed separately with torch.nn.functional,
on fresh random weights and inputs; and whole ResNets fused against unfused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_frozen_norm

import detrkit.layers.onednn as onednn
from detrkit.layers.onednn import onednn_op
from detrkit.modeling import BasicStem, Conv2d, FrozenBatchNorm2d, ResNet, set_frozen_norm_folding

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        onednn_op("_convolution_pointwise") is None, reason="torch built without oneDNN"
    ),
]


def separately(conv: Conv2d, x, relu: bool, residual) -> torch.Tensor:
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    n = conv.norm
    scale = (n.weight / torch.sqrt(n.running_var + n.eps)).view(1, -1, 1, 1)
    y = (y - n.running_mean.view(1, -1, 1, 1)) * scale + n.bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_fused_conv_equals_separate_ops(
    relu, with_residual, channels_last, stride, dilation, groups, monkeypatch
):
    conv = Conv2d(
        8, 12, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups,
        bias=False, norm=random_frozen_norm(12),
    ).eval()  # fmt: skip
    x = torch.randn(2, 8, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_size = (11 - 1) // stride + 1, (9 - 1) // stride + 1
    residual = torch.randn(2, 12, *out_size) if with_residual else None
    calls = []
    op = onednn_op("_convolution_pointwise")

    class Counting:
        def __call__(self, *args):
            calls.append("unary")
            return op(*args)

        def binary(self, *args):
            calls.append("binary")
            return op.binary(*args)

    monkeypatch.setitem(onednn._OPS, "_convolution_pointwise", Counting())
    with torch.no_grad():
        fused = conv.forward_fused(x, relu=relu, residual=residual)
        expected = separately(conv, x, relu, residual)
    if channels_last:
        assert calls == ["binary" if with_residual else "unary"]
    else:  # fused only in the channels-last layout of the fast path
        assert calls == []
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-4)


def test_fused_conv_under_bf16_autocast_and_when_not_fused():
    conv = Conv2d(8, 16, 1, bias=False, norm=random_frozen_norm(16)).eval()
    x = torch.randn(1, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 16, 7, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = conv.forward_fused(x, relu=True, residual=residual)
    if onednn.cpu_bf16_supported():  # one bf16 oneDNN call (else the modules, as autocast runs)
        assert fused.dtype == torch.bfloat16
    with torch.no_grad():
        expected = separately(conv, x, True, residual)
    torch.testing.assert_close(fused.float(), expected, rtol=2e-2, atol=5e-2)
    # with gradients (training, fine-tuning) or folding off: the separate modules, exactly
    exact = F.relu(conv(x) + residual)
    assert torch.equal(conv.forward_fused(x, relu=True, residual=residual), exact)
    set_frozen_norm_folding(conv, False)
    with torch.no_grad():
        assert torch.equal(conv.forward_fused(x, relu=True, residual=residual), exact)


def test_bf16_fuses_only_where_onednn_has_bf16_kernels(monkeypatch):
    """`cpu_bf16_supported()` says what oneDNN's bf16 convolution does on this CPU (runs, or
    raises as on an AVX2-only CPU); where it says no, bf16 autocast takes the separate modules
    while float32 still fuses."""
    op = onednn_op("_convolution_pointwise")
    x = torch.randn(1, 8, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 8, 1, 1, dtype=torch.bfloat16)
    if onednn.cpu_bf16_supported():
        assert op(x, weight, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "").shape[1] == 16
    else:
        with pytest.raises(RuntimeError):
            op(x, weight, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")

    monkeypatch.setattr(onednn, "cpu_bf16_supported", lambda: False)
    conv = Conv2d(8, 16, 1, bias=False, norm=random_frozen_norm(16)).eval()
    x = x.float()
    with torch.no_grad():
        assert conv._fuses_epilogue(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv._fuses_epilogue(x)
            out = conv.forward_fused(x, relu=True)
        expected = separately(conv, x, True, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_fused_equals_unfused(depth):
    resnet = ResNet(
        stem=BasicStem(in_channels=3, out_channels=16, norm="FrozenBN"),
        stages=ResNet.make_default_stages(
            depth=depth, stem_out_channels=16, res2_out_channels=16 if depth == 18 else 32,
            width_per_group=8, norm="FrozenBN",
        ),
        out_features=["res3", "res4", "res5"],
    ).eval()  # fmt: skip
    for m in resnet.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.load_state_dict(random_frozen_norm(m.num_features).state_dict())
    x = torch.randn(1, 3, 64, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = resnet(x)
        set_frozen_norm_folding(resnet, False)
        plain = resnet(x.contiguous())
    for name in plain:  # random deep nets grow large activations: tolerance to their scale
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-5 * scale)
