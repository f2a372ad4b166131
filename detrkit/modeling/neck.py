"""ChannelMapper: project backbone features of different widths to one width, plus extra levels."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from detrkit.layers.shape_spec import ShapeSpec

NormLayer = nn.Module | Callable[[int], nn.Module] | None
Activation = nn.Module | Callable[[], nn.Module] | None


def group_norm_32(num_channels: int) -> nn.Module:
    """GroupNorm with 32 groups, ChannelMapper's default norm."""
    return nn.GroupNorm(32, num_channels)


def _make_norm(norm_layer: NormLayer, num_channels: int) -> nn.Module | None:
    if norm_layer is None:
        return None
    if isinstance(norm_layer, nn.Module):
        return copy.deepcopy(norm_layer)
    if callable(norm_layer):
        return norm_layer(num_channels)
    raise TypeError(
        "ChannelMapper: norm_layer must be an nn.Module (copied per level), a callable "
        f"num_channels -> nn.Module, or None; got {type(norm_layer).__name__}"
    )


def _make_activation(activation: Activation) -> nn.Module | None:
    if activation is None:
        return None
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    if callable(activation):
        return activation()
    raise TypeError(
        "ChannelMapper: activation must be an nn.Module (copied per level), a zero-argument "
        f"callable returning one, or None; got {type(activation).__name__}"
    )


class ConvNormAct(nn.Module):
    """A conv (`.conv`), then an optional norm (`.norm`) and activation (`.activation`)."""

    def __init__(
        self, conv: nn.Conv2d, norm: nn.Module | None = None, activation: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class ChannelMapper(nn.Module):
    """Map each input level to `out_channels` and add `num_outs - len(in_features)` extra levels.

    Per input level i: `convs.i` = conv (kernel_size, padding keeping the size at stride 1) +
    norm + activation. Per extra level j: `extra_convs.j` = 3x3 stride-2 conv + norm + activation;
    the FIRST extra conv takes the raw last input feature (e.g. res5 with 2048 channels, as in
    Deformable DETR), later ones the previous extra output.

    Args:
        input_shapes: backbone output shapes, name -> ShapeSpec (channels are read from it).
        in_features: the names to use, from fine to coarse.
        out_channels: channels of every output level.
        kernel_size, stride, bias, groups, dilation: of the per-level convs (extra convs use
            bias, and 3x3 stride 2).
        norm_layer: a module that is deep-copied for every level (what a lazy config's
            `L(nn.GroupNorm)(num_groups=32, num_channels=256)` instantiates to), a callable
            `num_channels -> nn.Module` (e.g. `functools.partial(nn.GroupNorm, 32)`), or None for
            no norm. Default: GroupNorm(32, out_channels).
        activation: a module deep-copied per level, a zero-argument callable, or None (default).
        num_outs: number of output levels (default `len(in_features)`).

    Conv weights are xavier-uniform and biases 0.
    """

    def __init__(
        self,
        input_shapes: dict[str, ShapeSpec],
        in_features: Sequence[str],
        out_channels: int = 256,
        kernel_size: int = 1,
        stride: int = 1,
        bias: bool = True,
        groups: int = 1,
        dilation: int = 1,
        norm_layer: NormLayer = group_norm_32,
        activation: Activation = None,
        num_outs: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(in_features, str) or len(in_features) == 0:
            raise ValueError(
                f"ChannelMapper: in_features must be a non-empty list of names; got {in_features!r}"
            )
        missing = [name for name in in_features if name not in input_shapes]
        if missing:
            raise ValueError(
                f"ChannelMapper: in_features {missing} are not in input_shapes; available: "
                f"{list(input_shapes)}"
            )
        if num_outs is None:
            num_outs = len(in_features)
        if num_outs < len(in_features):
            raise ValueError(
                f"ChannelMapper: num_outs ({num_outs}) must be >= len(in_features) "
                f"({len(in_features)})"
            )
        in_channels = [input_shapes[name].channels for name in in_features]
        for name, channels in zip(in_features, in_channels):
            if channels is None:
                raise ValueError(f"ChannelMapper: input_shapes[{name!r}].channels is not set")

        self.in_features = list(in_features)
        self.out_channels = out_channels
        self.num_outs = num_outs

        padding = dilation * (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            ConvNormAct(
                nn.Conv2d(
                    channels,
                    out_channels,
                    kernel_size=kernel_size,
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    bias=bias,
                ),
                norm=_make_norm(norm_layer, out_channels),
                activation=_make_activation(activation),
            )
            for channels in in_channels
        )
        self.extra_convs = nn.ModuleList()
        for j in range(num_outs - len(in_features)):
            extra_in = in_channels[-1] if j == 0 else out_channels
            self.extra_convs.append(
                ConvNormAct(
                    nn.Conv2d(
                        extra_in, out_channels, kernel_size=3, stride=2, padding=1, bias=bias
                    ),
                    norm=_make_norm(norm_layer, out_channels),
                    activation=_make_activation(activation),
                )
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """inputs: {name: (N, C_name, H, W)} -> `num_outs` tensors (N, out_channels, H_l, W_l),
        the in_features levels in order, then the extra levels (each half the previous size)."""
        missing = [name for name in self.in_features if name not in inputs]
        if missing:
            raise KeyError(
                f"ChannelMapper: features {missing} missing from the input; got {list(inputs)}"
            )
        outputs = [conv(inputs[name]) for name, conv in zip(self.in_features, self.convs)]
        for j, extra_conv in enumerate(self.extra_convs):
            source = inputs[self.in_features[-1]] if j == 0 else outputs[-1]
            outputs.append(extra_conv(source))
        return outputs
