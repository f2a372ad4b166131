"""Eval-time folding of FrozenBatchNorm2d into the preceding convolution, against the unfused
computation (a convolution, then the norm's own forward) on fresh random weights and inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import random_frozen_norm

from detrkit.modeling import BasicStem, Conv2d, FrozenBatchNorm2d, ResNet, set_frozen_norm_folding

pytestmark = pytest.mark.usefixtures("one_thread")


def unfused(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    y = torch.nn.functional.conv2d(
        x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    n = conv.norm
    scale = n.weight / torch.sqrt(n.running_var + n.eps)
    return (y - n.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + n.bias.view(
        1, -1, 1, 1
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_folded_conv_equals_conv_then_norm(bias, stride, dilation, groups):
    conv = Conv2d(
        8,
        12,
        3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        groups=groups,
        bias=bias,
        norm=random_frozen_norm(12),
    ).eval()
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        folded = conv(x)
        assert conv._folded is not None  # the folded path ran
        torch.testing.assert_close(folded, unfused(conv, x), rtol=1e-5, atol=1e-5)
        set_frozen_norm_folding(conv, False)
        assert torch.equal(
            conv(x),
            conv.norm(
                torch.nn.functional.conv2d(
                    x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
                )
            ),
        )


def test_folding_follows_weight_changes_and_training_mode():
    conv = Conv2d(4, 6, 1, bias=False, norm=random_frozen_norm(6)).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        conv(x)
        # a checkpoint load copies new values in place: the folded weight must follow
        state = {k: torch.randn_like(v) for k, v in conv.state_dict().items()}
        state["norm.running_var"] = state["norm.running_var"].abs() + 0.1
        conv.load_state_dict(state)
        torch.testing.assert_close(conv(x), unfused(conv, x), rtol=1e-5, atol=1e-5)
        conv.norm.running_mean.add_(1.0)
        torch.testing.assert_close(conv(x), unfused(conv, x), rtol=1e-5, atol=1e-5)
    # training: the unfused computation, and gradients reach the convolution's weight
    conv.train()
    conv._folded = None
    y = conv(x)
    assert conv._folded is None
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_resnet_eval_with_folding_equals_without():
    resnet = ResNet(
        stem=BasicStem(in_channels=3, out_channels=16, norm="FrozenBN"),
        stages=ResNet.make_default_stages(
            depth=50, stem_out_channels=16, res2_out_channels=32, width_per_group=8
        ),
        out_features=["res3", "res4", "res5"],
    ).eval()
    for m in resnet.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.load_state_dict(random_frozen_norm(m.num_features).state_dict())
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        folded = resnet(x)
        reference = set_frozen_norm_folding(resnet, False)(x)
    for name in reference:
        # float32 rounding grows with depth and activation size: compare relative to the
        # feature map's scale
        error = (folded[name] - reference[name]).abs().max() / reference[name].abs().max()
        assert error < 1e-5, (name, error)
