"""The multi-scale deformable attention operator on the CPU: the C++ kernel against the
pure-PyTorch grid_sample reference (float64 oracle), its registration with torch.library
(opcheck, torch.compile, torch.export), the fallback without the extension, and bad input.

Inputs are drawn fresh every run; the seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from ms_deform_attn_helpers import make_inputs, reference_with_grads

from detrkit.layers.ms_deform_attn import (
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_levels,
    ms_deform_attn_reference,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_and_reference_grads(inputs, grad_output):
    """Gradients (value, locations, weights) of the kernel on `inputs` and of the float64
    reference on the same numbers."""
    leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    out = ms_deform_attn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_output.to(out.dtype))
    ref, ref_grads = reference_with_grads(inputs, grad_output)
    return out, grads, ref, ref_grads


CASES = {
    # name: (spatial shapes, N, M, D, Lq, P)
    "odd_levels": (((7, 5), (3, 9), (1, 1)), 2, 3, 5, 6, 3),
    "one_level": (((6, 11),), 1, 2, 4, 9, 4),
    "batch_1": (((4, 6), (2, 3)), 1, 2, 8, 5, 2),
    "batch_3": (((5, 3), (3, 2)), 3, 1, 16, 4, 2),
    "batch_5_d32": (((4, 4), (2, 3)), 5, 2, 32, 3, 4),
    "d48_chunks": (((3, 5),), 2, 2, 48, 4, 2),
    "d7_scalar": (((5, 4), (2, 2), (1, 3)), 2, 2, 7, 5, 1),
}


def test_cpu_kernel_is_built():
    """`make install` builds detrkit._C; the CPU kernel (not the reference) must serve CPU."""
    assert ms_deform_attn_backend("cpu") == "cpu-kernel"
    assert ms_deform_attn_backend(torch.device("cpu")) == "cpu-kernel"


def test_cuda_tensors_without_a_cuda_kernel_go_to_the_reference():
    """A build without the CUDA kernel still serves CUDA tensors: the Python reference is
    registered for the CUDA dispatch key (and said to be the backend)."""
    if ms_deform_attn_backend("cuda") == "cuda-kernel":
        pytest.skip("this build has the CUDA kernel")
    for op in ("detrkit::ms_deform_attn_forward", "detrkit::ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    assert ms_deform_attn_backend("cuda:0") == "reference"


@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_reference_float64(case, gen):
    shapes, N, M, D, Lq, P = CASES[case]
    inputs = make_inputs(gen, shapes, N, M, D, Lq, P)
    grad_output = torch.randn(N, Lq, M * D, generator=gen, dtype=torch.float64)
    out, grads, ref, ref_grads = kernel_and_reference_grads(inputs, grad_output)
    assert out.shape == (N, Lq, M * D) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11, msg=f"grad of {name}")


def test_gradcheck_cpu_kernel_float64(gen):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        gen, ((3, 4), (2, 3)), N=2, M=2, D=3, Lq=3, P=2, margin=0.1
    )

    def op(v, loc, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, loc, w)

    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_matches_reference(gen):
    inputs = make_inputs(gen, ((9, 13), (5, 7), (3, 4), (2, 2)), N=2, M=4, D=32, Lq=20, P=4)
    inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    grad_output = torch.randn(2, 20, 128, generator=gen, dtype=torch.float64)
    out, grads, ref, ref_grads = kernel_and_reference_grads(inputs, grad_output)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "value_dtype, loc_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_half_types_within_1e_2_of_reference(value_dtype, loc_dtype, gen):
    """Half inputs, float32 accumulation: within 1e-2 relative of the float64 reference on
    the same (rounded) numbers; gradients come back in each input's own dtype."""
    inputs = make_inputs(
        gen,
        ((9, 13), (5, 7), (3, 4)),
        N=3,
        M=2,
        D=32,
        Lq=15,
        P=4,
        dtype=value_dtype,
        loc_dtype=loc_dtype,
    )
    grad_output = torch.randn(3, 15, 64, generator=gen, dtype=torch.float64).to(value_dtype)
    out, grads, ref, ref_grads = kernel_and_reference_grads(inputs, grad_output)
    assert out.dtype == value_dtype
    assert relative_error(out, ref) < 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    for g, r, t in zip(grads, ref_grads, (inputs[0], inputs[3], inputs[4])):
        assert g.dtype == t.dtype
        assert relative_error(g, r) < 1e-2


def test_locations_outside_every_map_read_zero(gen):
    inputs = make_inputs(gen, ((4, 5), (2, 3)), N=2, M=2, D=4, Lq=5, P=3)
    far = torch.rand(inputs[3].shape, generator=gen, dtype=torch.float64)
    side = torch.rand((*inputs[3].shape[:-1], 1), generator=gen) < 0.5
    # every location at least one pixel beyond an edge: x or y below -1/size or above 1 + 1/size
    inputs[3] = torch.where(side, -2.0 - far, 2.0 + far).contiguous()
    grad_output = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    out, grads, _, _ = kernel_and_reference_grads(inputs, grad_output)
    assert torch.equal(out, torch.zeros_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_locations_on_the_zero_padding_border_match_grid_sample(gen):
    """Pixel coordinates of exactly -1 and W - 1 / H - 1 (half inside, half in the padding),
    where a kernel that skips 'outside' samples too eagerly would lose the location gradient.
    Power-of-two sizes keep both coordinate formulas exact."""
    shapes = ((4, 8), (2, 4))
    inputs = make_inputs(gen, shapes, N=1, M=2, D=3, Lq=4, P=2)
    loc = inputs[3]
    for level, (h, w) in enumerate(shapes):
        # x = -0.5 / w gives pixel x = -1; x = (w - 0.5) / w gives pixel x = w - 1
        loc[:, 0, :, level, :, 0] = -0.5 / w
        loc[:, 1, :, level, :, 0] = (w - 0.5) / w
        loc[:, 2, :, level, :, 1] = -0.5 / h
        loc[:, 3, :, level, :, 1] = (h - 0.5) / h
    grad_output = torch.randn(1, 4, 6, generator=gen, dtype=torch.float64)
    out, grads, ref, ref_grads = kernel_and_reference_grads(inputs, grad_output)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)


def test_result_does_not_depend_on_thread_count(gen):
    inputs = make_inputs(gen, ((9, 7), (4, 4)), N=3, M=4, D=8, Lq=40, P=2, dtype=torch.float32)
    grad_output = torch.randn(3, 40, 32, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = torch.ops.detrkit.ms_deform_attn_forward(*inputs)
            grads = torch.ops.detrkit.ms_deform_attn_backward(grad_output, *inputs)
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_query_set(gen):
    inputs = make_inputs(gen, ((3, 3),), N=2, M=2, D=4, Lq=0, P=2)
    for t in (inputs[0], inputs[3], inputs[4]):
        t.requires_grad_()
    out = ms_deform_attn(*inputs)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(inputs[0].grad, torch.zeros_like(inputs[0]))


@pytest.mark.parametrize(
    "value_dtype, loc_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]
)
def test_opcheck(value_dtype, loc_dtype, gen):
    """torch.library's own consistency checks: schema, autograd registration, fake kernel,
    AOT dispatch with dynamic shapes."""
    inputs = make_inputs(
        gen, ((4, 3), (2, 2)), N=2, M=2, D=4, Lq=3, P=2, dtype=value_dtype, loc_dtype=loc_dtype
    )
    for i in (0, 3, 4):
        inputs[i].requires_grad_()
    torch.library.opcheck(torch.ops.detrkit.ms_deform_attn_forward.default, tuple(inputs))


def test_double_backward_is_an_error_not_silently_wrong(gen):
    inputs = make_inputs(gen, ((4, 3), (2, 2)), N=1, M=2, D=3, Lq=2, P=2)
    for i in (0, 3, 4):
        inputs[i].requires_grad_()
    out = ms_deform_attn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [inputs[0], inputs[3]], create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        penalty.backward()
    # the reference, differentiable to any order, is the way to get them
    out = ms_deform_attn_reference(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [inputs[0], inputs[3]], create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    assert inputs[3].grad is not None and torch.isfinite(inputs[3].grad).all()


def test_meta_tensors_give_the_output_shape(gen):
    # shape inference on the meta device (e.g. building or FLOP-counting a model without memory)
    inputs = make_inputs(gen, ((4, 3), (2, 2)), N=2, M=2, D=3, Lq=5, P=2, dtype=torch.float32)
    out = ms_deform_attn(*[t.to("meta") for t in inputs])
    assert out.device.type == "meta" and out.shape == (2, 5, 6) and out.dtype == torch.float32


class SmallDeformable(torch.nn.Module):
    """A module that predicts locations and weights and calls the operator."""

    def __init__(self, channels: int, levels: int, points: int) -> None:
        super().__init__()
        self.value_proj = torch.nn.Linear(channels, channels)
        self.locations = torch.nn.Linear(channels, levels * points * 2)
        self.weights = torch.nn.Linear(channels, levels * points)
        self.levels, self.points = levels, points

    def forward(self, query, value, spatial_shapes, level_start_index):
        N, Lq, C = query.shape
        value = self.value_proj(value).view(N, value.shape[1], 1, C)
        loc = self.locations(query).sigmoid().view(N, Lq, 1, self.levels, self.points, 2)
        weights = self.weights(query).softmax(-1).view(N, Lq, 1, self.levels, self.points)
        return ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)


def small_module_inputs(gen: torch.Generator):
    shapes = torch.tensor([[6, 5], [3, 3]], dtype=torch.int64)
    start = torch.tensor([0, 30], dtype=torch.int64)
    query = torch.randn(2, 7, 8, generator=gen)
    value = torch.randn(2, 39, 8, generator=gen)
    return query, value, shapes, start


def _compiled_matches_eager(backend: str, gen: torch.Generator) -> None:
    module = SmallDeformable(8, 2, 3)
    args = small_module_inputs(gen)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    out = compiled(*args)
    out.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    expected = module(*args)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(compiled_grads, [p.grad for p in module.parameters()]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph(gen):
    """Dynamo traces the module in one graph and AOTAutograd differentiates through the op
    (fake kernels + the registered autograd formula)."""
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager", gen)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor(gen):
    torch._dynamo.reset()
    _compiled_matches_eager("inductor", gen)


def test_torch_export(gen):
    module = SmallDeformable(8, 2, 3)
    args = small_module_inputs(gen)
    exported = torch.export.export(module, args)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.detrkit.ms_deform_attn_forward.default in targets
    fresh = small_module_inputs(gen)  # the exported program runs on new inputs too
    torch.testing.assert_close(exported.module()(*fresh), module(*fresh))


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, never a crash or silent garbage
# ---------------------------------------------------------------------------------------------


def _bad(gen, what: str) -> list:
    inputs = make_inputs(gen, ((4, 5), (2, 3)), N=2, M=2, D=4, Lq=3, P=2, dtype=torch.float32)
    value, shapes, _, loc, weights = inputs
    if what == "loc_float64_value_float32":
        inputs[3] = loc.double()
        inputs[4] = weights.double()
    elif what == "loc_float16_value_bfloat16":
        inputs[0] = value.bfloat16()
        inputs[3] = loc.half()
        inputs[4] = weights.half()
    elif what == "weights_dtype_differs":
        inputs[4] = weights.double()
    elif what == "value_int":
        inputs[0] = value.long()
    elif what == "spatial_shapes_int32":
        inputs[1] = shapes.int()
    elif what == "spatial_shapes_sum":
        inputs[1] = torch.tensor([[4, 5], [2, 4]])
    elif what == "spatial_shapes_zero":
        inputs[1] = torch.tensor([[0, 5], [2, 3]])
    elif what == "level_start_index_values":
        inputs[2] = torch.tensor([0, 19])
    elif what == "level_start_index_length":
        inputs[2] = torch.tensor([0])
    elif what == "loc_batch":
        inputs[3] = loc[:1].contiguous()
    elif what == "loc_heads":
        inputs[3] = torch.cat((loc, loc), 2)
    elif what == "loc_levels":
        inputs[3] = loc[:, :, :, :1].contiguous()
    elif what == "loc_last_dim":
        inputs[3] = torch.cat((loc, loc[..., :1]), -1)
    elif what == "weights_points":
        inputs[4] = weights[..., :1].contiguous()
    elif what == "value_rank":
        inputs[0] = value.flatten(2)
    elif what == "value_noncontiguous":
        inputs[0] = value.transpose(2, 3).contiguous().transpose(2, 3)
    elif what == "loc_noncontiguous":
        inputs[3] = loc.transpose(1, 2).contiguous().transpose(1, 2)
    elif what == "weights_noncontiguous":
        inputs[4] = weights.transpose(3, 4).contiguous().transpose(3, 4)
    elif what == "spatial_shapes_noncontiguous":
        inputs[1] = shapes.t().contiguous().t()
    elif what == "spatial_shapes_device":
        inputs[1] = shapes.to("meta")
    else:
        raise AssertionError(what)
    return inputs


BAD_INPUTS = {
    # case: (expected argument name in the message, extra text expected)
    "loc_float64_value_float32": ("sampling_locations", "accepted"),
    "loc_float16_value_bfloat16": ("sampling_locations", "accepted"),
    "weights_dtype_differs": ("attention_weights", "share one dtype"),
    "value_int": ("value", "float32"),
    "spatial_shapes_int32": ("spatial_shapes", "int64"),
    "spatial_shapes_sum": ("spatial_shapes", "S = 26"),
    "spatial_shapes_zero": ("spatial_shapes", "positive"),
    "level_start_index_values": ("level_start_index", "running sum"),
    "level_start_index_length": ("level_start_index", "(L,)"),
    "loc_batch": ("sampling_locations", "N=2"),
    "loc_heads": ("sampling_locations", "M=2"),
    "loc_levels": ("sampling_locations", "L=2"),
    "loc_last_dim": ("sampling_locations", "(N, Lq, M, L, P, 2)"),
    "weights_points": ("attention_weights", "(N, Lq, M, L, P)"),
    "value_rank": ("value", "(N, S, M, D)"),
    "value_noncontiguous": ("value", "contiguous"),
    "loc_noncontiguous": ("sampling_locations", "contiguous"),
    "weights_noncontiguous": ("attention_weights", "contiguous"),
    "spatial_shapes_noncontiguous": ("spatial_shapes", "contiguous"),
    "spatial_shapes_device": ("spatial_shapes", "device"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(case, gen):
    name, detail = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError)) as info:
        ms_deform_attn(*_bad(gen, case))
    message = str(info.value)
    assert name in message, message
    assert detail in message or detail.replace("device", "is on") in message, message


RAW_OP_CASES = [
    "loc_float64_value_float32",
    "weights_dtype_differs",
    "spatial_shapes_sum",
    "level_start_index_values",
    "loc_batch",
    "weights_points",
    "value_noncontiguous",
    "loc_noncontiguous",
    "spatial_shapes_int32",
]


@pytest.mark.parametrize("case", RAW_OP_CASES)
def test_raw_op_checks_its_arguments_too(case, gen):
    """Callers of torch.ops.detrkit.* directly get the C++ checks: a RuntimeError naming the
    argument, not an out-of-bounds read."""
    name, _ = BAD_INPUTS[case]
    inputs = _bad(gen, case)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.detrkit.ms_deform_attn_forward(*inputs)
    value = inputs[0]
    grad_output = torch.zeros(value.shape[0], inputs[3].shape[1], value.shape[2] * value.shape[3])
    with pytest.raises(RuntimeError, match=name):
        torch.ops.detrkit.ms_deform_attn_backward(grad_output.to(value.dtype), *inputs)


def test_levels_are_built_and_checked_on_the_host():
    spatial_shapes, level_start_index = ms_deform_attn_levels([(7, 5), (3, 9), (1, 1)])
    assert spatial_shapes.dtype == level_start_index.dtype == torch.int64
    assert spatial_shapes.tolist() == [[7, 5], [3, 9], [1, 1]]
    assert level_start_index.tolist() == [0, 35, 62]  # 0, 7 * 5, 7 * 5 + 3 * 9
    for bad in ([(7, 5), (0, 9)], [(-1, 5)], [(2**15, 2**15 + 1)]):
        with pytest.raises(ValueError, match=r"spatial_shapes\[\d\] = .* positive sizes"):
            ms_deform_attn_levels(bad)


def test_raw_backward_checks_grad_output(gen):
    inputs = make_inputs(gen, ((4, 5),), N=2, M=2, D=4, Lq=3, P=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.detrkit.ms_deform_attn_backward(torch.zeros(2, 3, 7), *inputs)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.detrkit.ms_deform_attn_backward(torch.zeros(2, 3, 8).double(), *inputs)


BASELINE_SCRIPT = textwrap.dedent(
    """
    import os, torch
    from detrkit.layers.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    shapes = torch.tensor([[5, 7], [3, 2]])
    start = torch.tensor([0, 35])
    for D, dtype in ((32, torch.float32), (5, torch.float64), (16, torch.bfloat16)):
        v = torch.randn(3, 41, 2, D, dtype=torch.float64, generator=gen).to(dtype)
        loc = torch.rand(3, 6, 2, 2, 3, 2, dtype=torch.float64, generator=gen) * 1.4 - 0.2
        w = torch.rand(3, 6, 2, 2, 3, dtype=torch.float64, generator=gen)
        loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        leaves = [t.requires_grad_() for t in (v, loc.to(loc_dtype), w.to(loc_dtype))]
        out = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2])
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves, g.to(dtype))
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = ms_deform_attn_reference(ref_leaves[0], shapes, start, *ref_leaves[1:])
        ref_grads = torch.autograd.grad(ref, ref_leaves, g)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        scale = lambda r: tol * (1 + r.abs().max().item())
        assert (out.double() - ref).abs().max() <= scale(ref), dtype
        for a, b in zip(grads, ref_grads):
            assert (a.double() - b).abs().max() <= 10 * scale(b), dtype
    print("BASELINE OK")
    """
)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_narrower_cpu_loops(isa):
    """The loops of CPUs without AVX-512 or AVX2 (forced by DETRKIT_MSDA_CPU_ISA) are correct
    too; the rest of this file runs the widest variant the machine has."""
    env = dict(os.environ, DETRKIT_MSDA_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-c", BASELINE_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BASELINE OK" in result.stdout


def test_unknown_cpu_isa_setting_is_an_error_naming_the_choices():
    script = (
        "import torch, detrkit.layers.ms_deform_attn\n"
        "v = torch.zeros(1, 4, 1, 2); loc = torch.zeros(1, 1, 1, 1, 1, 2)\n"
        "torch.ops.detrkit.ms_deform_attn_forward(v, torch.tensor([[2, 2]]), torch.tensor([0]),"
        " loc, torch.ones(1, 1, 1, 1, 1))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=dict(os.environ, DETRKIT_MSDA_CPU_ISA="avx"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "DETRKIT_MSDA_CPU_ISA='avx'" in result.stderr, result.stderr
    assert "expected baseline, avx2 or avx512" in result.stderr, result.stderr


VARIANT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import detrkit.layers.ms_deform_attn  # registers the operator
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    shapes = torch.tensor([[9, 11], [5, 6], [2, 3]])
    start = torch.tensor([0, 99, 129])
    results = []
    for D in (32, 16, 6):
        v = torch.randn(2, 135, 4, D, generator=gen)
        loc = torch.rand(2, 20, 4, 3, 4, 2, generator=gen) * 1.4 - 0.2
        w = torch.rand(2, 20, 4, 3, 4, generator=gen)
        g = torch.randn(2, 20, 4 * D, generator=gen)
        results.append(torch.ops.detrkit.ms_deform_attn_forward(v, shapes, start, loc, w))
        results.extend(torch.ops.detrkit.ms_deform_attn_backward(g, v, shapes, start, loc, w))
    torch.save(results, sys.argv[2])
    """
)


def test_avx2_and_widest_cpu_loops_give_the_same_bits(tmp_path):
    """Both vector variants use one fused multiply-add per channel in the same order, so a
    machine with AVX-512 and one with only AVX2 compute the same numbers (trivially true where
    AVX2 is the widest)."""
    seed = str(int.from_bytes(os.urandom(4), "little"))
    results = {}
    for isa in ("avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        run = subprocess.run(
            [sys.executable, "-c", VARIANT_SCRIPT, seed, str(path)],
            cwd=REPO_ROOT,
            env=dict(os.environ, DETRKIT_MSDA_CPU_ISA=isa),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        results[isa] = torch.load(path)
    for a, b in zip(results["avx2"], results["avx512"]):
        assert torch.equal(a, b), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------
# the fallback: no detrkit._C
# ---------------------------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    sys.modules["detrkit._C"] = None  # as if the extension had not been built
    import torch
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    logging.getLogger("detrkit").addHandler(Keep())
    from detrkit.layers.ms_deform_attn import (
        ms_deform_attn, ms_deform_attn_backend, ms_deform_attn_reference)

    assert ms_deform_attn_backend("cpu") == "reference", ms_deform_attn_backend("cpu")
    assert ms_deform_attn_backend("cuda") == "reference"
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    shapes = torch.tensor([[5, 7], [3, 2]])
    start = torch.tensor([0, 35])
    def leaves():
        v = torch.randn(2, 41, 2, 3, dtype=torch.float64, generator=gen)
        loc = torch.rand(2, 4, 2, 2, 2, 2, dtype=torch.float64, generator=gen) * 1.4 - 0.2
        w = torch.rand(2, 4, 2, 2, 2, dtype=torch.float64, generator=gen)
        return [t.requires_grad_() for t in (v, loc, w)]
    v, loc, w = leaves()
    out = ms_deform_attn(v, shapes, start, loc, w)
    ms_deform_attn(v, shapes, start, loc, w)
    ref = ms_deform_attn_reference(v, shapes, start, loc, w)
    assert torch.allclose(out, ref, rtol=0, atol=1e-13)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [v, loc, w], g)
    want = torch.autograd.grad(ref, [v, loc, w], g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a - b).abs().max()
    # the fallback's backward is written out by hand: check it against finite differences
    assert torch.autograd.gradcheck(
        lambda a, b, c: ms_deform_attn(a, shapes, start, b, c), leaves(), eps=1e-6, atol=1e-7)
    torch.library.opcheck(torch.ops.detrkit.ms_deform_attn_forward.default,
                          (v, shapes, start, loc, w))
    try:
        ms_deform_attn(v, torch.tensor([[5, 7], [3, 3]]), start, loc, w)
    except ValueError as e:
        assert "spatial_shapes" in str(e)
    else:
        raise AssertionError("no error for inconsistent spatial_shapes")
    warnings = [r for r in records if r.levelname == "WARNING" and "reference" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in records]
    assert "detrkit._C is not built" in warnings[0].getMessage()
    assert warnings[0].name == "detrkit.layers.ms_deform_attn"
    print("FALLBACK OK")
    """
)


def test_fallback_without_extension_uses_reference_and_warns_once():
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FALLBACK OK" in result.stdout
