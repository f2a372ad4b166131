"""Small fully connected blocks: the box-regression MLP and the transformer feed-forward branch."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import cpu_compute_dtype, onednn_fusion_available, onednn_op


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them and none after the last.

    The Linears live in `self.layers` (an nn.ModuleList), so a box head stored as `bbox_embed.0`
    has keys `bbox_embed.0.layers.{0..num_layers-1}.{weight,bias}`.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1; got {num_layers}")
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(in_dims, out_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def _make_activation(activation: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    """A fresh activation module: a copy of a given module, or the result of a factory."""
    if activation is None:
        # Not in place: the Linear before it returns a view of its 2-d result for 3-d inputs, and
        # an in-place op on a view makes autograd clone the hidden gradient twice in backward.
        return nn.ReLU()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    if callable(activation):
        module = activation()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"FFN: the activation factory {activation!r} returned {type(module).__name__}, "
                "expected an nn.Module"
            )
        return module
    raise TypeError(
        "FFN: activation must be an nn.Module, a callable returning one, or None (ReLU); got "
        f"{type(activation).__name__}"
    )


class FFN(nn.Module):
    """The feed-forward branch of a transformer layer; the residual only when passed in.

    Structure (keys in brackets, for num_fcs=2):

        layers = Sequential(
            Sequential(Linear(embed_dim, feedforward_dim) [layers.0.0], activation, Dropout),
            Linear(feedforward_dim, output_dim)            [layers.1],
            Dropout,
        )

    Each extra fc (num_fcs > 2) adds another `Sequential(Linear(ff, ff), activation, Dropout)`
    before the last Linear. `forward(x, identity=x)` adds the residual (fused into the last
    Linear on the fast path); the caller applies the norm.

    Args:
        embed_dim: input features.
        feedforward_dim: hidden features.
        output_dim: output features (default `embed_dim`).
        num_fcs: number of Linear layers, >= 2.
        activation: an nn.Module (deep-copied for every hidden layer), a zero-argument callable
            returning one (e.g. `nn.GELU`), or None for `nn.ReLU()`.
        ffn_drop: dropout probability after every hidden activation and after the last Linear.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        feedforward_dim: int = 1024,
        output_dim: int | None = None,
        num_fcs: int = 2,
        activation: nn.Module | Callable[[], nn.Module] | None = None,
        ffn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_fcs < 2:
            raise ValueError(f"FFN: num_fcs must be >= 2; got {num_fcs}")
        if not 0.0 <= ffn_drop <= 1.0:
            raise ValueError(f"FFN: ffn_drop must be in [0, 1]; got {ffn_drop}")
        output_dim = embed_dim if output_dim is None else output_dim
        self.embed_dim = embed_dim
        self.feedforward_dim = feedforward_dim
        self.output_dim = output_dim
        self.num_fcs = num_fcs

        blocks: list[nn.Module] = []
        in_dim = embed_dim
        for _ in range(num_fcs - 1):
            blocks.append(
                nn.Sequential(
                    nn.Linear(in_dim, feedforward_dim),
                    _make_activation(activation),
                    nn.Dropout(ffn_drop),
                )
            )
            in_dim = feedforward_dim
        blocks.append(nn.Linear(feedforward_dim, output_dim))
        blocks.append(nn.Dropout(ffn_drop))
        self.layers = nn.Sequential(*blocks)

    # eval on the CPU: the fast paths of `_fused_forward` (see `set_ffn_fusion`)
    fuse_inference: bool = True
    # rows per block of the float32 fast path: one block's hidden features (1024 x 1024 floats,
    # 4 MB) stay in cache between the two matrix products instead of a pass through memory
    block_rows: int = 1024

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., embed_dim) -> (..., output_dim): the branch output, plus `identity` (the
        residual, same shape as the output) when given."""
        if self._fuses(x):
            if cpu_compute_dtype(x) == torch.float32:
                return self._blocked_forward(x, identity)
            return self._fused_forward(x, identity)
        out = self.layers(x)
        return out if identity is None else identity + out

    def _fuses(self, x: torch.Tensor) -> bool:
        return (
            self.fuse_inference
            and not self.training
            and onednn_fusion_available(x, "_linear_pointwise")
        )

    def _blocked_forward(self, x: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
        """float32 eval: the computation of `self.layers` (+ identity) over blocks of
        `block_rows` rows, each block's output accumulated by one matrix product onto its
        identity + last bias. With the encoder's ~18k tokens this runs the FFN about 1.3x
        faster than whole matrices on a 2-core CPU: the hidden features stay in cache."""
        *hidden, last, _ = self.layers
        rows = x.reshape(-1, x.shape[-1])  # (R, embed_dim)
        residual = None if identity is None else identity.reshape(-1, self.output_dim)
        out = rows.new_empty(rows.shape[0], self.output_dim)
        for start in range(0, rows.shape[0], self.block_rows):
            block = rows[start : start + self.block_rows]
            for linear, activation, _ in hidden:
                block = torch.addmm(linear.bias, block, linear.weight.t())
                block = block.relu_() if isinstance(activation, nn.ReLU) else activation(block)
            out_block = out[start : start + self.block_rows]
            if residual is None:
                out_block.copy_(last.bias.expand_as(out_block))
            else:
                torch.add(residual[start : start + self.block_rows], last.bias, out=out_block)
            out_block.addmm_(block, last.weight.t())
        return out.view(*x.shape[:-1], self.output_dim)

    def _fused_forward(self, x: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
        """bfloat16 eval (autocast, where oneDNN has bf16 kernels): each Linear as one oneDNN
        call with its bias and ReLU, a bfloat16 residual summed in the last one's call; the
        same computation as `self.layers` (+ identity) in the dtypes autocast would use."""
        linear_pointwise = onednn_op("_linear_pointwise")
        dtype = cpu_compute_dtype(x)
        x = x.to(dtype)
        *hidden, last, _ = self.layers
        for linear, activation, _ in hidden:
            fused = "relu" if isinstance(activation, nn.ReLU) else "none"
            x = linear_pointwise(x, linear.weight.to(dtype), linear.bias.to(dtype), fused, [], "")
            if fused == "none":
                x = activation(x)
        weight, bias = last.weight.to(dtype), last.bias.to(dtype)
        if identity is None:
            return linear_pointwise(x, weight, bias, "none", [], "")
        if identity.dtype != dtype:
            # a float32 residual stays float32, as autocast's `identity + linear(x)` keeps it:
            # a bfloat16 sum would round the residual stream at every layer
            return identity + linear_pointwise(x, weight, bias, "none", [], "")
        return linear_pointwise.binary(x, identity.contiguous(), weight, bias, "add")


def set_ffn_fusion(module: nn.Module, enabled: bool) -> nn.Module:
    """Turn the eval-time CPU fast path of every FFN in `module` on (default: row blocks in
    float32, oneDNN's fused calls in bfloat16) or off (the plain nn.Linear / activation
    computation); returns `module`."""
    for m in module.modules():
        if isinstance(m, FFN):
            m.fuse_inference = bool(enabled)
    return module
