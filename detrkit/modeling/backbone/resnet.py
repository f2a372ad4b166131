"""ResNet in detectron2's layout, so detectron2 / detrex checkpoints load by name.

Module tree (ResNet-50, as the `backbone` attribute of a model):

    backbone.stem.conv1            7x7/2 conv, with `.norm`; then ReLU and a 3x3/2 max-pool
    backbone.res2.{0,1,2}          bottleneck blocks: conv1 (1x1), conv2 (3x3), conv3 (1x1), each
    backbone.res3.{0..3}           with `.norm`; the first block of a stage also has `shortcut`
    backbone.res4.{0..5}           (1x1 conv with `.norm`)
    backbone.res5.{0,1,2}

Stride sits on the 3x3 conv by default (`stride_in_1x1=False`, the "v1.5" layout). With
`res5_dilation=2` (DC5) res5 keeps stride 16 and dilates its 3x3 convs instead, in the layout of the
official code's torchvision backbone: the first res5 block keeps dilation 1, the others use 2
(detectron2 dilates all three; the weights are the same, the features are not).

Norms: every block takes `norm` = "FrozenBN" (the default: fixed statistics, for pretrained
weights), "BN", "SyncBN", "GN", "" (none, convs get a bias) or a callable channels -> module. A
network trained from scratch needs "BN" or "GN": a fresh FrozenBN is the identity.

Build it like detectron2 / detrex lazy configs do:

    ResNet(
        stem=BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=ResNet.make_default_stages(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=1,
    )
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detrkit.layers.onednn import cpu_compute_dtype, onednn_fusion_available, onednn_op
from detrkit.layers.shape_spec import ShapeSpec

__all__ = [
    "BasicBlock",
    "BasicStem",
    "BottleneckBlock",
    "Conv2d",
    "FrozenBatchNorm2d",
    "ResNet",
    "get_norm",
    "set_frozen_norm_folding",
]

# Blocks per stage (res2..res5) and whether the depth uses bottleneck blocks.
_DEPTH_TO_BLOCKS: dict[int, tuple[list[int], bool]] = {
    18: ([2, 2, 2, 2], False),
    34: ([3, 4, 6, 3], False),
    50: ([3, 4, 6, 3], True),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
}

NormSpec = str | Callable[[int], nn.Module] | None


# ----------------------------------------------------------------------------------------------
# Norm layers
# ----------------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

        y = (x - running_mean) * rsqrt(running_var + eps) * weight + bias

    Buffers: `weight`, `bias`, `running_mean`, `running_var` (no `num_batches_tracked`; one
    found in a loaded state dict is dropped). Nothing here is trained, so a frozen backbone
    behaves the same in train and eval mode and with any batch size.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        # 1 - eps makes a freshly built layer the exact identity
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W), in x's dtype."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        scale = scale.to(x.dtype).view(1, -1, 1, 1)
        shift = shift.to(x.dtype).view(1, -1, 1, 1)
        return x * scale + shift

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        # checkpoints saved from nn.BatchNorm2d carry a step counter we have no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d / SyncBatchNorm in `module` by a FrozenBatchNorm2d holding
        the same statistics and affine parameters. Returns the converted module (a new object
        when `module` itself is a batch norm, else `module` modified in place)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            converted = cls.convert_frozen_batchnorm(child)
            if converted is not child:
                module.add_module(name, converted)
        return module


def get_norm(norm: NormSpec, out_channels: int) -> nn.Module | None:
    """Norm layer by name: "FrozenBN", "BN", "SyncBN", "GN" (32 groups), or "" / None for no
    norm. A callable is called with the channel count and must return a module."""
    if norm is None or norm == "":
        return None
    if callable(norm):
        return norm(out_channels)
    factories: dict[str, Callable[[int], nn.Module]] = {
        "FrozenBN": FrozenBatchNorm2d,
        "BN": nn.BatchNorm2d,
        "SyncBN": nn.SyncBatchNorm,
        "GN": lambda c: nn.GroupNorm(32, c),
    }
    if norm not in factories:
        raise ValueError(
            f"unknown norm {norm!r}; accepted: {sorted(factories)}, '' (none), or a callable "
            "channels -> nn.Module"
        )
    return factories[norm](out_channels)


def _check_norm(norm: NormSpec) -> None:
    """Fail at construction time, naming the bad value, before any layer is built."""
    if norm is None or callable(norm):
        return
    if norm not in ("", "FrozenBN", "BN", "SyncBN", "GN"):
        raise ValueError(
            f"unknown norm {norm!r}; accepted: 'FrozenBN', 'BN', 'SyncBN', 'GN', '' (none), "
            "or a callable channels -> nn.Module"
        )


class Conv2d(nn.Conv2d):
    """nn.Conv2d with an optional norm (`.norm`) and activation applied after the convolution.

    Keeping the norm as a child of the conv gives detectron2's keys: `conv1.weight`,
    `conv1.norm.weight`, `conv1.norm.running_mean`, ...

    In eval, a FrozenBatchNorm2d norm is folded into the convolution: `conv(x, W * s) + shift`
    instead of `conv(x, W) * s + shift` saves two passes over every output. The folded weight
    is computed once and again only when a weight or statistic changes (a load, `.to()`).
    Folding rounds differently in the last bits; `fold_frozen_norm = False` (or
    `set_frozen_norm_folding(model, False)`) runs the unfused computation bit for bit.
    """

    fold_frozen_norm: bool = True

    def __init__(
        self,
        *args,
        norm: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folds_norm():
            weight, bias = self._folded_weight_and_bias()
            x = self._conv_forward(x, weight, bias)
        else:
            x = self._conv_forward(x, self.weight, self.bias)
            if self.norm is not None:
                x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def forward_fused(
        self, x: torch.Tensor, relu: bool, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`relu(self(x) + residual)` (either part optional). With the norm folded in eval on
        the CPU and `x` channels-last it is one oneDNN call (bias, residual sum and ReLU applied
        in the convolution's epilogue: no extra passes over the output); otherwise these
        modules and operators."""
        if self._fuses_epilogue(x):
            weight, bias = self._folded_weight_and_bias()
            dtype = cpu_compute_dtype(x)
            args = (self.padding, self.stride, self.dilation, self.groups)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
            conv = onednn_op("_convolution_pointwise")
            if residual is None:
                return conv(x, weight, bias, *args, "relu" if relu else "none", [], "")
            return conv.binary(
                x, residual.to(dtype), weight, bias, *args, "add", 1.0,
                "relu" if relu else None, [], "",
            )  # fmt: skip
        out = self(x)
        if residual is not None:
            out = out + residual
        return F.relu_(out) if relu else out

    def _fuses_epilogue(self, x: torch.Tensor) -> bool:
        # channels-last only: the layout of the model's fast path, and the one where oneDNN
        # fuses the residual sum in bfloat16 too
        return (
            self.activation is None
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and self._folds_norm()
            and onednn_fusion_available(x, "_convolution_pointwise")
        )

    def _folds_norm(self) -> bool:
        return (
            self.fold_frozen_norm
            and not self.training
            and isinstance(self.norm, FrozenBatchNorm2d)
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
        )

    def _folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.norm
        tensors = [self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        if self.bias is not None:
            tensors.append(self.bias)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            # traced graphs (torch.compile, torch.export) fold it themselves: no Python cache
            return _fold_frozen_norm(self.weight, self.bias, norm)
        # a new tensor (load_state_dict, .to) or an in-place change invalidates the cache
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            weight, bias = _fold_frozen_norm(self.weight, self.bias, norm)
            self._folded = (key, weight, bias)
        return self._folded[1], self._folded[2]


def _fold_frozen_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: FrozenBatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a convolution followed by `norm` -> (W', b') of one convolution computing both:
    W' = W * s, b' = b * s + beta - mean * s with s = gamma / sqrt(var + eps) per output channel."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
    shift = norm.bias - norm.running_mean * scale
    folded_bias = shift if bias is None else bias * scale + shift
    folded_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
    return folded_weight.detach(), folded_bias.to(weight.dtype).detach()


def set_frozen_norm_folding(module: nn.Module, enabled: bool) -> nn.Module:
    """Turn the eval-time folding of FrozenBatchNorm2d into convolutions on or off for every
    Conv2d in `module` (on by default); returns `module`."""
    for m in module.modules():
        if isinstance(m, Conv2d):
            m.fold_frozen_norm = bool(enabled)
            m._folded = None
    return module


def _c2_msra_fill(conv: nn.Conv2d) -> None:
    """He (kaiming) normal init with fan_out for ReLU networks, bias 0 (Caffe2's MSRAFill)."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class _FreezableBlock(nn.Module):
    """A block with `in_channels`, `out_channels`, `stride` and a `freeze()` method."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def freeze(self) -> _FreezableBlock:
        """Stop gradients to every parameter and turn batch norms into FrozenBatchNorm2d."""
        for p in self.parameters():
            p.requires_grad_(False)
        FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        return self


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: NormSpec) -> Conv2d | None:
    """The 1x1 projection of a block's input when its channels or stride change, else None
    (the identity)."""
    if in_channels == out_channels and stride == 1:
        return None
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size=1,
        stride=stride,
        bias=not norm,
        norm=get_norm(norm, out_channels),
    )


class BasicStem(_FreezableBlock):
    """7x7 stride-2 conv (`conv1`, with norm) + ReLU + 3x3 stride-2 max-pool: stride 4 overall."""

    def __init__(
        self, in_channels: int = 3, out_channels: int = 64, norm: NormSpec = "FrozenBN"
    ) -> None:
        super().__init__(in_channels, out_channels, stride=4)
        _check_norm(norm)
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            kernel_size=7,
            stride=2,
            padding=3,
            bias=not norm,
            norm=get_norm(norm, out_channels),
        )
        _c2_msra_fill(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, ~H/4, ~W/4)."""
        x = self.conv1.forward_fused(x, relu=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BasicBlock(_FreezableBlock):
    """Two 3x3 convs (`conv1` strided, `conv2`) plus the identity or a 1x1 `shortcut`
    projection when the channels or the stride change (ResNet-18/34)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        norm: NormSpec = "FrozenBN",
        dilation: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        _check_norm(norm)
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm)
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=not norm,
            norm=get_norm(norm, out_channels),
        )
        self.conv2 = Conv2d(
            out_channels,
            out_channels,
            kernel_size=3,
            stride=1,
            padding=dilation,
            dilation=dilation,
            bias=not norm,
            norm=get_norm(norm, out_channels),
        )
        for conv in (self.conv1, self.conv2, self.shortcut):
            if conv is not None:
                _c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1.forward_fused(x, relu=True)
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv2.forward_fused(out, relu=True, residual=identity)


class BottleneckBlock(_FreezableBlock):
    """1x1 reduce (`conv1`) -> 3x3 (`conv2`, grouped / dilated) -> 1x1 expand (`conv3`), plus the
    identity or a 1x1 `shortcut` projection when the channels or the stride change.

    The stride goes on conv2 (3x3) unless `stride_in_1x1` (the original MSRA layout) puts it on
    conv1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: NormSpec = "FrozenBN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        _check_norm(norm)
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            kernel_size=1,
            stride=stride_1x1,
            bias=not norm,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv2 = Conv2d(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
            groups=num_groups,
            bias=not norm,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv3 = Conv2d(
            bottleneck_channels,
            out_channels,
            kernel_size=1,
            bias=not norm,
            norm=get_norm(norm, out_channels),
        )
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                _c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1.forward_fused(x, relu=True)
        out = self.conv2.forward_fused(out, relu=True)
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv3.forward_fused(out, relu=True, residual=identity)


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------
class ResNet(nn.Module):
    """A stem followed by stages `res2`, `res3`, ... (each an nn.Sequential of blocks).

    Args:
        stem: a module with `out_channels` and `stride` attributes (e.g. BasicStem).
        stages: one list of blocks per stage, named res2, res3, ... in order; each block has
            `in_channels`, `out_channels`, `stride` (see `make_default_stages`).
        out_features: names to return from forward, a subset of "stem", "res2", ...; default the
            last stage. Stages after the last requested one are not built (they would hold
            parameters that never receive a gradient).
        freeze_at: 0 trains everything; k >= 1 freezes the stem and the first k - 1 stages
            (1: stem, 2: stem + res2, ...): their parameters get requires_grad=False and their
            batch norms become FrozenBatchNorm2d.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[Sequence[nn.Module]],
        out_features: Sequence[str] | None = None,
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        if len(stages) == 0:
            raise ValueError("ResNet: stages is empty; give at least one list of blocks")
        stage_names = [f"res{i + 2}" for i in range(len(stages))]
        available = ["stem", *stage_names]
        if out_features is None:
            out_features = [stage_names[-1]]
        if isinstance(out_features, str):
            raise ValueError(
                f"ResNet: out_features must be a list of names, got the string {out_features!r}"
            )
        out_features = list(out_features)
        if len(out_features) == 0:
            raise ValueError(f"ResNet: out_features is empty; choose from {available}")
        unknown = [name for name in out_features if name not in available]
        if unknown:
            raise ValueError(f"ResNet: unknown out_features {unknown}; accepted: {available}")
        if not 0 <= freeze_at <= len(stages) + 1:
            raise ValueError(
                f"ResNet: freeze_at must be in [0, {len(stages) + 1}] (0 none, 1 stem, "
                f"2 stem+res2, ...); got {freeze_at}"
            )

        self.stem = stem
        self._out_feature_strides = {"stem": stem.stride}
        self._out_feature_channels = {"stem": stem.out_channels}

        # build only up to the deepest requested output
        num_stages = max(available.index(name) for name in out_features)
        self.stage_names: list[str] = []
        current_stride = stem.stride
        for name, blocks in zip(stage_names[:num_stages], stages[:num_stages]):
            if len(blocks) == 0:
                raise ValueError(f"ResNet: stage {name} has no blocks")
            stage = nn.Sequential(*blocks)
            self.add_module(name, stage)
            self.stage_names.append(name)
            for block in blocks:
                current_stride *= block.stride
            self._out_feature_strides[name] = current_stride
            self._out_feature_channels[name] = blocks[-1].out_channels
        self._out_features = out_features
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> ResNet:
        """Freeze the stem (freeze_at >= 1) and stages res2 .. res{freeze_at} (freeze_at >= 2)."""
        if freeze_at >= 1:
            self.stem.freeze()
        for index, name in enumerate(self.stage_names, start=2):
            if freeze_at >= index:
                for block in getattr(self, name):
                    block.freeze()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, C, H, W) -> {name: (N, channels, H / stride, W / stride)} for out_features."""
        if x.dim() != 4:
            raise ValueError(f"ResNet takes (N, C, H, W) images; got shape {tuple(x.shape)}")
        outputs: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        """{name: ShapeSpec(channels, stride)} for every output feature."""
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def out_features(self) -> list[str]:
        return list(self._out_features)

    @staticmethod
    def make_stage(
        block_class: type[nn.Module],
        num_blocks: int,
        *,
        in_channels: int,
        out_channels: int,
        first_stride: int = 1,
        first_block_kwargs: dict | None = None,
        **block_kwargs,
    ) -> list[nn.Module]:
        """`num_blocks` blocks; the first maps in_channels -> out_channels with `first_stride`,
        the rest keep out_channels at stride 1. `block_kwargs` go to every block;
        `first_block_kwargs` override them for the first block only."""
        blocks = []
        for i in range(num_blocks):
            kwargs = {**block_kwargs, **(first_block_kwargs or {})} if i == 0 else block_kwargs
            blocks.append(
                block_class(
                    in_channels=in_channels if i == 0 else out_channels,
                    out_channels=out_channels,
                    stride=first_stride if i == 0 else 1,
                    **kwargs,
                )
            )
        return blocks

    @staticmethod
    def make_default_stages(
        depth: int,
        block_class: type[nn.Module] | None = None,
        *,
        norm: NormSpec = "FrozenBN",
        stride_in_1x1: bool = False,
        res5_dilation: int = 1,
        stem_out_channels: int = 64,
        res2_out_channels: int | None = None,
        num_groups: int = 1,
        width_per_group: int = 64,
    ) -> list[list[nn.Module]]:
        """Stages res2..res5 of a standard ResNet of the given depth (18, 34, 50, 101, 152).

        Widths double every stage: res2 outputs `res2_out_channels` (default 256 for bottleneck
        depths, 64 for 18/34) from `stem_out_channels` inputs; bottleneck blocks reduce to
        `num_groups * width_per_group` channels at res2. Shrink them for a tiny model, e.g.
        `depth=18, stem_out_channels=16, res2_out_channels=16`.

        `res5_dilation=2` (DC5) gives res5 stride 1 (overall 16) and dilation 2 on the 3x3 convs of
        all res5 blocks but the first, which keeps dilation 1 as torchvision's dilated ResNet (the
        official Deformable DETR backbone) does.
        `stride_in_1x1` only applies to bottleneck blocks.
        """
        if depth not in _DEPTH_TO_BLOCKS:
            raise ValueError(
                f"ResNet: unknown depth {depth!r}; accepted: {sorted(_DEPTH_TO_BLOCKS)}"
            )
        if res5_dilation not in (1, 2):
            raise ValueError(f"ResNet: res5_dilation must be 1 or 2; got {res5_dilation!r}")
        _check_norm(norm)
        for name, value in (
            ("stem_out_channels", stem_out_channels),
            ("num_groups", num_groups),
            ("width_per_group", width_per_group),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResNet: {name} must be a positive int; got {value!r}")
        num_blocks_per_stage, is_bottleneck = _DEPTH_TO_BLOCKS[depth]
        if block_class is None:
            block_class = BottleneckBlock if is_bottleneck else BasicBlock
        if res2_out_channels is None:
            res2_out_channels = 256 if is_bottleneck else 64

        stages = []
        in_channels = stem_out_channels
        out_channels = res2_out_channels
        bottleneck_channels = num_groups * width_per_group
        for stage_index, num_blocks in enumerate(num_blocks_per_stage):
            is_res5 = stage_index == 3
            dilation = res5_dilation if is_res5 else 1
            # res2 follows the stem's max-pool and keeps its stride; res5 with DC5 keeps stride
            first_stride = 1 if stage_index == 0 or dilation == 2 else 2
            block_kwargs: dict = {"norm": norm, "dilation": dilation}
            if issubclass(block_class, BottleneckBlock):
                block_kwargs.update(
                    bottleneck_channels=bottleneck_channels,
                    num_groups=num_groups,
                    stride_in_1x1=stride_in_1x1,
                )
            # torchvision dilates a stage from its second block on; the first one, which would
            # have carried the stride, keeps the previous dilation
            first_block_kwargs = {"dilation": 1} if dilation == 2 else None
            stages.append(
                ResNet.make_stage(
                    block_class,
                    num_blocks,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    first_stride=first_stride,
                    first_block_kwargs=first_block_kwargs,
                    **block_kwargs,
                )
            )
            in_channels = out_channels
            out_channels *= 2
            bottleneck_channels *= 2
        return stages
