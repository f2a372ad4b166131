"""The multi-scale deformable attention operator: registration, fake kernels, autograd formula,
backend choice, and the public entry point `ms_deform_attn`.

`ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`
samples every head's value maps at a few learned points per level and sums them with attention
weights (Zhu et al., Deformable DETR, eq. 3). It is the custom op `torch.ops.detrkit.
ms_deform_attn_forward`, registered with `torch.library` (schema and kernels in C++ in
detrkit/csrc, fake kernels and the autograd formula here), so `torch.compile(fullgraph=True)` and
`torch.export` see one opaque op. Which code runs it:

- CPU tensors: the C++ kernel of `detrkit._C`;
- CUDA tensors: the CUDA kernel, when `detrkit._C` was built with it;
- otherwise the pure-PyTorch `grid_sample` reference (reference.py), with a warning logged once
  per device type. `ms_deform_attn_backend(device)` says which one serves a device.

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

Arguments are validated in two places only: this entry point (ValueError / TypeError naming the
argument) checks everything that needs no device data (types, ranks, sizes, dtypes, devices,
contiguity) and, for CPU-resident spatial_shapes / level_start_index, their values; the C++
kernels repeat the checks for callers of `torch.ops.detrkit.*` (RuntimeError).
Accelerator-resident level tables are not read back (that would synchronize the device on every
call): build them with `ms_deform_attn_levels`, which checks the sizes once on the host; a level
whose rows fall outside value reads nothing in the CUDA kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import ms_deform_attn_reference, reference_backward

# The package's name: the one place users look for this operator's log records.
logger = logging.getLogger("detrkit.layers.ms_deform_attn")

__all__ = ["ms_deform_attn", "ms_deform_attn_backend", "ms_deform_attn_levels"]

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
_MAX_LEVEL_SIZE = 2**30  # H * W of one level: corner rows are int32 in the kernels


# --------------------------------------------------------------------------------------------
# Argument checks (the same rules as detrkit/csrc/ms_deform_attn/checks.cpp)
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


def _level_data_error(shapes: list, starts: list | None, num_values: int | None) -> str | None:
    """What is wrong with (H, W) rows `shapes`, their first rows `starts` and value's length
    `num_values` (None: not known here), or None."""
    total = 0
    for level, (h, w) in enumerate(shapes):
        if h <= 0 or w <= 0 or h * w > _MAX_LEVEL_SIZE:
            return (
                f"ms_deform_attn: spatial_shapes[{level}] = ({h}, {w}) must be positive sizes "
                "(H, W) with H * W <= 2^30"
            )
        if starts is not None and starts[level] != total:
            return (
                f"ms_deform_attn: level_start_index[{level}] = {starts[level]} but the levels "
                f"before it hold {total} rows (level_start_index must be the running sum of H * W)"
            )
        total += h * w
    if num_values is not None and total != num_values:
        return (
            f"ms_deform_attn: spatial_shapes {shapes} sum to {total} positions (sum of H * W) but "
            f"value has S = {num_values} (value.shape[1])"
        )
    return None


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


# The fallback kernels: reached through `ms_deform_attn` (arguments already checked) or the
# autograd formula below (arguments of a forward that ran), so they check nothing themselves.
def _reference_forward_kernel(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
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
    _log_reference_use(value.device)
    return reference_backward(
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def ms_deform_attn_backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on `device`: "cpu-kernel", "cuda-kernel" or
    "reference" (the pure-PyTorch one)."""
    device_type = torch.device(device).type
    return f"{device_type}-kernel" if device_type in _KERNEL_DEVICE_TYPES else "reference"


def ms_deform_attn_levels(
    shapes: Sequence[tuple[int, int]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """`spatial_shapes` (L, 2) and `level_start_index` (L,), int64 on `device`, for levels of
    (H, W) sizes given as Python ints. The sizes are checked here, on the host, so the tables
    can live on an accelerator without the operator reading them back on every call."""
    rows = [(int(h), int(w)) for h, w in shapes]
    error = _level_data_error(rows, None, None)
    if error is not None:
        raise ValueError(error)
    starts = [0]
    for h, w in rows[:-1]:
        starts.append(starts[-1] + h * w)
    spatial_shapes = torch.tensor(rows, dtype=torch.int64).view(len(rows), 2)
    level_start_index = torch.tensor(starts[: len(rows)], dtype=torch.int64)
    return spatial_shapes.to(device), level_start_index.to(device)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention; see the module docstring for shapes and dtypes.

    Checks its arguments (errors name the argument at fault), then runs the registered operator
    (C++/CUDA kernel, or the reference where there is none). The values of spatial_shapes and
    level_start_index are checked against value's length when they are on the CPU and no
    torch.compile / torch.export trace is running; on an accelerator they are not read back
    (see `ms_deform_attn_levels`).
    """
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if spatial_shapes.device.type == "cpu" and not _is_tracing(value, spatial_shapes):
        error = _level_data_error(
            spatial_shapes.tolist(), level_start_index.tolist(), value.shape[1]
        )
        if error is not None:
            raise ValueError(error)
    if value.device.type not in ("cpu", "cuda", "meta"):  # meta: shapes from the fake kernel
        _log_reference_use(value.device)
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.detrkit.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
