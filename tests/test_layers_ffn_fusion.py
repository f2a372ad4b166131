"""The eval-time CPU fast paths of FFN against its computation written out with
torch.nn.functional, on fresh random weights and inputs: row blocks in float32, oneDNN's fused
calls (Linear with bias and ReLU in one call) in bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import detrkit.layers.onednn as onednn
from detrkit.layers import FFN
from detrkit.layers.mlp import set_ffn_fusion
from detrkit.layers.onednn import onednn_op

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(onednn_op("_linear_pointwise") is None, reason="torch built without oneDNN"),
]


def written_out(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    """Linear -> activation for every hidden layer, then the last Linear (dropout: eval)."""
    *hidden, last, _ = ffn.layers
    for linear, activation, _ in hidden:
        x = activation(F.linear(x, linear.weight, linear.bias))
    return F.linear(x, last.weight, last.bias)


# every FFN shape the tests cover, with and without the residual
FFN_CASES = pytest.mark.parametrize(
    "kwargs, with_identity",
    [
        (kwargs, with_identity)
        for kwargs in (
            {"embed_dim": 16, "feedforward_dim": 48},
            {"embed_dim": 8, "feedforward_dim": 24, "output_dim": 5, "num_fcs": 3},
            {"embed_dim": 8, "feedforward_dim": 24, "activation": nn.GELU},
        )
        for with_identity in (False, True)
    ],
)


def random_ffn(**kwargs) -> FFN:
    ffn = FFN(**kwargs).eval()
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_()
    return ffn


@FFN_CASES
@pytest.mark.parametrize("block_rows", [5, 1024])  # 74 rows: 15 blocks, the last of 4; one
def test_float32_row_blocks_equal_the_written_out_computation(kwargs, with_identity, block_rows):
    ffn = random_ffn(**kwargs)
    ffn.block_rows = block_rows
    x = torch.randn(2, 37, ffn.embed_dim)
    identity = torch.randn(2, 37, ffn.output_dim) if with_identity else None
    identity_before = None if identity is None else identity.clone()
    with torch.no_grad():
        expected = written_out(ffn, x)
        if with_identity:
            expected = expected + identity
        blocked = ffn(x, identity=identity)
        assert torch.equal(blocked, ffn._blocked_forward(x, identity))  # the path it took
    torch.testing.assert_close(blocked, expected, rtol=1e-5, atol=1e-4)
    if with_identity:
        assert torch.equal(identity, identity_before)  # the residual is not written into


@FFN_CASES
def test_onednn_fused_calls_equal_the_written_out_computation(kwargs, with_identity, monkeypatch):
    """The bfloat16 path's oneDNN calls, run in float32 (which every CPU has kernels for)."""
    ffn = random_ffn(**kwargs)
    x = torch.randn(2, 37, ffn.embed_dim)
    identity = torch.randn(2, 37, ffn.output_dim) if with_identity else None
    calls = []
    op = onednn_op("_linear_pointwise")

    class Counting:
        def __call__(self, *args):
            calls.append(args[3])
            return op(*args)

        def binary(self, *args):
            calls.append(f"binary {args[4]}")
            return op.binary(*args)

    monkeypatch.setitem(onednn._OPS, "_linear_pointwise", Counting())
    with torch.no_grad():
        expected = written_out(ffn, x)
        if with_identity:
            expected = expected + identity
        fused = ffn._fused_forward(x, identity)
    assert len(calls) == ffn.num_fcs  # every Linear went through the fused call
    relu = isinstance(ffn.layers[0][1], nn.ReLU)
    assert calls[0] == ("relu" if relu else "none")
    assert calls[-1] == ("binary add" if with_identity else "none")
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-4)


def test_fused_ffn_under_bf16_autocast_matches_autocast_linears():
    ffn = random_ffn(embed_dim=32, feedforward_dim=64)
    x = torch.randn(3, 11, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = ffn(x, identity=x)
        expected = x + written_out(ffn, x)
    assert fused.dtype == expected.dtype == torch.float32  # the float32 residual's dtype
    torch.testing.assert_close(fused, expected, rtol=2e-2, atol=5e-2)


class Bf16LinearPointwise:
    """oneDNN's `_linear_pointwise` written with F.linear, for CPUs whose oneDNN has no bf16
    kernels (there the fused bf16 path is never taken, but its dtype handling is tested)."""

    def __init__(self, calls: list):
        self.calls = calls

    def __call__(self, x, weight, bias, attr, scalars, algorithm):
        self.calls.append((attr, x.dtype))
        out = F.linear(x, weight, bias)
        return out.relu() if attr == "relu" else out

    def binary(self, x, other, weight, bias, attr):
        self.calls.append((f"binary {attr}", other.dtype))
        return F.linear(x, weight, bias) + other


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_bf16_fused_ffn_sums_the_residual_in_its_own_dtype(residual_dtype, monkeypatch):
    """Under bf16 autocast the branch runs in bf16; a float32 residual (autocast's LayerNorm
    output) is summed in float32 as autocast's `identity + linear(x)` sums it, a bf16 one in
    the last oneDNN call. Residuals near 10000 make a bf16 rounding of the sum (steps of 64)
    stand out from the branch's own bf16 error (under 1 here)."""
    calls = []
    if not onednn.cpu_bf16_supported():
        monkeypatch.setattr(onednn, "cpu_bf16_supported", lambda: True)
        monkeypatch.setitem(onednn._OPS, "_linear_pointwise", Bf16LinearPointwise(calls))
    ffn = random_ffn(embed_dim=16, feedforward_dim=32)
    x = torch.randn(2, 9, 16)
    identity = (10000.0 + torch.randn(2, 9, 16)).to(residual_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ffn(x, identity=identity)
        branch = written_out(ffn, x)  # bf16 Linears, as autocast runs them
    assert branch.dtype == torch.bfloat16
    assert out.dtype == residual_dtype
    expected = identity.double() + branch.double()
    tolerance = 2.0 if residual_dtype == torch.float32 else 40.0  # bf16 steps: 64
    assert (out.double() - expected).abs().max() <= tolerance
    if calls:  # the stand-in ran: which calls, on which dtypes
        last = (
            ("none", torch.bfloat16)
            if residual_dtype == torch.float32
            else ("binary add", torch.bfloat16)
        )
        assert calls == [("relu", torch.bfloat16), last]


def test_training_grad_and_switched_off_run_the_modules():
    ffn = random_ffn(embed_dim=8, feedforward_dim=16)
    x = torch.randn(4, 8, requires_grad=True)
    out = ffn(x)  # grad enabled: the plain modules, differentiable
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(out.detach(), ffn.layers(x).detach())
    assert torch.equal(ffn(x, identity=x), x + ffn.layers(x))
    set_ffn_fusion(ffn, False)
    with torch.no_grad():
        assert torch.equal(ffn(x), ffn.layers(x))
    ffn.train()
    set_ffn_fusion(ffn, True)
    with torch.no_grad():
        assert torch.equal(ffn(x), ffn.layers(x))
