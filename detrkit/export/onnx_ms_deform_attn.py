"""ONNX translations of `detrkit::ms_deform_attn_forward` in standard ONNX operators.

torch.onnx's exporter (torch.export, then one ONNX Script function per operator) has no
translation for a custom op; `onnx_translation_table(form)` supplies one, written with ONNX Script
in tracing mode (the Python below runs once per call site and records ONNX nodes). Two forms:

- "gather": bilinear sampling written out. Every sampling point reads its 4 neighbouring value
  rows with one `Gather` per corner from the flattened values of all levels (level offset +
  y * W + x), weighted by bilinear weight x attention weight (zero outside the map); the weighted
  sum of each query's L * P points is a `MatMul`. Only Gather, arithmetic and MatMul: runs on any
  ONNX runtime (TensorRT included, whose GridSample some releases miscompile).
- "grid_sample": the reference's computation, one `GridSample` (opset 16) per level.

Both read the level sizes from the `spatial_shapes` input at run time, so a graph exported with
dynamic height and width stays correct at every size. Shapes are those of the op:
value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,), sampling_locations
(N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D); M, D, L and P must be
static in the exported graph (they are model hyper-parameters), N, S and Lq may be dynamic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "DEFAULT_ONNX_ATTENTION",
    "ONNX_ATTENTION_FORMS",
    "ONNX_OPSET",
    "onnx_translation_table",
]

ONNX_OPSET = 18  # the opset the translations are written in (GridSample is opset 16)
ONNX_ATTENTION_FORMS = ("gather", "grid_sample")
# the form tools/export_model.py uses unless told otherwise: the faster one on onnxruntime CPU
# (benchmarks/export.py)
DEFAULT_ONNX_ATTENTION = "gather"

# onnx TensorProto data types
_FLOAT = 1
_INT64 = 7


def _static_dims(value, sampling_locations) -> tuple[int, int, int, int]:
    """(M, D, L, P) from the traced inputs' shapes; they must be known numbers."""
    m, d = value.shape[2], value.shape[3]
    levels, points = sampling_locations.shape[3], sampling_locations.shape[4]
    dims = {"heads M": m, "channels D": d, "levels L": levels, "points P": points}
    for name, dim in dims.items():
        if not isinstance(dim, int):
            raise ValueError(
                f"ONNX export of ms_deform_attn: the number of {name} must be static in the "
                f"exported graph, got {dim!r}"
            )
    return m, d, levels, points


def _gather_form(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    from onnxscript import opset18 as op

    m, d, levels, points = _static_dims(value, sampling_locations)
    value_shape = op.Shape(value)
    batch = op.Slice(value_shape, [0], [1])  # (1,) N
    length = op.Slice(value_shape, [1], [2])  # (1,) S
    # (N, S, M, D) -> (N, M, S, D) -> (N * M * S, D): row (n * M + m) * S + s
    rows = op.Reshape(op.Transpose(value, perm=[0, 2, 1, 3]), op.Constant(value_ints=[-1, d]))
    # (N, Lq, M, L, P, 2) -> (N, M, Lq, L, P, 2); weights likewise
    loc = op.Transpose(sampling_locations, perm=[0, 2, 1, 3, 4, 5])
    attn = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    loc_x = op.Squeeze(op.Slice(loc, [0], [1], [5]), [5])  # (N, M, Lq, L, P)
    loc_y = op.Squeeze(op.Slice(loc, [1], [2], [5]), [5])

    # per-level sizes and offsets as (L, 1), broadcasting against (..., L, P)
    sizes = op.Cast(spatial_shapes, to=_FLOAT)
    height = op.Reshape(op.Slice(sizes, [0], [1], [1]), op.Constant(value_ints=[levels, 1]))
    width = op.Reshape(op.Slice(sizes, [1], [2], [1]), op.Constant(value_ints=[levels, 1]))
    start = op.Reshape(op.Cast(level_start_index, to=_FLOAT), op.Constant(value_ints=[levels, 1]))
    # first row of each (n, m) block: ((n * M + m) * S) as (N, M, 1, 1, 1)
    num_blocks = op.Mul(batch, op.Constant(value_ints=[m]))
    block = op.Range(
        op.Constant(value_int=0), op.Squeeze(num_blocks, [0]), op.Constant(value_int=1)
    )
    block_start = op.Mul(block, op.Squeeze(length, [0]))
    block_start = op.Reshape(block_start, op.Constant(value_ints=[-1, m, 1, 1, 1]))

    # pixel coordinates (align_corners=False): x = loc_x * W - 0.5
    one = op.Constant(value_float=1.0)
    zero = op.Constant(value_float=0.0)
    x = op.Sub(op.Mul(loc_x, width), op.Constant(value_float=0.5))
    y = op.Sub(op.Mul(loc_y, height), op.Constant(value_float=0.5))
    x0 = op.Floor(x)
    y0 = op.Floor(y)
    fx = op.Sub(x, x0)
    fy = op.Sub(y, y0)
    x_max = op.Sub(width, one)
    y_max = op.Sub(height, one)

    # (N * M * Lq, 1, L * P) weights @ (N * M * Lq, L * P, D) corner values, summed over corners
    weights_shape = op.Constant(value_ints=[-1, 1, levels * points])
    sampled_shape = op.Constant(value_ints=[-1, levels * points, d])
    output = None
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi = op.Add(x0, op.Constant(value_float=float(dx)))
        yi = op.Add(y0, op.Constant(value_float=float(dy)))
        wx = fx if dx else op.Sub(one, fx)
        wy = fy if dy else op.Sub(one, fy)
        inside = op.And(
            op.And(op.GreaterOrEqual(xi, zero), op.LessOrEqual(xi, x_max)),
            op.And(op.GreaterOrEqual(yi, zero), op.LessOrEqual(yi, y_max)),
        )
        weight = op.Where(inside, op.Mul(op.Mul(wx, wy), attn), zero)  # (N, M, Lq, L, P)
        # clamped into the map so that every index is valid; outside points weigh zero
        xc = op.Max(op.Min(xi, x_max), zero)
        yc = op.Max(op.Min(yi, y_max), zero)
        row = op.Cast(op.Add(op.Add(start, op.Mul(yc, width)), xc), to=_INT64)
        row = op.Add(row, block_start)  # (N, M, Lq, L, P) rows of `rows`
        sampled = op.Reshape(op.Gather(rows, row, axis=0), sampled_shape)
        term = op.MatMul(op.Reshape(weight, weights_shape), sampled)  # (N * M * Lq, 1, D)
        output = term if output is None else op.Add(output, term)

    # (N * M * Lq, 1, D) -> (N, M, Lq, D) -> (N, Lq, M, D) -> (N, Lq, M * D)
    output = op.Reshape(output, op.Concat(batch, op.Constant(value_ints=[m, -1, d]), axis=0))
    output = op.Transpose(output, perm=[0, 2, 1, 3])
    return op.Reshape(output, op.Concat(batch, op.Constant(value_ints=[-1, m * d]), axis=0))


def _grid_sample_form(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    from onnxscript import opset18 as op

    m, d, levels, points = _static_dims(value, sampling_locations)
    batch = op.Slice(op.Shape(value), [0], [1])  # (1,) N
    queries = op.Slice(op.Shape(sampling_locations), [1], [2])  # (1,) Lq
    # (N, S, M, D) -> (N, M, D, S): each level's slice of S reshapes to (N * M, D, H_l, W_l)
    value_t = op.Transpose(value, perm=[0, 2, 3, 1])
    # grid_sample's [-1, 1] coordinates, (N, Lq, M, L, P, 2) -> (N, M, Lq, L, P, 2)
    two = op.Constant(value_float=2.0)
    grids = op.Sub(op.Mul(sampling_locations, two), op.Constant(value_float=1.0))
    grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])
    flat_blocks = op.Constant(value_ints=[-1])
    grid_shape = op.Concat(flat_blocks, queries, op.Constant(value_ints=[points, 2]), axis=0)
    sampled = []
    for level in range(levels):
        size = op.Squeeze(op.Slice(spatial_shapes, [level], [level + 1], [0]), [0])  # (2,) H, W
        start = op.Slice(level_start_index, [level], [level + 1], [0])  # (1,)
        end = op.Add(start, op.ReduceProd(size, keepdims=1))
        value_l = op.Slice(value_t, start, end, [3])  # (N, M, D, H_l * W_l)
        map_shape = op.Concat(flat_blocks, op.Constant(value_ints=[d]), size, axis=0)
        value_l = op.Reshape(value_l, map_shape)  # (N * M, D, H_l, W_l)
        # (N, M, Lq, 1, P, 2) -> (N * M, Lq, P, 2)
        grid_l = op.Reshape(op.Slice(grids, [level], [level + 1], [3]), grid_shape)
        sampled.append(
            op.GridSample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=0)
        )  # (N * M, D, Lq, P)
    stacked = op.Concat(*sampled, axis=3)  # (N * M, D, Lq, L * P)
    weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])  # (N, M, Lq, L, P)
    weights_shape = op.Concat(
        flat_blocks,
        op.Constant(value_ints=[1]),
        queries,
        op.Constant(value_ints=[levels * points]),
        axis=0,
    )
    weights = op.Reshape(weights, weights_shape)  # (N * M, 1, Lq, L * P)
    output = op.ReduceSum(op.Mul(stacked, weights), [3], keepdims=0)  # (N * M, D, Lq)
    output = op.Reshape(output, op.Concat(batch, op.Constant(value_ints=[m * d, -1]), axis=0))
    return op.Transpose(output, perm=[0, 2, 1])  # (N, Lq, M * D)


def onnx_translation_table(form: str = DEFAULT_ONNX_ATTENTION) -> dict[Callable, Callable]:
    """`custom_translation_table` for torch.onnx.export: the detrkit op in the given form."""
    if form not in ONNX_ATTENTION_FORMS:
        raise ValueError(
            f"ONNX deformable attention form {form!r} is not one of {list(ONNX_ATTENTION_FORMS)}"
        )
    import detrkit.layers  # noqa: F401  (registers torch.ops.detrkit)

    translate = _gather_form if form == "gather" else _grid_sample_form
    return {torch.ops.detrkit.ms_deform_attn_forward.default: translate}
