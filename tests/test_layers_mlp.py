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


def _autograd_node_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_ffn_training_gradients_equal_in_place_relu_without_copying_slices() -> None:
    """The default ReLU is out of place: the same values and gradients as an in-place ReLU
    after the Linear (torch's own modules), without the CopySlices node an in-place op on the
    Linear's 3-d output view puts in the graph (it clones the hidden gradient in backward)."""
    ffn = FFN(16, 48).train()
    hidden, last = ffn.layers[0][0], ffn.layers[1]
    x = torch.randn(3, 37, 16, requires_grad=True)
    grad_out = torch.randn(3, 37, 16)

    out = ffn(x)
    assert "CopySlices" not in _autograd_node_names(out)
    got = torch.autograd.grad(out, [x, *ffn.parameters()], grad_out)

    in_place = nn.Sequential(hidden, nn.ReLU(inplace=True), last)
    expected_out = in_place(x)
    assert "CopySlices" in _autograd_node_names(expected_out)  # what the default avoids
    expected = torch.autograd.grad(expected_out, [x, *ffn.parameters()], grad_out)
    assert torch.equal(out, expected_out)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_ffn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_fcs.*1"):
        FFN(num_fcs=1)
    with pytest.raises(ValueError, match=r"ffn_drop.*1.5"):
        FFN(ffn_drop=1.5)
    with pytest.raises(ValueError, match=r"num_layers.*0"):
        MLP(2, 2, 2, num_layers=0)
