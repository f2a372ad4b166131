"""The CUDA kernel of multi-scale deformable attention.

Two kinds of tests:
- emulated: the device code (detrkit/csrc/ms_deform_attn/cuda/kernels.cuh) compiled as host
  code with a CPU emulation of warps (threads, shuffles, atomics) and run against the float64
  reference, launched with the grid, block, shared memory and vector width that the CUDA
  launcher's own planner (cuda/launch_plan.h) chooses, which is also tested on its own. This
  checks the launch planning, the thread mapping, the shuffles, the reductions and the
  grad_value atomics on machines without a GPU; it cannot check speed, the vector loads'
  alignment faults or the real atomics.
- `@pytest.mark.cuda`: the built extension on a real GPU (skipped where torch sees none).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension
from ms_deform_attn_helpers import make_inputs, reference_with_grads

from detrkit.layers import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_levels,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO_ROOT, "detrkit", "csrc")
EMULATION_SOURCE = os.path.join(CSRC, "ms_deform_attn", "cuda", "emulation", "emulate.cc")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# emulated device code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    library = tmp_path_factory.mktemp("msda_emulation") / "emulate.so"
    include = torch.utils.cpp_extension.include_paths()
    command = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-I", CSRC]
    command += [arg for path in include for arg in ("-I", path)]
    command += [EMULATION_SOURCE, "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


SUFFIX = {
    (torch.float32, torch.float32): "f32",
    (torch.float64, torch.float64): "f64",
    (torch.float16, torch.float16): "f16_f16",
    (torch.float16, torch.float32): "f16_f32",
    (torch.bfloat16, torch.bfloat16): "bf16_bf16",
    (torch.bfloat16, torch.float32): "bf16_f32",
}
PLAN_FIELDS = ("grid", "block", "smem", "vec", "group")
STATUS = {-1: "planner refused", -2: "shared memory overrun", -3: "no kernel for the width"}


def offset_copy(t: torch.Tensor, elements: int) -> torch.Tensor:
    """`t`'s values in a buffer starting `elements` elements into a fresh (64-byte aligned)
    allocation, so that its address is aligned to `elements * itemsize` bytes at best."""
    storage = torch.empty(t.numel() + elements, dtype=t.dtype)
    view = storage[elements:].view(t.shape)
    view.copy_(t)
    return view


def call_entry(entry, *args) -> dict:
    """Calls an emulated kernel entry; returns its launch plan, failing on a bad status."""
    plan = (ctypes.c_int64 * len(PLAN_FIELDS))()
    entry.restype = ctypes.c_int
    status = entry(*args, plan)
    assert status == 0, STATUS.get(status, status)
    return dict(zip(PLAN_FIELDS, plan))


def run_emulated(lib, inputs, grad_output):
    """Forward and backward of the emulated CUDA kernels on CPU buffers, launched as the CUDA
    launcher plans them for these buffers. Returns the plan (forward's and backward's agree
    here), the output and the gradients."""
    value, spatial_shapes, level_start_index, loc, weights = inputs
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], spatial_shapes.shape[0], loc.shape[4]
    suffix = SUFFIX[(value.dtype, loc.dtype)]
    sizes = [ctypes.c_int64(x) for x in (N, S, M, D, Lq, L, P)]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())
    out = torch.full((N, Lq, M * D), float("nan"), dtype=value.dtype)
    forward_plan = call_entry(
        getattr(lib, f"msda_emulated_forward_{suffix}"),
        *map(ptr, (value, spatial_shapes, level_start_index, loc, weights, out)),
        *sizes,
    )
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc)
    # NaN-filled: every entry must be written by exactly the lane that owns it
    grad_loc = torch.full_like(loc, float("nan"))
    grad_weights = torch.full_like(weights, float("nan"))
    backward_plan = call_entry(
        getattr(lib, f"msda_emulated_backward_{suffix}"),
        *map(ptr, (grad_output, value, spatial_shapes, level_start_index, loc, weights)),
        *map(ptr, (grad_value, grad_loc, grad_weights)),
        *sizes,
    )
    assert forward_plan == backward_plan
    return backward_plan, out, (grad_value, grad_loc, grad_weights)


EMULATED_CASES = {
    # name: (shapes, N, M, D, Lq, P, value dtype, loc dtype, value offset in elements,
    #        expected (vector width, group size))
    "f64_d6": (((7, 5), (3, 9), (1, 1)), 3, 3, 6, 7, 3, torch.float64, torch.float64, 0, (2, 4)),
    "f32_d32_float4": (((6, 7), (3, 4)), 2, 2, 32, 9, 4, torch.float32, torch.float32, 0, (4, 8)),
    # value 4-byte aligned only: scalar loads, 96 channels in 3 rounds of 32 lanes
    "f32_d96_scalar_rounds": (((4, 5),), 1, 2, 96, 3, 5, torch.float32, torch.float32, 1, (1, 32)),
    "f32_d12_partial_group": (((5, 3), (2, 2)), 3, 1, 12, 10, 3, torch.float32, None, 0, (4, 4)),
    # value 8-byte aligned only: float2 loads
    "f32_d8_vec2": (((3, 6),), 2, 3, 8, 11, 7, torch.float32, torch.float32, 2, (2, 4)),
    "f32_d3_one_lane_points": (((4, 4), (2, 5)), 5, 2, 3, 6, 9, torch.float32, None, 0, (1, 4)),
    "bf16_f32_d32": (((6, 5), (3, 3)), 2, 2, 32, 8, 4, torch.bfloat16, torch.float32, 0, (8, 4)),
    "bf16_bf16_d24_vec2": (((5, 6), (2, 3)), 2, 2, 24, 7, 3, torch.bfloat16, None, 2, (2, 16)),
    "f16_f16_d32_vec8": (((6, 5), (3, 3)), 2, 2, 32, 8, 4, torch.float16, None, 0, (8, 4)),
    "f16_f32_d16_vec4": (((4, 7), (2, 2)), 3, 2, 16, 5, 2, torch.float16, torch.float32, 4, (4, 4)),
    "f16_f16_d40_scalar": (((3, 5),), 2, 1, 40, 6, 3, torch.float16, None, 1, (1, 32)),
}

# Tolerance of a result in each dtype against the float64 reference on the same numbers:
# float32 (float64) accumulation, then one rounding to the result's dtype.
TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("case", EMULATED_CASES)
def test_emulated_cuda_kernel_matches_reference(case, emulated, gen):
    shapes, N, M, D, Lq, P, dtype, loc_dtype, offset, expected = EMULATED_CASES[case]
    inputs = make_inputs(gen, shapes, N, M, D, Lq, P, dtype=dtype, loc_dtype=loc_dtype)
    if offset:
        inputs[0] = offset_copy(inputs[0], offset)
    grad_output = torch.randn(N, Lq, M * D, generator=gen, dtype=torch.float64).to(dtype)
    plan, out, grads = run_emulated(emulated, inputs, grad_output)
    assert (plan["vec"], plan["group"]) == expected
    ref, ref_grads = reference_with_grads(inputs, grad_output)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert not g.isnan().any(), f"grad of {name}: entries never written"
        gtol = TOLERANCE[g.dtype]
        torch.testing.assert_close(
            g.double(), r, rtol=gtol, atol=gtol * (1 + r.abs().max().item()), msg=f"grad of {name}"
        )


def test_emulated_kernel_never_reads_outside_value(emulated, gen):
    """Levels that claim more rows than value has (device-resident level tables are not read
    back by the host; see ms_deform_attn_levels) read nothing; the valid level is still
    sampled."""
    inputs = make_inputs(gen, ((4, 5), (3, 3)), 2, 2, 4, 5, 2, dtype=torch.float32)
    inputs[1] = torch.tensor([[4, 5], [300, 300]])  # the second level would run far past S
    grad_output = torch.randn(2, 5, 8, generator=gen)
    _, out, grads = run_emulated(emulated, inputs, grad_output)
    only_first = [t.clone() for t in inputs]
    only_first[4][:, :, :, 1] = 0  # the second level contributes nothing
    only_first[1] = torch.tensor([[4, 5], [3, 3]])
    ref, ref_grads = reference_with_grads(only_first, grad_output)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(grads[1][:, :, :, 1], torch.zeros_like(grads[1][:, :, :, 1]))


# ---------------------------------------------------------------------------------------------
# the launch planner (launch_plan.h): the host code every CUDA call runs first
# ---------------------------------------------------------------------------------------------


def plan_launch(lib, N, Lq, M, D, L, P, itemsize, misaligned_bytes=0) -> tuple[dict, str]:
    """The planner's launch for sizes and element size, with the first buffer (value) at a
    1 MiB-aligned address plus misaligned_bytes and the second (a fresh output) aligned.
    Returns the plan and the planner's error message ("" when it accepts)."""
    entry = lib.msda_plan_launch
    entry.restype = ctypes.c_int
    out = (ctypes.c_int64 * len(PLAN_FIELDS))()
    error = ctypes.create_string_buffer(256)
    sizes = [ctypes.c_int64(x) for x in (N, 1000, M, D, Lq, L, P, itemsize)]
    addresses = [ctypes.c_size_t((1 << 20) + misaligned_bytes), ctypes.c_size_t(1 << 21)]
    status = entry(*sizes, *addresses, out, error, ctypes.c_int64(len(error)))
    assert (status == 0) == (error.value == b"")
    return dict(zip(PLAN_FIELDS, out)), error.value.decode()


# (itemsize, D, value misaligned by bytes) -> (vector width, group size), by hand: the widest
# vector of at most 16 bytes that divides D and the value's alignment; then the smallest power
# of two of lanes covering D / width chunks, at most 32 (wider D takes rounds).
VECTOR_CASES = {
    "f32_d32_aligned": ((4, 32, 0), (4, 8)),
    "f32_d32_off4": ((4, 32, 4), (1, 32)),
    "f32_d32_off8": ((4, 32, 8), (2, 16)),
    "f32_d6": ((4, 6, 0), (2, 4)),
    "f32_d3": ((4, 3, 0), (1, 4)),
    "f32_d96_rounds": ((4, 96, 0), (4, 32)),
    "f64_d32": ((8, 32, 0), (2, 16)),
    "f64_d32_off8": ((8, 32, 8), (1, 32)),
    "half_d32_aligned": ((2, 32, 0), (8, 4)),
    "half_d32_off2": ((2, 32, 2), (1, 32)),
    "half_d32_off4": ((2, 32, 4), (2, 16)),
    "half_d32_off8": ((2, 32, 8), (4, 8)),
    "half_d12": ((2, 12, 0), (4, 4)),
}


@pytest.mark.parametrize("case", VECTOR_CASES)
def test_planner_vector_width_and_group(case, emulated):
    (itemsize, D, misaligned), expected = VECTOR_CASES[case]
    got, error = plan_launch(emulated, 2, 300, 8, D, 4, 4, itemsize, misaligned)
    assert error == ""
    assert (got["vec"], got["group"]) == expected


@pytest.mark.parametrize(
    "N, Lq, M, D, L, itemsize, grid",
    [
        # (n, q, m) triples * group lanes / 256 threads per block, rounded up; by hand
        (2, 300, 8, 32, 4, 4, 150),  # 4800 triples * 8 lanes = 38400 threads
        (2, 300, 8, 32, 4, 2, 75),  # bf16: 4 lanes
        (1, 5, 3, 32, 1, 4, 1),  # 120 threads
        (3, 7, 5, 96, 2, 4, 14),  # 105 triples * 32 lanes = 3360 threads = 13.125 blocks
        (1, 1, 1, 8, 1024, 8, 1),  # the most levels: 1024
    ],
)
def test_planner_grid_block_and_shared_memory(N, Lq, M, D, L, itemsize, grid, emulated):
    got, error = plan_launch(emulated, N, Lq, M, D, L, 4, itemsize)
    assert error == ""
    assert got["grid"] == grid
    assert got["block"] == 256
    # the level table: an int64 first row and two int32 sizes per level
    assert got["smem"] == L * (8 + 4 + 4)


def test_planner_refuses_what_cannot_launch(emulated):
    _, error = plan_launch(emulated, 1, 1, 1, 8, 1025, 4, 4)
    assert "at most 1024 levels" in error
    # 2^31 blocks of 256 threads, with 8 lanes per triple
    _, error = plan_launch(emulated, 1, 2**36, 1, 32, 4, 4, 4)
    assert "too many queries" in error


# ---------------------------------------------------------------------------------------------
# the real kernel (needs a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
def test_cuda_kernel_is_built():
    assert ms_deform_attn_backend("cuda") == "cuda-kernel"


GPU_CASES = {
    # name: (shapes, N, M, D, Lq, P)
    "odd_levels": (((7, 5), (3, 9), (1, 1)), 2, 3, 5, 6, 3),
    "one_level": (((6, 11),), 1, 2, 4, 9, 4),
    "batch_3_d32": (((9, 13), (5, 7), (3, 4), (2, 2)), 3, 8, 32, 50, 4),
    "batch_5_d64": (((5, 3), (3, 2)), 5, 2, 64, 33, 2),
    "d320_rounds": (((4, 6),), 2, 1, 320, 7, 3),
    "d3": (((4, 4), (2, 5)), 2, 2, 3, 6, 9),
}


def _to(inputs, device):
    return [t.to(device) for t in inputs]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(case, dtype, gen):
    shapes, N, M, D, Lq, P = GPU_CASES[case]
    inputs = make_inputs(gen, shapes, N, M, D, Lq, P, dtype=dtype)
    grad_output = torch.randn(N, Lq, M * D, generator=gen, dtype=torch.float64).to(dtype)
    cuda_inputs = _to(inputs, "cuda")
    leaves = [cuda_inputs[i].requires_grad_() for i in (0, 3, 4)]
    out = ms_deform_attn(*cuda_inputs)
    grads = torch.autograd.grad(out, leaves, grad_output.cuda())
    ref, ref_grads = reference_with_grads(inputs, grad_output)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r, rtol=10 * tol, atol=10 * tol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(
    "value_dtype, loc_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_cuda_half_types_within_1e_2(value_dtype, loc_dtype, gen):
    inputs = make_inputs(
        gen, ((9, 13), (5, 7), (3, 4)), 3, 8, 32, 40, 4, dtype=value_dtype, loc_dtype=loc_dtype
    )
    grad_output = torch.randn(3, 40, 256, generator=gen).to(value_dtype)
    cuda_inputs = _to(inputs, "cuda")
    leaves = [cuda_inputs[i].requires_grad_() for i in (0, 3, 4)]
    out = ms_deform_attn(*cuda_inputs)
    grads = torch.autograd.grad(out, leaves, grad_output.cuda())
    ref, ref_grads = reference_with_grads(inputs, grad_output)
    assert out.dtype == value_dtype
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2
    for g, r, t in zip(grads, ref_grads, (inputs[0], inputs[3], inputs[4])):
        assert g.dtype == t.dtype
        assert ((g.double().cpu() - r).norm() / r.norm()).item() < 1e-2


@pytest.mark.cuda
@needs_gpu
def test_cuda_gradcheck_float64(gen):
    inputs = _to(make_inputs(gen, ((3, 4), (2, 3)), 2, 2, 3, 3, 2, margin=0.1), "cuda")
    value, shapes, start, loc, weights = inputs
    op = lambda v, locations, w: ms_deform_attn(v, shapes, start, locations, w)
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.cuda
@needs_gpu
def test_cuda_unaligned_value_falls_back_to_narrow_loads(gen):
    """A value tensor starting one element into its storage cannot use 16-byte loads."""
    inputs = make_inputs(gen, ((6, 7), (3, 4)), 2, 2, 32, 9, 4, dtype=torch.float32)
    storage = torch.empty(inputs[0].numel() + 1, device="cuda")
    value = storage[1:].view(inputs[0].shape)
    value.copy_(inputs[0])
    cuda_inputs = _to(inputs, "cuda")
    cuda_inputs[0] = value
    out = ms_deform_attn(*cuda_inputs)
    ref, _ = reference_with_grads(inputs, torch.zeros(2, 9, 64))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_gpu
def test_cuda_bad_input_raises(gen):
    inputs = _to(make_inputs(gen, ((4, 5), (2, 3)), 2, 2, 4, 3, 2, dtype=torch.float32), "cuda")
    # device-resident level tables are checked where they are built, not read back per call
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_levels([(4, 5), (0, 3)], "cuda")
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(inputs[0], inputs[1], inputs[2], inputs[3].cpu(), inputs[4])
    with pytest.raises(RuntimeError, match="attention_weights"):
        torch.ops.detrkit.ms_deform_attn_forward(*inputs[:4], inputs[4].double())


@pytest.mark.cuda
@needs_gpu
def test_cuda_forward_and_backward_never_synchronize(gen):
    """No host-device synchronization on the model's hot path: the entry point checks
    metadata only and the kernel reads the level table on the device."""
    inputs = make_inputs(gen, ((9, 13), (5, 7), (3, 4)), 2, 8, 32, 50, 4, dtype=torch.float32)
    spatial_shapes, level_start_index = ms_deform_attn_levels([(9, 13), (5, 7), (3, 4)], "cuda")
    value, _, _, loc, weights = [t.cuda() for t in inputs]
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref, ref_grads = reference_with_grads(inputs, torch.ones(out.shape))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@needs_gpu
def test_cuda_module_autocast_and_compile(gen):
    module = MultiScaleDeformableAttention(64, 4, 2, 3, batch_first=True, dropout=0.0).cuda()
    shapes = torch.tensor([[8, 9], [4, 5]], device="cuda")
    start = torch.tensor([0, 72], device="cuda")
    query = torch.randn(2, 10, 64, device="cuda")
    value = torch.randn(2, 92, 64, device="cuda")
    ref = torch.rand(2, 10, 2, 4, device="cuda")
    kwargs = dict(value=value, reference_points=ref, spatial_shapes=shapes, level_start_index=start)
    expected = module(query, **kwargs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(query, **kwargs)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(query, **kwargs), expected, rtol=1e-4, atol=1e-4)
