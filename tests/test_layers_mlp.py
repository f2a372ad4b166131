"""MLP and FFN: parameter names (as in the checkpoint fixture) and forward math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detrkit.layers import FFN, MLP


def _fixture_shapes(checkpoint_keys: dict, prefix: str) -> dict[str, list[int]]:
    entries = checkpoint_keys["variants"]["deformable_detr"]["detrex"]
    return {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}


def test_mlp_keys_match_checkpoint(checkpoint_keys: dict) -> None:
    mlp = MLP(256, 256, 4, num_layers=3)
    got = {k: list(v.shape) for k, v in mlp.state_dict().items()}
    assert got == _fixture_shapes(checkpoint_keys, "bbox_embed.0.")


def test_mlp_forward_is_linear_relu_linear_relu_linear() -> None:
    mlp = MLP(5, 7, 3, num_layers=3)
    x = torch.randn(2, 4, 5)
    w = [layer.weight for layer in mlp.layers]
    b = [layer.bias for layer in mlp.layers]
    h = torch.clamp(x @ w[0].T + b[0], min=0)
    h = torch.clamp(h @ w[1].T + b[1], min=0)
    expected = h @ w[2].T + b[2]
    torch.testing.assert_close(mlp(x), expected)


def test_mlp_has_no_activation_after_last_layer() -> None:
    mlp = MLP(4, 4, 6, num_layers=1)
    with torch.no_grad():
        mlp.layers[0].bias.fill_(-100.0)
    out = mlp(torch.randn(3, 4) * 0.01)
    assert (out < 0).all()


def test_ffn_keys_match_checkpoint(checkpoint_keys: dict) -> None:
    ffn = FFN(embed_dim=256, feedforward_dim=1024, ffn_drop=0.1)
    got = {k: list(v.shape) for k, v in ffn.state_dict().items()}
    assert got == _fixture_shapes(checkpoint_keys, "transformer.encoder.layers.0.ffns.0.")


def test_ffn_forward_has_no_residual() -> None:
    ffn = FFN(embed_dim=6, feedforward_dim=10).eval()
    x = torch.randn(3, 2, 6)
    first, last = ffn.layers[0][0], ffn.layers[1]
    expected = F.linear(
        torch.clamp(F.linear(x, first.weight, first.bias), min=0), last.weight, last.bias
    )
    torch.testing.assert_close(ffn(x), expected)
    # zeroing the last Linear zeroes the output: there is no identity path
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    assert torch.equal(ffn(x), torch.zeros_like(x))


def test_ffn_more_fcs_output_dim_and_activation_factories() -> None:
    ffn = FFN(embed_dim=4, feedforward_dim=8, output_dim=3, num_fcs=3, activation=nn.GELU)
    assert sorted(ffn.state_dict()) == [
        "layers.0.0.bias",
        "layers.0.0.weight",
        "layers.1.0.bias",
        "layers.1.0.weight",
        "layers.2.bias",
        "layers.2.weight",
    ]
    assert isinstance(ffn.layers[0][1], nn.GELU)
    assert ffn(torch.randn(5, 4)).shape == (5, 3)

    shared = nn.LeakyReLU(0.2)
    ffn = FFN(embed_dim=4, feedforward_dim=8, num_fcs=3, activation=shared)
    acts = [ffn.layers[0][1], ffn.layers[1][1]]
    assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.2 for a in acts)
    assert acts[0] is not shared and acts[0] is not acts[1]


def test_ffn_dropout_only_in_training() -> None:
    ffn = FFN(embed_dim=8, feedforward_dim=16, ffn_drop=0.5)
    x = torch.randn(64, 8)
    ffn.eval()
    torch.testing.assert_close(ffn(x), ffn(x))
    ffn.train()
    assert not torch.equal(ffn(x), ffn(x))


def test_ffn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_fcs.*1"):
        FFN(num_fcs=1)
    with pytest.raises(ValueError, match=r"ffn_drop.*1.5"):
        FFN(ffn_drop=1.5)
    with pytest.raises(ValueError, match=r"num_layers.*0"):
        MLP(2, 2, 2, num_layers=0)
