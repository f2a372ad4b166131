"""MultiScaleDeformableAttention: initialization, state-dict names, and forward against a
step-by-step computation with the pure-PyTorch reference operator (float64)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from detrkit.layers import MultiScaleDeformableAttention, ms_deform_attn_reference

# the file that defines the module, whose `ms_deform_attn` the spies below replace
msda_module = importlib.import_module("detrkit.layers.ms_deform_attn.module")


SHAPES = ((6, 7), (3, 4), (2, 2))


def pyramid(shapes=SHAPES):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    return spatial_shapes, level_start_index, int(sizes.sum())


def randomized_module(gen, embed_dim=16, heads=2, levels=3, points=2, **kwargs):
    """A float64 module in eval mode (no dropout) with every parameter random, so offsets and
    attention logits are not the trivial initial ones."""
    module = MultiScaleDeformableAttention(embed_dim, heads, levels, points, **kwargs).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return module.eval()


def expected_output(
    module,
    query,
    value,
    reference_points,
    spatial_shapes,
    level_start_index,
    query_pos=None,
    key_padding_mask=None,
):
    """The module's forward written out step by step (batch-first tensors), on the reference."""
    N, Lq, C = query.shape
    S = value.shape[1]
    M, L, P = module.num_heads, module.num_levels, module.num_points
    q = query if query_pos is None else query + query_pos
    v = value @ module.value_proj.weight.T + module.value_proj.bias
    if key_padding_mask is not None:
        v = v * (~key_padding_mask)[..., None]
    v = v.view(N, S, M, C // M)
    offsets = (q @ module.sampling_offsets.weight.T + module.sampling_offsets.bias).view(
        N, Lq, M, L, P, 2
    )
    logits = (q @ module.attention_weights.weight.T + module.attention_weights.bias).view(
        N, Lq, M, L * P
    )
    weights = torch.softmax(logits, -1).view(N, Lq, M, L, P)
    locations = torch.empty(N, Lq, M, L, P, 2, dtype=query.dtype)
    for level in range(L):
        h, w = spatial_shapes[level].tolist()
        ref = reference_points[:, :, level if reference_points.shape[2] > 1 else 0]
        for xy, size in ((0, w), (1, h)):
            off = offsets[..., level, :, xy]  # (N, Lq, M, P)
            if ref.shape[-1] == 2:
                locations[..., level, :, xy] = ref[:, :, None, None, xy] + off / size
            else:
                half_wh = ref[:, :, None, None, 2 + xy] * 0.5
                locations[..., level, :, xy] = ref[:, :, None, None, xy] + off / P * half_wh
    sampled = ms_deform_attn_reference(v, spatial_shapes, level_start_index, locations, weights)
    return query + sampled @ module.output_proj.weight.T + module.output_proj.bias


def test_initialization_follows_deformable_detr():
    """The one test of the initialization; tests/test_deformable_detr.py only checks that the
    model keeps it."""
    module = MultiScaleDeformableAttention(256, 8, 4, 4)
    assert torch.equal(module.sampling_offsets.weight, torch.zeros(256, 256))
    # head k points along angle k * 45 degrees, scaled so the larger |coordinate| is 1
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    bias = module.sampling_offsets.bias.detach().view(8, 4, 4, 2)  # (head, level, point, xy)
    for level in range(4):
        for point in range(4):
            torch.testing.assert_close(bias[:, level, point], directions * (point + 1))
    assert torch.equal(module.attention_weights.weight, torch.zeros(128, 256))
    assert torch.equal(module.attention_weights.bias, torch.zeros(128))
    bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
    for linear in (module.value_proj, module.output_proj):
        assert linear.weight.abs().max() <= bound
        assert linear.weight.abs().max() > 0.9 * bound
        assert abs(linear.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        assert torch.equal(linear.bias, torch.zeros(256))


def test_offset_bias_for_any_head_count():
    """Head k at angle 2*pi*k/heads (here 3 heads: 0, 120, 240 degrees), scaled so its larger
    |coordinate| is 1, times (point + 1) on every level; layout (head, level, point, xy)."""
    heads, levels, points = 3, 2, 3
    module = MultiScaleDeformableAttention(12, heads, levels, points)
    expected = []
    for head in range(heads):
        angle = 2 * math.pi * head / heads
        x, y = math.cos(angle), math.sin(angle)
        largest = max(abs(x), abs(y))
        for _level in range(levels):
            for point in range(points):
                expected += [x / largest * (point + 1), y / largest * (point + 1)]
    torch.testing.assert_close(
        module.sampling_offsets.bias.detach(), torch.tensor(expected), atol=1e-6, rtol=0
    )


def test_initial_attention_is_uniform(gen):
    """With the official init the weights are uniform and the sampling pattern is the bias."""
    module = MultiScaleDeformableAttention(32, 4, 3, 2, dropout=0.0).double()
    spatial_shapes, level_start_index, S = pyramid()
    captured = {}

    def spy(value, shapes, start, locations, weights):
        captured.update(locations=locations, weights=weights)
        return ms_deform_attn_reference(value, shapes, start, locations, weights)

    query = torch.randn(5, 2, 32, generator=gen, dtype=torch.float64)
    value = torch.randn(S, 2, 32, generator=gen, dtype=torch.float64)
    ref = torch.rand(2, 5, 3, 2, generator=gen, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(msda_module, "ms_deform_attn", spy)
        module(
            query,
            value=value,
            reference_points=ref,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
    assert torch.allclose(captured["weights"], torch.full_like(captured["weights"], 1 / 6))
    pixel_offsets = (captured["locations"] - ref[:, :, None, :, None, :]) * spatial_shapes.flip(
        -1
    ).double()[None, None, None, :, None, :]
    bias = module.sampling_offsets.bias.detach().view(1, 1, 4, 3, 2, 2).expand_as(pixel_offsets)
    torch.testing.assert_close(pixel_offsets, bias)


@pytest.mark.parametrize("variant, levels", [("deformable_detr", 4), ("single_scale", 1)])
def test_state_dict_matches_detrex_checkpoint_keys(variant, levels, checkpoint_keys):
    module = MultiScaleDeformableAttention(256, 8, levels, 4)
    prefix = "transformer.encoder.layers.0.attentions.0."
    expected = {
        key[len(prefix) :]: shape
        for key, shape in checkpoint_keys["variants"][variant]["detrex"].items()
        if key.startswith(prefix)
    }
    got = {key: list(t.shape) for key, t in module.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_matches_step_by_step_computation(ref_dim, batch_first, gen):
    module = randomized_module(gen, batch_first=batch_first)
    spatial_shapes, level_start_index, S = pyramid()
    N, Lq = 3, 5
    query = torch.randn(N, Lq, 16, generator=gen, dtype=torch.float64)
    value = torch.randn(N, S, 16, generator=gen, dtype=torch.float64)
    query_pos = torch.randn(N, Lq, 16, generator=gen, dtype=torch.float64)
    ref = torch.rand(N, Lq, 3, ref_dim, generator=gen, dtype=torch.float64)
    expected = expected_output(
        module, query, value, ref, spatial_shapes, level_start_index, query_pos=query_pos
    )
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    out = module(
        layout(query),
        value=layout(value),
        query_pos=layout(query_pos),
        reference_points=ref,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
    )
    torch.testing.assert_close(layout(out), expected, rtol=1e-10, atol=1e-10)


def test_defaults_value_identity_and_level_start_index(gen):
    """value and identity default to query (identity without query_pos); level_start_index is
    derived from spatial_shapes when omitted; a single reference level broadcasts."""
    module = randomized_module(gen, batch_first=True)
    spatial_shapes, level_start_index, S = pyramid()
    query = torch.randn(2, S, 16, generator=gen, dtype=torch.float64)
    query_pos = torch.randn(2, S, 16, generator=gen, dtype=torch.float64)
    ref = torch.rand(2, S, 1, 2, generator=gen, dtype=torch.float64)
    expected = expected_output(
        module, query, query, ref, spatial_shapes, level_start_index, query_pos=query_pos
    )
    out = module(query, query_pos=query_pos, reference_points=ref, spatial_shapes=spatial_shapes)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    identity = torch.randn(2, S, 16, generator=gen, dtype=torch.float64)
    out_id = module(
        query,
        identity=identity,
        query_pos=query_pos,
        reference_points=ref,
        spatial_shapes=spatial_shapes,
    )
    torch.testing.assert_close(out_id - identity, expected - query, rtol=1e-10, atol=1e-10)


def test_key_padding_mask_zeroes_padded_values(gen):
    module = randomized_module(gen, batch_first=True)
    spatial_shapes, level_start_index, S = pyramid()
    query = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)
    value = torch.randn(2, S, 16, generator=gen, dtype=torch.float64)
    ref = torch.rand(2, 4, 3, 2, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, S, generator=gen) < 0.4
    kwargs = dict(
        reference_points=ref,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        key_padding_mask=mask,
    )
    out = module(query, value=value, **kwargs)
    expected = expected_output(
        module, query, value, ref, spatial_shapes, level_start_index, key_padding_mask=mask
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # whatever sits at padded positions does not matter
    scrambled = torch.where(mask[..., None], torch.randn_like(value) * 100, value)
    torch.testing.assert_close(module(query, value=scrambled, **kwargs), out, rtol=0, atol=1e-10)
    # and the mask does something
    assert not torch.allclose(
        module(query, value=scrambled, **{**kwargs, "key_padding_mask": None}), out
    )


def test_kernel_and_reference_agree_through_the_module(gen):
    """float32 module on the CPU kernel vs the same module on the reference operator,
    forward and parameter gradients."""
    module = randomized_module(gen, batch_first=True).float().train()
    module.dropout.p = 0.0
    spatial_shapes, level_start_index, S = pyramid()
    query = torch.randn(2, 6, 16, generator=gen)
    value = torch.randn(2, S, 16, generator=gen)
    ref = torch.rand(2, 6, 3, 4, generator=gen)
    args = dict(
        value=value,
        reference_points=ref,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
    )
    out = module(query, **args)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    module.zero_grad()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(msda_module, "ms_deform_attn", ms_deform_attn_reference)
        expected = module(query, **args)
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for k, p in module.named_parameters():
        assert p.grad.abs().sum() > 0, k
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-4, msg=k)


def test_autocast_keeps_locations_and_weights_float32(gen):
    module = MultiScaleDeformableAttention(32, 4, 3, 2, batch_first=True, dropout=0.0)
    spatial_shapes, level_start_index, S = pyramid()
    query = torch.randn(2, 5, 32, generator=gen)
    value = torch.randn(2, S, 32, generator=gen)
    ref = torch.rand(2, 5, 3, 2, generator=gen)
    seen = {}
    real_op = msda_module.ms_deform_attn

    def spy(v, shapes, start, loc, w):
        seen.update(value=v.dtype, loc=loc.dtype, weights=w.dtype)
        return real_op(v, shapes, start, loc, w)

    kwargs = dict(
        value=value,
        reference_points=ref,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(msda_module, "ms_deform_attn", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(query, **kwargs)
    assert seen == dict(value=torch.bfloat16, loc=torch.float32, weights=torch.float32)
    expected = module(query, **kwargs)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize(
    "kwargs_change, message",
    [
        (dict(reference_points=torch.rand(2, 4, 3, 3)), "reference_points"),
        (dict(reference_points=torch.rand(2, 5, 3, 2)), "reference_points"),
        (dict(reference_points=torch.rand(2, 4, 2, 2)), "reference_points"),
        (dict(spatial_shapes=torch.tensor([[6, 7], [3, 4]])), "spatial_shapes"),
        (dict(spatial_shapes=torch.tensor([[6, 7], [3, 4], [2, 3]])), "spatial_shapes"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), "key_padding_mask"),
        (dict(reference_points=None), "reference_points"),
    ],
)
def test_bad_module_input_raises_clear_error(kwargs_change, message):
    module = MultiScaleDeformableAttention(16, 2, 3, 2, batch_first=True)
    spatial_shapes, level_start_index, S = pyramid()
    kwargs = dict(
        value=torch.randn(2, S, 16),
        reference_points=torch.rand(2, 4, 3, 2),
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
    )
    kwargs.update(kwargs_change)
    with pytest.raises(ValueError, match=message):
        module(torch.randn(2, 4, 16), **kwargs)


def test_embed_dim_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=100, num_heads=8)


def test_module_compiles_in_one_graph_and_exports(gen):
    module = MultiScaleDeformableAttention(32, 4, 2, 2, dropout=0.0)
    shapes = torch.tensor([[6, 5], [3, 3]])
    start = torch.tensor([0, 30])
    query = torch.randn(7, 2, 32, generator=gen)
    kwargs = dict(
        value=torch.randn(39, 2, 32, generator=gen),
        reference_points=torch.rand(2, 7, 2, 4, generator=gen),
        spatial_shapes=shapes,
        level_start_index=start,
        key_padding_mask=torch.rand(2, 39, generator=gen) < 0.2,
    )
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(query, **kwargs)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    expected = module(query, **kwargs)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for g, p in zip(grads, module.parameters()):
        torch.testing.assert_close(g, p.grad)
    exported = torch.export.export(module, (query,), kwargs)
    torch.testing.assert_close(exported.module()(query, **kwargs), expected)
