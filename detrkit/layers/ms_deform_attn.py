"""Multi-scale deformable attention: the operator, its pure-PyTorch reference, and the module.

`ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`
samples every head's value maps at a few learned points per level and sums them with attention
weights (Zhu et al., Deformable DETR, eq. 3). It is the custom op `torch.ops.detrkit.
ms_deform_attn_forward`, registered with `torch.library` (schema and kernels in C++ in
detrkit/csrc, fake kernels and the autograd formula here), so `torch.compile(fullgraph=True)` and
`torch.export` see one opaque op. Which code runs it:

- CPU tensors: the C++ kernel of `detrkit._C`;
- CUDA tensors: the CUDA kernel, when `detrkit._C` was built with it;
- otherwise the pure-PyTorch `grid_sample` reference below, with a warning logged once per device
  type. `ms_deform_attn_backend(device)` says which one serves a device.

`ms_deform_attn_reference` is also the oracle every kernel test compares with.

Shapes (N batch, S = sum of H_l * W_l value positions, M heads, D channels per head, Lq queries,
L levels, P points per level):
    value               (N, S, M, D)
    spatial_shapes      (L, 2) int64, rows (H_l, W_l)
    level_start_index   (L,) int64, first row of each level in S
    sampling_locations  (N, Lq, M, L, P, 2), normalized (x, y); outside [0, 1] reads zeros
    attention_weights   (N, Lq, M, L, P)
    returns             (N, Lq, M * D) in value's dtype
Dtypes: sampling_locations and attention_weights share one dtype, either value's or float32 when
value is float16/bfloat16 (what autocast produces). Accumulation is float32 (float64 for float64).
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_reference",
]

_FORWARD = "detrkit::ms_deform_attn_forward"
_BACKWARD = "detrkit::ms_deform_attn_backward"
_FORWARD_SCHEMA = (
    "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
    "-> (Tensor, Tensor, Tensor)"
)
_HALF_TYPES = (torch.float16, torch.bfloat16)
_VALUE_TYPES = (torch.float32, torch.float64, *_HALF_TYPES)


# --------------------------------------------------------------------------------------------
# The pure-PyTorch reference (grid_sample), the oracle of every kernel test
# --------------------------------------------------------------------------------------------


def _accumulation_dtype(value_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with `F.grid_sample` (bilinear, zero padding,
    `align_corners=False`), computed in float32 (float64 for float64 value), differentiable by
    autograd. Same arguments and result as `ms_deform_attn`; no argument checking."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    acc = _accumulation_dtype(value.dtype)
    value_acc = value.to(acc)
    grids = sampling_locations.to(acc) * 2 - 1  # grid_sample's [-1, 1] coordinates
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    sampled = []
    for level, (h, w) in enumerate(shapes):
        start = starts[level]
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_acc[:, start : start + h * w].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # (N*M, D, Lq, P)
    stacked = torch.stack(sampled, dim=3).flatten(3)  # (N*M, D, Lq, L*P)
    weights = attention_weights.to(acc).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(value.dtype)


def _reference_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's gradients written out with aten's grid_sample backward (the fallback op
    cannot call autograd: it runs below the autograd dispatch key)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    acc = _accumulation_dtype(value.dtype)
    value_acc = value.to(acc)
    grids = (sampling_locations.to(acc) * 2 - 1).transpose(1, 2)  # (N, M, Lq, L, P, 2)
    weights = attention_weights.to(acc).transpose(1, 2).reshape(N * M, 1, Lq, L, P)
    # (N, Lq, M*D) -> (N*M, D, Lq, 1): one gradient per query, shared by its P points
    grad_out = grad_output.to(acc).view(N, Lq, M, D).permute(0, 2, 3, 1).reshape(N * M, D, Lq, 1)
    grad_value = torch.zeros(N, S, M, D, dtype=acc, device=value.device)
    grad_grid = torch.empty(N, M, Lq, L, P, 2, dtype=acc, device=value.device)
    grad_weights = torch.empty(N * M, Lq, L, P, dtype=acc, device=value.device)
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        start = level_start_index[level].item()
        value_l = value_acc[:, start : start + h * w].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        grid_l = grids[:, :, :, level].reshape(N * M, Lq, P, 2)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, D, Lq, P)
        grad_weights[:, :, level] = (sampled * grad_out).sum(1)
        grad_sampled = grad_out * weights[:, :, :, level]  # (N*M, D, Lq, P)
        grad_value_l, grad_grid_l = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled, value_l, grid_l, 0, 0, False, [True, True]
        )  # modes: 0 = bilinear, 0 = zero padding
        grad_value[:, start : start + h * w] = grad_value_l.view(N, M, D, h * w).permute(0, 3, 1, 2)
        grad_grid[:, :, :, level] = grad_grid_l.view(N, M, Lq, P, 2)
    loc_dtype = sampling_locations.dtype
    grad_loc = (grad_grid * 2).transpose(1, 2).contiguous().to(loc_dtype)  # d grid / d loc = 2
    grad_weights = grad_weights.view(N, M, Lq, L, P).transpose(1, 2).contiguous().to(loc_dtype)
    return grad_value.to(value.dtype), grad_loc, grad_weights


# --------------------------------------------------------------------------------------------
# Argument checks (the same rules as the C++ checks, raised where the bad input enters)
# --------------------------------------------------------------------------------------------


def _check_args(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    """Ranks, matching sizes, dtypes, devices and contiguity: everything that needs no data."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(
                f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if value.dim() != 4:
        raise ValueError(
            f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            "ms_deform_attn: spatial_shapes must be (L, 2) rows of (H, W), got shape "
            f"{tuple(spatial_shapes.shape)}"
        )
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {named[name].dtype}")
    L = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != L:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) with L = {L} levels of "
            f"spatial_shapes, got shape {tuple(level_start_index.shape)}"
        )
    N, _, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[5] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    loc_shape = tuple(sampling_locations.shape)
    if loc_shape[0] != N or loc_shape[2] != M or loc_shape[3] != L:
        raise ValueError(
            f"ms_deform_attn: sampling_locations shape {loc_shape} does not match value "
            f"(N={N}, M={M}, from value shape {tuple(value.shape)}) and spatial_shapes (L={L})"
        )
    if tuple(attention_weights.shape) != loc_shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {loc_shape[:5]} "
            f"(sampling_locations without its last dim), got {tuple(attention_weights.shape)}"
        )
    if value.dtype not in _VALUE_TYPES:
        raise TypeError(
            "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got "
            f"{value.dtype}"
        )
    loc_dtype = sampling_locations.dtype
    if attention_weights.dtype != loc_dtype:
        raise TypeError(
            f"ms_deform_attn: sampling_locations ({loc_dtype}) and attention_weights "
            f"({attention_weights.dtype}) must share one dtype"
        )
    if not (
        loc_dtype == value.dtype or (loc_dtype == torch.float32 and value.dtype in _HALF_TYPES)
    ):
        raise TypeError(
            f"ms_deform_attn: sampling_locations/attention_weights dtype {loc_dtype} does not go "
            f"with value dtype {value.dtype}; accepted: the value's dtype, or float32 when value "
            "is float16/bfloat16"
        )
    for name, t in named.items():
        if name != "value" and t.device != value.device:
            raise ValueError(
                f"ms_deform_attn: {name} is on {t.device} but value is on {value.device} "
                "(all five arguments must be on one device)"
            )
    for name, t in named.items():
        if not t.is_contiguous():
            raise ValueError(
                f"ms_deform_attn: {name} must be contiguous (call .contiguous() on it first)"
            )


def _level_data_error(shapes: list, starts: list, num_values: int) -> str | None:
    total = 0
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0 or h * w > 2**30:
            return (
                f"ms_deform_attn: spatial_shapes[{level}] = ({h}, {w}) must be positive sizes "
                "(H, W) with H * W <= 2^30"
            )
        if start != total:
            return (
                f"ms_deform_attn: level_start_index[{level}] = {start} but the levels before it "
                f"hold {total} rows (level_start_index must be the running sum of H * W)"
            )
        total += h * w
    if total != num_values:
        return (
            f"ms_deform_attn: spatial_shapes {shapes} sum to {total} positions (sum of H * W) but "
            f"value has S = {num_values} (value.shape[1])"
        )
    return None


# Accelerator-resident spatial_shapes are checked once per tensor (and version), not on every
# call: reading them back synchronizes the device, and every layer gets the same tensor.
_checked_levels: dict[tuple[int, int], tuple] = {}


def _check_level_data(spatial_shapes: Tensor, level_start_index: Tensor, num_values: int) -> None:
    on_cpu = spatial_shapes.device.type == "cpu"
    key = (id(spatial_shapes), id(level_start_index))
    if not on_cpu:
        seen = _checked_levels.get(key)
        if (
            seen is not None
            and seen[0]() is spatial_shapes
            and seen[1]() is level_start_index
            and seen[2] == (spatial_shapes._version, level_start_index._version, num_values)
        ):
            return
    error = _level_data_error(spatial_shapes.tolist(), level_start_index.tolist(), num_values)
    if error is not None:
        raise ValueError(error)
    if not on_cpu:
        if len(_checked_levels) > 256:
            _checked_levels.clear()
        forget = lambda _ref, key=key: _checked_levels.pop(key, None)
        _checked_levels[key] = (
            weakref.ref(spatial_shapes, forget),
            weakref.ref(level_start_index, forget),
            (spatial_shapes._version, level_start_index._version, num_values),
        )


def _is_tracing(*tensors: Tensor) -> bool:
    """True under torch.compile / torch.export or with fake tensors, where data cannot be read."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


# --------------------------------------------------------------------------------------------
# The operator: C++ kernels from detrkit._C, reference kernels where there are none
# --------------------------------------------------------------------------------------------

try:
    from detrkit import _C  # noqa: F401  (importing it registers the C++ operators)

    _EXTENSION_ERROR: str | None = None
except ImportError as e:  # the package was installed without building the extension
    _EXTENSION_ERROR = f"{type(e).__name__}: {e}"

_reference_devices_logged: set[str] = set()


def _log_reference_use(device: torch.device) -> None:
    if device.type in _reference_devices_logged:
        return
    _reference_devices_logged.add(device.type)
    if _EXTENSION_ERROR is not None:
        why = (
            f"detrkit._C is not built ({_EXTENSION_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` (or `make install`)"
        )
    else:
        why = (
            f"detrkit._C has no {device.type} kernel; for CUDA rebuild it on a machine with a GPU "
            "or with FORCE_CUDA=1"
        )
    logger.warning(
        "ms_deform_attn on %s runs the pure-PyTorch grid_sample reference (slow, memory hungry): "
        "%s",
        device.type,
        why,
    )


def _reference_forward_kernel(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_level_data(spatial_shapes, level_start_index, value.shape[1])
    _log_reference_use(value.device)
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _reference_backward_kernel(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, _, M, D = value.shape
    expected = (N, sampling_locations.shape[1], M * D)
    if tuple(grad_output.shape) != expected or grad_output.dtype != value.dtype:
        raise ValueError(
            f"ms_deform_attn backward: grad_output must be {expected} in {value.dtype}, got "
            f"{tuple(grad_output.shape)} in {grad_output.dtype}"
        )
    _check_level_data(spatial_shapes, level_start_index, value.shape[1])
    _log_reference_use(value.device)
    return _reference_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


if _EXTENSION_ERROR is not None:
    _LIB = torch.library.Library("detrkit", "FRAGMENT")
    _LIB.define(_FORWARD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.define(_BACKWARD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
    _KERNEL_DEVICE_TYPES: frozenset[str] = frozenset()
else:
    _LIB = torch.library.Library("detrkit", "IMPL")
    _KERNEL_DEVICE_TYPES = frozenset(
        device_type
        for device_type in ("cpu", "cuda")
        if _has_kernel(_FORWARD, device_type.upper())
        and _has_kernel(_BACKWARD, device_type.upper())
    )
for _device_type in ("cpu", "cuda"):
    if _device_type not in _KERNEL_DEVICE_TYPES:
        _LIB.impl("ms_deform_attn_forward", _reference_forward_kernel, _device_type.upper())
        _LIB.impl("ms_deform_attn_backward", _reference_backward_kernel, _device_type.upper())


@torch.library.register_fake(_FORWARD)
def _forward_fake(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


@torch.library.register_fake(_BACKWARD)
def _backward_fake(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: Tensor) -> tuple:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_loc, grad_weights = torch.ops.detrkit.ms_deform_attn_backward(
        grad_output.contiguous(),
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
    )
    return grad_value, None, None, grad_loc, grad_weights


torch.library.register_autograd(_FORWARD, _backward, setup_context=_setup_context)


def _double_backward(ctx, *grads: Tensor) -> tuple:
    raise RuntimeError(
        "ms_deform_attn: double backward (gradients of its gradients, e.g. create_graph=True "
        "for a gradient penalty) is not supported; use ms_deform_attn_reference, which is "
        "differentiable to any order"
    )


# Without a formula, autograd would treat the gradients as constants and return silently
# wrong second-order gradients; this makes that case an error.
torch.library.register_autograd(
    _BACKWARD, _double_backward, setup_context=lambda ctx, inputs, output: None
)


def ms_deform_attn_backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on `device`: "cpu-kernel", "cuda-kernel" or
    "reference" (the pure-PyTorch one)."""
    device_type = torch.device(device).type
    return f"{device_type}-kernel" if device_type in _KERNEL_DEVICE_TYPES else "reference"


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention; see the module docstring for shapes and dtypes.

    Checks its arguments (errors name the argument at fault), then runs the registered operator
    (C++/CUDA kernel, or the reference where there is none). Checks that read data (the sizes in
    spatial_shapes against value's length) are skipped while torch.compile / torch.export trace.
    """
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not _is_tracing(value, spatial_shapes):
        _check_level_data(spatial_shapes, level_start_index, value.shape[1])
    if value.device.type not in ("cpu", "cuda", "meta"):  # meta: shapes from the fake kernel
        _log_reference_use(value.device)
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.detrkit.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over a multi-level feature pyramid (detrex's module, same names).

    Each query predicts, per head, level and point, a sampling offset around its reference point
    and an attention weight (softmax jointly over levels x points); the output is the weighted
    sum of the bilinearly sampled values, projected, plus the identity (residual).

    Args:
        embed_dim: features of query and value.
        num_heads: attention heads; embed_dim must be divisible by it.
        num_levels: feature levels sampled.
        num_points: points sampled per head and level.
        img2col_step: accepted for detrex config compatibility; the kernels need no batching step.
        dropout: dropout on the projected output, before the residual.
        batch_first: query/value/identity are (N, L, C) if True, else (L, N, C).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        img2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiScaleDeformableAttention: embed_dim ({embed_dim}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = img2col_step  # unused: kept so detrex configs carry over
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Deformable DETR's initialization: head h's points start along direction
        2*pi*h/num_heads (scaled so the larger |coordinate| is 1), point i at (i + 1) times it,
        on every level; uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float64) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (heads, 2) as (x, y)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1
        )
        bias = bias * scale  # (heads, levels, points, xy)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """
        Args:
            query: (Lq, N, C), or (N, Lq, C) with batch_first.
            key: unused (the keys are the sampled values); accepted for detrex's call signature.
            value: (S, N, C) or (N, S, C); defaults to query (self-attention in the encoder).
            identity: added to the output; defaults to query (before query_pos is added).
            query_pos: added to query before predicting offsets and weights.
            key_padding_mask: (N, S) bool, True at padded value positions (they read zeros).
            reference_points: (N, Lq, L, 2) normalized (x, y), or (N, Lq, L, 4) boxes
                (cx, cy, w, h); L may be 1 to share one reference across levels.
            spatial_shapes: (L, 2) int64 (H, W) per level.
            level_start_index: (L,) int64; computed from spatial_shapes when None.
        Returns:
            identity + dropout(output_proj(attention)), in query's layout.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if reference_points is None or spatial_shapes is None:
            raise ValueError(
                "MultiScaleDeformableAttention: reference_points and spatial_shapes are required"
            )
        if not self.batch_first:
            query = query.transpose(0, 1)
            value = value.transpose(0, 1)
        N, Lq, _ = query.shape
        S = value.shape[1]
        L, P, M = self.num_levels, self.num_points, self.num_heads
        if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (L, 2):
            raise ValueError(
                f"MultiScaleDeformableAttention: spatial_shapes must be ({L}, 2) for num_levels="
                f"{L}, got shape {tuple(spatial_shapes.shape)}"
            )
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "MultiScaleDeformableAttention: reference_points must be (N, Lq, L, 2) points or "
                f"(N, Lq, L, 4) boxes, got shape {tuple(reference_points.shape)}"
            )
        if (
            reference_points.shape[0] != N
            or reference_points.shape[1] != Lq
            or reference_points.shape[2] not in (L, 1)
        ):
            raise ValueError(
                f"MultiScaleDeformableAttention: reference_points shape "
                f"{tuple(reference_points.shape)} does not match N={N} queries Lq={Lq} and "
                f"num_levels={L} (or 1)"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(
                f"MultiScaleDeformableAttention: key_padding_mask must be (N, S) = ({N}, {S}), "
                f"got shape {tuple(key_padding_mask.shape)}"
            )
        if level_start_index is None:
            sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
            level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, -1)

        # Locations and weights stay float32 when value is half (autocast) so sampling positions
        # keep their precision; float64 models keep float64.
        loc_dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2).to(loc_dtype)
        logits = self.attention_weights(query).view(N, Lq, M, L * P).to(loc_dtype)
        attention_weights = logits.softmax(-1).view(N, Lq, M, L, P)
        reference_points = reference_points.to(loc_dtype)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: x / W_l, y / H_l
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(loc_dtype)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            # offsets are in units of half the box size, spread over the points
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )

        output = ms_deform_attn(
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
        )
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return identity + self.dropout(output)
