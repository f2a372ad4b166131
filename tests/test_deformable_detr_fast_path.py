"""The eval-time fast path of DeformableDETR (FrozenBN folding, the cached pyramid layout, no
masking of unpadded batches, the positional embedding kept in the autocast dtype) against the
plain computation (`set_fast_inference(False)`) of the same model, on fresh random weights and
images; and the cache's keys: sizes, padding masks, the level embeddings, training."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from detrkit.config import LazyCall as L
from detrkit.config import LazyConfig, instantiate
from detrkit.layers import (
    FFN,
    MultiScaleDeformableAttention,
    ShapeSpec,
    ms_deform_attn_reference,
)
from detrkit.structures import ImageList
from projects.deformable_detr.modeling import (
    DeformableDetrTransformer,
    DeformableDetrTransformerEncoder,
)
from projects.deformable_detr.modeling.deformable_transformer import SelfAttention

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(variant: str) -> torch.nn.Module:
    """The quickstart's small model with FrozenBN (so there is something to fold), as
    `variant`, with random weights and random frozen statistics."""
    cfg = LazyConfig.load("projects/deformable_detr/configs/shapes_tiny.py")
    model = cfg.model
    model.backbone.stem.norm = "FrozenBN"
    model.backbone.stages.norm = "FrozenBN"
    model.with_box_refine = variant != "multi_scale"
    model.as_two_stage = variant == "two_stage"
    model.num_queries = 20
    if model.as_two_stage:
        model.num_queries_one2many = 0  # hybrid matching is for learned queries
    if variant == "single_scale":
        model.backbone.out_features = ["res5"]
        model.neck.input_shapes = {"res5": L(ShapeSpec)(channels=128)}
        model.neck.in_features = ["res5"]
        model.neck.num_outs = 1
        model.transformer.num_feature_levels = 1
    torch.manual_seed(random.randrange(2**31))
    net = instantiate(cfg.model)
    with torch.no_grad():
        for name, tensor in net.named_buffers():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                tensor.normal_(0.0, 0.2)
        for name, tensor in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                tensor.normal_(0.0, 0.1)
            elif not tensor.any():  # zero-initialized (attention offsets and weights, heads):
                tensor.normal_(0.0, 0.1)  # queries and positions would not matter otherwise
    return net.eval()


def images(*sizes: tuple[int, int]) -> list[dict]:
    return [
        {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8)}
        for height, width in sizes
    ]


def predictions(model: torch.nn.Module, inputs: list[dict], fast: bool) -> list:
    if model.fast_inference != fast:
        model.set_fast_inference(fast)
    with torch.no_grad():
        outputs = model(inputs)
    return [o["instances"] for o in outputs]


def assert_same_detections(fast: list, plain: list) -> None:
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
        # equal scores may swap places; the classes and boxes of clearly separated scores may not
        gaps = torch.diff(b.scores).abs() > 1e-4
        separated = torch.cat([gaps[:1], gaps[1:] & gaps[:-1], gaps[-1:]])
        assert separated.sum() >= len(separated) // 2  # most detections are compared
        assert torch.equal(a.pred_classes[separated], b.pred_classes[separated])
        torch.testing.assert_close(
            a.pred_boxes.tensor[separated], b.pred_boxes.tensor[separated], rtol=0, atol=1e-3
        )


@pytest.mark.parametrize("blocks", ["whole", "small blocks"])
@pytest.mark.parametrize("variant", ["single_scale", "multi_scale", "refine", "two_stage"])
def test_fast_path_detections_equal_plain(variant, blocks, monkeypatch):
    if blocks == "small blocks":  # the encoder's attention and FFNs over blocks of 16 rows
        monkeypatch.setattr(MultiScaleDeformableAttention, "block_queries", 16)
        monkeypatch.setattr(FFN, "block_rows", 16)
    model = tiny_model(variant)
    # one image, then a padded batch, then the first size again (a cache hit)
    for inputs in (images((96, 128)), images((96, 128), (80, 112)), images((96, 128))):
        plain = predictions(model, inputs, fast=False)
        assert_same_detections(predictions(model, inputs, fast=True), plain)


def test_plain_path_folds_nothing_and_caches_nothing():
    model = tiny_model("multi_scale")
    inputs = images((64, 96))
    channels_last = []
    model.backbone.register_forward_pre_hook(
        lambda _, args: channels_last.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    predictions(model, inputs, fast=False)
    assert model._layout_cache is None
    convs = [m for m in model.modules() if hasattr(m, "fold_frozen_norm")]
    assert convs and all(not c.fold_frozen_norm and c._folded is None for c in convs)
    switches = [m for m in model.modules() if isinstance(m, SelfAttention | FFN)]
    assert switches and not any(getattr(m, "fast_inference", False) for m in switches)
    assert not any(getattr(m, "fuse_inference", False) for m in switches)
    predictions(model, inputs, fast=True)
    assert model._layout_cache is not None
    assert any(c._folded is not None for c in convs)
    assert channels_last == [False, True]


def test_cache_is_keyed_on_the_padding_mask_not_only_the_size():
    model = tiny_model("refine")
    # both batches pad to 96 x 128 with the same feature sizes, but pad different images
    first = images((96, 128), (96, 100))
    second = images((70, 128), (96, 128))
    predictions(model, first, fast=True)
    first_layout = model._layout_cache[2]
    fast = predictions(model, second, fast=True)
    assert model._layout_cache[2] is not first_layout
    assert_same_detections(fast, predictions(model, second, fast=False))


def test_cache_follows_the_level_embeddings():
    model = tiny_model("multi_scale")
    inputs = images((64, 96))
    predictions(model, inputs, fast=True)
    with torch.no_grad():  # an in-place change (an optimizer step, a load) ...
        model.transformer.level_embeds.add_(torch.randn_like(model.transformer.level_embeds))
    assert_same_detections(
        predictions(model, inputs, fast=True), predictions(model, inputs, fast=False)
    )
    # ... and a new tensor (load_state_dict with assign, .to)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.level_embeds"] = torch.randn_like(state["transformer.level_embeds"])
    model.load_state_dict(state, assign=True)
    assert_same_detections(
        predictions(model, inputs, fast=True), predictions(model, inputs, fast=False)
    )


def test_training_never_uses_the_cache():
    model = tiny_model("multi_scale")
    predictions(model, images((64, 96)), fast=True)
    assert model._layout_cache is not None
    model.train()
    assert model._layout_cache is None
    features = [torch.randn(1, 64, 8, 12), torch.randn(1, 64, 4, 6)]
    masks = [torch.zeros(1, 8, 12, dtype=torch.bool), torch.zeros(1, 4, 6, dtype=torch.bool)]
    model.transformer.num_feature_levels = 2
    layout = model._pyramid_layout(features, masks)
    assert model._layout_cache is None
    assert layout.padded  # training always masks: it never reads the masks to learn otherwise
    assert layout.pos_flatten.requires_grad  # gradients reach the level embeddings


def test_cpu_training_runs_the_convolutions_channels_last_with_the_contiguous_results():
    """CPU training feeds backbone and neck channels-last tensors: the feature maps and every
    backbone and neck gradient equal those of the same modules on the contiguous input.

    In float64: in float32 the two layouts' kernels round differently, and with about a million
    ReLU gates and max-pool windows per batch a few near-ties go the other way, each moving a
    whole upstream gradient (the stem's weight gradient then differs by O(1) in some draws)."""
    cfg = LazyConfig.load("projects/deformable_detr/configs/shapes_tiny.py")  # trainable BN
    torch.manual_seed(random.randrange(2**31))
    model = instantiate(cfg.model).train().double()
    # Not a padded batch: over constant padding a max-pool window holds exactly equal
    # maxima, and which one gets the gradient is each kernel's own choice.
    batch = model.preprocess_image(images((96, 128), (96, 128)))
    image_list = ImageList(batch.tensor.double(), batch.image_sizes)

    features, _ = model._features_and_masks(image_list)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
    upstream = [torch.randn_like(f) for f in features]
    sum((f * g).sum() for f, g in zip(features, upstream)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    expected = model.neck(model.backbone(image_list.tensor.contiguous()))
    assert all(f.is_contiguous() for f in expected)
    sum((f * g).sum() for f, g in zip(expected, upstream)).backward()
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("backbone.") for n in grads)
    assert any(n.startswith("neck.") for n in grads)
    for name, grad in grads.items():
        want = model.get_parameter(name).grad
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_reference_points_and_proposals_from_a_shape_list_equal_the_tensor_path():
    shapes = [(5, 7), (3, 4)]
    spatial_shapes = torch.tensor(shapes)
    valid_ratios = torch.rand(2, 2, 2) * 0.5 + 0.5
    from_list = DeformableDetrTransformerEncoder.get_reference_points(
        shapes, valid_ratios, torch.device("cpu")
    )
    from_tensor = DeformableDetrTransformerEncoder.get_reference_points(
        spatial_shapes, valid_ratios, torch.device("cpu")
    )
    assert torch.equal(from_list, from_tensor)

    transformer = tiny_model("two_stage").transformer
    memory = torch.randn(2, 35 + 12, 64)
    mask = torch.zeros(2, 35 + 12, dtype=torch.bool)
    mask[1, 30:35] = True
    with torch.no_grad():
        a = transformer.gen_encoder_output_proposals(memory, mask, shapes)
        b = transformer.gen_encoder_output_proposals(memory, mask, spatial_shapes)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_layout_matches_its_definition():
    """The layout against values computed here from the masks: level offsets, valid ratios,
    the flattened mask and the sine + level embedding."""
    model = tiny_model("multi_scale")
    transformer: DeformableDetrTransformer = model.transformer
    masks = []
    for height, width in [(8, 12), (4, 6), (2, 3), (1, 2)]:
        mask = torch.zeros(2, height, width, dtype=torch.bool)
        mask[1, :, width // 2 + 1 :] = True
        masks.append(mask)
    pos = [model.position_embedding(m) for m in masks]
    with torch.no_grad():
        layout = transformer.pyramid_layout(masks, pos, check_padding=True)
    assert layout.shapes == [(8, 12), (4, 6), (2, 3), (1, 2)]
    assert layout.level_start_index.tolist() == [0, 96, 120, 126]
    assert layout.padded
    torch.testing.assert_close(layout.valid_ratios[1, 0], torch.tensor([7 / 12, 1.0]))
    assert torch.equal(layout.mask_flatten, torch.cat([m.flatten(1) for m in masks], 1))
    expected = pos[1].flatten(2).transpose(1, 2) + transformer.level_embeds[1]
    torch.testing.assert_close(layout.pos_flatten[:, 96:120], expected)
    unpadded = [torch.zeros_like(m) for m in masks]
    assert not transformer.pyramid_layout(unpadded, pos, check_padding=True).padded


def test_bf16_autocast_keeps_the_positional_embedding_in_bf16_and_stays_close():
    model = tiny_model("refine")
    inputs = images((96, 128))
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["query"].dtype, kwargs["query_pos"].dtype, kwargs["value"].dtype))

    attention = model.transformer.encoder.layers[0].attentions[0]
    handle = attention.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(inputs)[0]["instances"]
    handle.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    fp32 = predictions(model, inputs, fast=False)[0]
    # the scores of a random model lie close together: compare values, not ranks
    assert (bf16.scores.float() - fp32.scores).abs().max() < 0.02


def predict_under_bf16_autocast(model: torch.nn.Module) -> tuple:
    """`model.predict` of a random image under bf16 autocast: its output and the transformer's
    decoder states, initial reference and refined references."""
    inputs = images((96, 128))
    captured = {}

    def record(module, args, output):
        captured["states"], captured["init"], captured["inter"] = output[:3]

    handle = model.transformer.register_forward_hook(record)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model.predict(*model._features_and_masks(model.preprocess_image(inputs)))
    handle.remove()
    return output, captured["states"], captured["init"], captured["inter"]


@pytest.mark.parametrize("variant", ["multi_scale", "refine"])
def test_heads_run_in_float32_under_bf16_autocast(variant):
    """The class and box heads compute in float32 under bf16 autocast: the outputs equal the
    heads applied by hand to the decoder states without autocast."""
    model = tiny_model(variant)
    output, states, init, inter = predict_under_bf16_autocast(model)
    references = [init, *inter[:-1]]
    with torch.no_grad():
        last = len(references) - 1
        state = states[last].float()
        logits = F.linear(state, model.class_embed[last].weight, model.class_embed[last].bias)
        delta = model.bbox_embed[last](state)
        reference = torch.logit(references[last].float(), eps=1e-5)
        if reference.shape[-1] == 2:  # points: the box head predicts width and height alone
            reference = F.pad(reference, (0, 2))
        boxes = (delta + reference).sigmoid()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = model.class_embed[last](state).float()
    assert (autocast_logits - logits).abs().max() > 1e-4  # what the heads would give in bf16
    assert output["pred_logits"].dtype == output["pred_boxes"].dtype == torch.float32
    torch.testing.assert_close(output["pred_logits"], logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(output["pred_boxes"], boxes, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["multi_scale", "refine", "two_stage"])
def test_reference_boxes_are_float32_under_bf16_autocast(variant):
    """Under bf16 autocast the reference points, the decoder's refined boxes and the two-stage
    proposals come from their heads computed in float32: they equal the heads applied by hand,
    without autocast, to what the bf16 layers before them produced."""
    model = tiny_model(variant)
    output, states, init, inter = predict_under_bf16_autocast(model)
    assert init.dtype == inter.dtype == torch.float32

    def box_head(head, state):  # the MLP written out in float32
        x = state.float()
        for i, layer in enumerate(head.layers):
            x = F.linear(x, layer.weight, layer.bias)
            x = x.relu() if i < len(head.layers) - 1 else x
        return x

    with torch.no_grad():
        if variant == "two_stage":
            enc = output["enc_outputs"]
            assert enc["pred_logits"].dtype == enc["pred_boxes"].dtype == torch.float32
        else:
            query_pos = model.query_embedding.weight[: model.num_queries, : model.embed_dim]
            linear = model.transformer.reference_points
            expected = F.linear(query_pos, linear.weight, linear.bias).sigmoid().expand_as(init)
            torch.testing.assert_close(init, expected, rtol=0, atol=1e-6)
        if variant != "multi_scale":  # refined: each layer's boxes from the one before
            references = [init, *inter]
            for layer in range(len(inter)):
                delta = box_head(model.bbox_embed[layer], states[layer])
                reference = torch.logit(references[layer], eps=1e-5)
                if reference.shape[-1] == 2:  # points: the head's size is used as it is
                    reference = F.pad(reference, (0, 2))
                expected = (delta + reference).sigmoid()
                torch.testing.assert_close(inter[layer], expected, rtol=0, atol=1e-5)


def test_batch_first_self_attention_equals_multihead_attention():
    attention = SelfAttention(embed_dim=32, num_heads=4, attn_drop=0.1, proj_drop=0.1).eval()
    with torch.no_grad():
        attention.attn.in_proj_bias.normal_()
        attention.attn.out_proj.bias.normal_()
    query, query_pos = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    with torch.no_grad():
        fast = attention(query, query_pos)
        q = query + query_pos  # the oracle: torch's module, called as the plain path calls it
        expected = query + attention.attn(q, q, query, need_weights=False)[0]
        attention.fast_inference = False
        plain = attention(query, query_pos)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, expected)


@pytest.mark.parametrize("value", [True, False])
def test_fast_inference_is_a_config_key(value):
    from detrkit.config import LazyConfig, instantiate

    cfg = LazyConfig.load("projects/deformable_detr/configs/shapes_tiny.py")
    cfg = LazyConfig.apply_overrides(cfg, [f"model.fast_inference={value}"])
    assert instantiate(cfg.model).fast_inference is value


@pytest.mark.parametrize("block_queries", [1024, 4])  # 9 queries: one block; 4 + 4 + 1
@pytest.mark.parametrize("reference_kind", ["points", "boxes"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_fused_deformable_attention_equals_its_formula(
    reference_kind, batch_first, padded, block_queries, gen
):
    """The eval fusion (offsets and logits from one matmul with the level sizes folded in; the
    output projection accumulated onto the residual in one call; queries in blocks) against the
    formula written out with the pure-PyTorch reference op; the plain path is checked too."""
    N, Lq, C, M, L, P = 2, 9, 32, 4, 3, 2
    shapes = torch.tensor([[6, 7], [3, 4], [2, 2]])
    starts = torch.tensor([0, 42, 54])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    attention = MultiScaleDeformableAttention(C, M, L, P, dropout=0.1, batch_first=batch_first)
    attention.block_queries = block_queries
    attention.eval()
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    query, pos = torch.randn(N, Lq, C, generator=gen), torch.randn(N, Lq, C, generator=gen)
    value = torch.randn(N, S, C, generator=gen)
    mask = torch.rand(N, S, generator=gen) < 0.2 if padded else None
    width = 2 if reference_kind == "points" else 4
    reference = torch.rand(N, Lq, L, width, generator=gen) * 0.8 + 0.1

    with torch.no_grad():
        q = query + pos
        offsets = F.linear(q, attention.sampling_offsets.weight, attention.sampling_offsets.bias)
        offsets = offsets.view(N, Lq, M, L, P, 2)
        logits = F.linear(q, attention.attention_weights.weight, attention.attention_weights.bias)
        weights = logits.view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_kind == "points":
            size = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()
            locations = (
                reference[:, :, None, :, None, :] + offsets / size[None, None, None, :, None]
            )
        else:
            box = reference[:, :, None, :, None]
            locations = box[..., :2] + offsets / P * box[..., 2:] * 0.5
        v = F.linear(value, attention.value_proj.weight, attention.value_proj.bias)
        if mask is not None:
            v = v.masked_fill(mask[..., None], 0.0)
        sampled = ms_deform_attn_reference(
            v.view(N, S, M, C // M), shapes, starts, locations, weights
        )
        expected = query + F.linear(
            sampled, attention.output_proj.weight, attention.output_proj.bias
        )

        def call():
            t = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
            out = attention(
                t(query),
                t(value),
                query_pos=t(pos),
                key_padding_mask=mask,
                reference_points=reference,
                spatial_shapes=shapes,
                level_start_index=starts,
            )
            return t(out)

        fused = call()
        attention.fuse_inference = False
        plain = call()
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
