"""The CUDA kernel of multi-scale deformable attention.

Two kinds of tests:
- emulated: the device code (detrkit/csrc/ms_deform_attn/cuda/kernels.cuh) compiled as host
  code with a CPU emulation of warps (threads, shuffles, atomics) and run against the float64
  reference. This checks the thread mapping, the shuffles, the reductions and the grad_value
  atomics on machines without a GPU; it cannot check speed, vector loads or the real atomics.
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
    (torch.bfloat16, torch.float32): "bf16_f32",
}


def run_emulated(lib, inputs, grad_output, forced_vec=0):
    value, spatial_shapes, level_start_index, loc, weights = inputs
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], spatial_shapes.shape[0], loc.shape[4]
    suffix = SUFFIX[(value.dtype, loc.dtype)]
    sizes = [ctypes.c_int64(x) for x in (N, S, M, D, Lq, L, P)]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())
    out = torch.full((N, Lq, M * D), float("nan"), dtype=value.dtype)
    forward = getattr(lib, f"msda_emulated_forward_{suffix}")
    forward.restype = ctypes.c_int
    G = forward(
        *map(ptr, (value, spatial_shapes, level_start_index, loc, weights, out)),
        *sizes,
        ctypes.c_int(forced_vec),
    )
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc)
    # NaN-filled: every entry must be written by exactly the lane that owns it
    grad_loc = torch.full_like(loc, float("nan"))
    grad_weights = torch.full_like(weights, float("nan"))
    backward = getattr(lib, f"msda_emulated_backward_{suffix}")
    backward.restype = ctypes.c_int
    G2 = backward(
        *map(ptr, (grad_output, value, spatial_shapes, level_start_index, loc, weights)),
        *map(ptr, (grad_value, grad_loc, grad_weights)),
        *sizes,
        ctypes.c_int(forced_vec),
    )
    assert G > 0 and G == G2, (G, G2)
    return G, out, (grad_value, grad_loc, grad_weights)


EMULATED_CASES = {
    # name: (shapes, N, M, D, Lq, P, value dtype, loc dtype, forced vector width, group size)
    "f64_d6": (((7, 5), (3, 9), (1, 1)), 3, 3, 6, 7, 3, torch.float64, torch.float64, 0, 4),
    "f32_d32_float4": (((6, 7), (3, 4)), 2, 2, 32, 9, 4, torch.float32, torch.float32, 0, 8),
    "f32_d96_scalar_rounds": (((4, 5),), 1, 2, 96, 3, 5, torch.float32, torch.float32, 1, 32),
    "f32_d12_partial_group": (
        ((5, 3), (2, 2)),
        3,
        1,
        12,
        10,
        3,
        torch.float32,
        torch.float32,
        0,
        4,
    ),
    "f32_d8_vec2": (((3, 6),), 2, 3, 8, 11, 7, torch.float32, torch.float32, 2, 4),
    "f32_d3_one_lane_points": (((4, 4), (2, 5)), 5, 2, 3, 6, 9, torch.float32, torch.float32, 0, 4),
    "bf16_d32_vec8": (((6, 5), (3, 3)), 2, 2, 32, 8, 4, torch.bfloat16, torch.float32, 0, 4),
}


@pytest.mark.parametrize("case", EMULATED_CASES)
def test_emulated_cuda_kernel_matches_reference(case, emulated, gen):
    shapes, N, M, D, Lq, P, dtype, loc_dtype, vec, expected_group = EMULATED_CASES[case]
    inputs = make_inputs(gen, shapes, N, M, D, Lq, P, dtype=dtype, loc_dtype=loc_dtype)
    grad_output = torch.randn(N, Lq, M * D, generator=gen, dtype=torch.float64).to(dtype)
    group_size, out, grads = run_emulated(emulated, inputs, grad_output, vec)
    assert group_size == expected_group
    ref, ref_grads = reference_with_grads(inputs, grad_output)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert not g.isnan().any(), f"grad of {name}: entries never written"
        gtol = 1e-11 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(
            g.double(), r, rtol=gtol, atol=gtol * (1 + r.abs().max().item()), msg=f"grad of {name}"
        )


def test_emulated_kernel_never_reads_outside_value(emulated, gen):
    """Levels that claim more rows than value has (arguments that slipped past the host checks,
    e.g. while compiling) read nothing; the valid level is still sampled."""
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
    bad_shapes = torch.tensor([[4, 5], [2, 4]], device="cuda")
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(inputs[0], bad_shapes, *inputs[2:])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(inputs[0], inputs[1], inputs[2], inputs[3].cpu(), inputs[4])
    with pytest.raises(RuntimeError, match="attention_weights"):
        torch.ops.detrkit.ms_deform_attn_forward(*inputs[:4], inputs[4].double())


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
