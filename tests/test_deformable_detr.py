"""Deformable DETR: the five variants' structure, initialization, batch-invariant evaluation,
input checks, and a tiny model overfitting a few images."""

from __future__ import annotations

import math
import random

import pytest
import torch

from detrkit.config import LazyCall as L
from detrkit.config import LazyConfig, instantiate
from detrkit.layers import MultiScaleDeformableAttention, ShapeSpec
from detrkit.structures import Boxes, Instances
from projects.deformable_detr.modeling.deformable_detr import rescale_instances, weight_losses

CONFIG_DIR = "projects/deformable_detr/configs"
VARIANT_CONFIGS = {
    "single_scale": "deformable_detr_r50_single_scale_50ep.py",
    "single_scale_dc5": "deformable_detr_r50_single_scale_dc5_50ep.py",
    "deformable_detr": "deformable_detr_r50_50ep.py",
    "refine": "deformable_detr_r50_with_box_refinement_50ep.py",
    "two_stage": "deformable_detr_r50_two_stage_50ep.py",
}
# Exact trainable-parameter counts of the official models (91-way class heads; the official code
# trains neither the stem nor res2 of the ResNet, i.e. freeze_at=2). The paper's Table 1 only
# gives them rounded to millions.
OFFICIAL_TRAINABLE_91 = {
    "single_scale": 33_844_193,
    "single_scale_dc5": 33_844_193,
    "deformable_detr": 39_847_265,
    "refine": 40_627_260,
    "two_stage": 40_959_129,
}
# distinct class heads: one shared head without refinement, one per decoder layer with it,
# plus the proposal head in two-stage
DISTINCT_CLASS_HEADS = {
    "single_scale": 1,
    "single_scale_dc5": 1,
    "deformable_detr": 1,
    "refine": 6,
    "two_stage": 7,
}


def load_config(variant: str):
    return LazyConfig.load(f"{CONFIG_DIR}/{VARIANT_CONFIGS[variant]}")


def tiny_model_config(variant: str):
    """The quickstart's small model (multi-scale + refinement) turned into `variant`."""
    cfg = LazyConfig.load(f"{CONFIG_DIR}/shapes_tiny.py")
    model = cfg.model
    model.with_box_refine = variant in ("refine", "two_stage")
    model.as_two_stage = variant == "two_stage"
    if model.as_two_stage:
        model.num_queries_one2many = 0  # hybrid matching is for learned queries
    if variant.startswith("single_scale"):
        model.backbone.out_features = ["res5"]
        model.neck.input_shapes = {"res5": L(ShapeSpec)(channels=128)}
        model.neck.in_features = ["res5"]
        model.neck.num_outs = 1
        model.transformer.num_feature_levels = 1
    if variant == "single_scale_dc5":
        model.backbone.stages.res5_dilation = 2
    return cfg


def random_image(height: int, width: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8)


def training_record(height: int, width: int, boxes: list, classes: list) -> dict:
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": random_image(height, width), "instances": instances}


_FULL_MODELS: dict = {}


def full_model(variant: str):
    """ResNet-50 Deformable DETR of `variant`, built once per test session."""
    if variant not in _FULL_MODELS:
        torch.manual_seed(random.randrange(2**31))
        _FULL_MODELS[variant] = instantiate(load_config(variant).model)
    return _FULL_MODELS[variant]


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_state_dict_matches_detrex_fixture(variant, checkpoint_keys):
    model = full_model(variant)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = checkpoint_keys["variants"][variant]["detrex"]
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert ours == expected


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_parameter_count_matches_the_official_models(variant):
    """The official counts have 91-way heads; each distinct 80-way head has 11 x (256 + 1)
    fewer."""
    model = full_model(variant)
    expected_80 = OFFICIAL_TRAINABLE_91[variant] - DISTINCT_CLASS_HEADS[variant] * 11 * 257

    stem_and_res2 = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith(("backbone.stem.", "backbone.res2."))
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # detrex's freeze_at=1 freezes the stem only; the official count also leaves res2 out
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert all(p.requires_grad for p in model.backbone.res2.parameters())
    res2 = sum(p.numel() for p in model.backbone.res2.parameters())
    assert trainable - res2 == expected_80
    assert stem_and_res2 - res2 == 64 * 3 * 7 * 7  # the stem conv (its norm is frozen buffers)


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_forward_backward_two_sizes(variant):
    model = full_model(variant)
    model.train()
    batch = [
        training_record(72, 96, [[4, 6, 40, 50], [30, 20, 90, 70]], [3, 79]),
        training_record(64, 56, [[10, 12, 30, 60]], [0]),
    ]
    losses = model(batch)
    base = ("loss_class", "loss_bbox", "loss_giou")
    suffixes = ["", "_0", "_1", "_2", "_3", "_4"] + (["_enc"] if variant == "two_stage" else [])
    expected = {name + suffix for name in base for suffix in suffixes}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    model.zero_grad(set_to_none=True)
    total.backward()
    head = model.class_embed[-1].weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0
    attention = model.transformer.encoder.layers[0].attentions[0].value_proj.weight.grad
    assert attention is not None and attention.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- initialization


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_initialization(variant):
    model = full_model(variant)
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert len(attentions) == 12  # 6 encoder + 6 decoder layers
    levels = 1 if variant.startswith("single_scale") else 4
    # The layer's initialization is tested in test_ms_deform_attn_module.py; here the model
    # must keep it (no later re-initialization of its attentions).
    layer_init = MultiScaleDeformableAttention(256, 8, levels, 4).sampling_offsets.bias
    for attn in attentions:
        assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
        assert torch.equal(attn.sampling_offsets.bias, layer_init)
        assert torch.count_nonzero(attn.attention_weights.weight) == 0
        assert torch.count_nonzero(attn.attention_weights.bias) == 0
        assert torch.count_nonzero(attn.value_proj.bias) == 0
        assert torch.count_nonzero(attn.output_proj.bias) == 0

    prior = -math.log((1 - 0.01) / 0.01)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias.detach(), torch.full((80,), prior))

    last_layers = [head.layers[-1] for head in model.bbox_embed]
    for layer in last_layers:
        assert torch.count_nonzero(layer.weight) == 0
        assert torch.count_nonzero(layer.bias[:2]) == 0
    size_biases = [layer.bias[2:].tolist() for layer in last_layers]
    if variant == "two_stage":
        assert size_biases == [[0.0, 0.0]] * 7
    elif variant == "refine":
        assert size_biases == [[-2.0, -2.0]] + [[0.0, 0.0]] * 5
    else:
        assert size_biases == [[-2.0, -2.0]] * 6

    # shared heads without refinement, independent ones with it (and the decoder sees them)
    shared = variant not in ("refine", "two_stage")
    assert (model.bbox_embed[0] is model.bbox_embed[5]) == shared
    assert (model.class_embed[0] is model.class_embed[5]) == shared
    assert (model.transformer.decoder.bbox_embed is model.bbox_embed) == (not shared)
    if variant == "two_stage":
        assert model.transformer.decoder.class_embed is model.class_embed
    else:
        assert torch.count_nonzero(model.transformer.reference_points.bias) == 0


# --------------------------------------------------------------------------- evaluation


def assert_same_detections(a: Instances, b: Instances, atol: float = 1e-4) -> None:
    """Same scores (sorted) and, for each detection, a detection of the other result with the
    same class and score and the same box (robust to the order of near-equal scores)."""
    assert len(a) == len(b)
    assert (a.scores.sort().values - b.scores.sort().values).abs().max() < atol
    for box, score, label in zip(a.pred_boxes.tensor, a.scores, a.pred_classes):
        same = (b.pred_classes == label) & ((b.scores - score).abs() < atol)
        assert same.any()
        diff = (b.pred_boxes.tensor[same] - box).abs().max(dim=1).values
        assert diff.min() < atol


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_eval_same_alone_or_padded_in_batch(variant):
    torch.manual_seed(random.randrange(2**31))
    model = instantiate(tiny_model_config(variant).model).eval()
    small = {"image": random_image(88, 120), "height": 176, "width": 240}
    large = {"image": random_image(128, 160)}
    with torch.no_grad():
        alone = model([small])[0]["instances"]
        batched = model([large, small])[1]["instances"]
    assert len(alone) == 100
    # the padded batch is decoded image by image on unpadded features: the very same arithmetic
    assert torch.equal(alone.scores, batched.scores)
    assert torch.equal(alone.pred_classes, batched.pred_classes)
    assert torch.equal(alone.pred_boxes.tensor, batched.pred_boxes.tensor)


def test_batch_invariant_eval_is_a_config_key_and_both_settings_run():
    """`model.batch_invariant_eval=False` (README) is an override every config takes; with it
    an image padded beside a larger one gets other detections than alone (padding reaches the
    convolutions and the neck's GroupNorm statistics), with True the same."""
    for name in VARIANT_CONFIGS.values():
        cfg = LazyConfig.load(f"{CONFIG_DIR}/{name}")
        assert cfg.model.batch_invariant_eval is True
        cfg = LazyConfig.apply_overrides(cfg, ["model.batch_invariant_eval=False"])
        assert cfg.model.batch_invariant_eval is False

    torch.manual_seed(random.randrange(2**31))
    cfg = LazyConfig.apply_overrides(tiny_model_config("deformable_detr"), [])
    small = {"image": random_image(88, 120)}
    large = {"image": random_image(128, 160)}
    results = {}
    for setting in (True, False):
        cfg.model.batch_invariant_eval = setting
        torch.manual_seed(0)  # the same weights for both settings
        model = instantiate(cfg.model).eval()
        assert model.batch_invariant_eval is setting
        with torch.no_grad():
            alone = model([small])[0]["instances"]
            batched = model([large, small])[1]["instances"]
        results[setting] = (alone, batched)
    assert_same_detections(*results[True])
    alone, batched = results[False]
    assert_same_detections(alone, results[True][0])  # alone, both settings compute the same
    assert (alone.scores.sort().values - batched.scores.sort().values).abs().max() > 1e-3


def test_two_stage_eval_invariant_when_images_have_fewer_tokens_than_proposals():
    torch.manual_seed(random.randrange(2**31))
    cfg = tiny_model_config("two_stage")
    cfg.model.num_queries = 300  # more proposals than a 40x56 image has tokens (~50)
    model = instantiate(cfg.model).eval()
    small = {"image": random_image(40, 56)}
    large = {"image": random_image(96, 128)}
    with torch.no_grad():
        alone = model([small])[0]["instances"]
        batched = model([large, small])[1]["instances"]
    assert_same_detections(alone, batched)


def test_inference_topk_and_rescaling():
    torch.manual_seed(random.randrange(2**31))
    cfg = tiny_model_config("refine")
    cfg.model.select_box_nums_for_evaluation = 1000  # more than 50 queries x 4 classes
    model = instantiate(cfg.model).eval()
    image = random_image(60, 80)
    with torch.no_grad():
        native = model([{"image": image}])[0]["instances"]
        doubled = model([{"image": image, "height": 120, "width": 160}])[0]["instances"]
    assert len(native) == 50 * 4
    assert native.image_size == (60, 80) and doubled.image_size == (120, 160)
    order_native, order_doubled = native.scores.argsort(), doubled.scores.argsort()
    torch.testing.assert_close(
        doubled.pred_boxes.tensor[order_doubled], 2 * native.pred_boxes.tensor[order_native]
    )
    boxes = doubled.pred_boxes.tensor
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= 160).all() and (boxes[:, 1::2] <= 120).all()
    assert (doubled.scores[:-1] >= doubled.scores[1:]).all()
    assert doubled.pred_classes.min() >= 0 and doubled.pred_classes.max() < 4


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def tiny_refine_model():
    torch.manual_seed(random.randrange(2**31))
    return instantiate(tiny_model_config("refine").model)


def test_inference_boxes_hand_computed_on_non_square_images(tiny_refine_model, monkeypatch):
    """Top-k (query, class) pairs and their boxes in pixels, by hand, for a wide image and a tall
    one: x scales with the width, y with the height."""
    monkeypatch.setattr(tiny_refine_model, "select_box_nums_for_evaluation", 3)
    logits = torch.tensor(
        [
            [[2.0, -1.0], [0.5, 3.0], [-2.0, 1.0]],  # top 3: (q1, c1), (q0, c0), (q2, c1)
            [[-1.0, 0.0], [4.0, -3.0], [1.5, 2.5]],  # top 3: (q1, c0), (q2, c1), (q2, c0)
        ]
    )
    boxes = torch.tensor(  # normalized (cx, cy, w, h)
        [
            [[0.5, 0.25, 0.2, 0.1], [0.3, 0.6, 0.4, 0.2], [0.75, 0.5, 0.5, 1.0]],
            [[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 1.0, 0.5], [0.2, 0.8, 0.2, 0.2]],
        ]
    )
    wide, tall = tiny_refine_model.inference(logits, boxes, [(60, 100), (40, 30)])
    assert wide.image_size == (60, 100) and tall.image_size == (40, 30)
    # x0 = (cx - w / 2) * width, y0 = (cy - h / 2) * height, ...
    torch.testing.assert_close(
        wide.pred_boxes.tensor,
        torch.tensor(
            [[10.0, 30.0, 50.0, 42.0], [40.0, 12.0, 60.0, 18.0], [50.0, 0.0, 100.0, 60.0]]
        ),
    )
    torch.testing.assert_close(wide.scores, torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    assert wide.pred_classes.tolist() == [1, 0, 1]
    torch.testing.assert_close(
        tall.pred_boxes.tensor,
        torch.tensor([[0.0, 10.0, 30.0, 30.0], [3.0, 28.0, 9.0, 36.0], [3.0, 28.0, 9.0, 36.0]]),
    )
    torch.testing.assert_close(tall.scores, torch.tensor([4.0, 2.5, 1.5]).sigmoid())
    assert tall.pred_classes.tolist() == [0, 1, 0]

    # to the original size (120 wide, 90 high): x by 1.2, y by 1.5, then clipped to the image
    wide.pred_boxes.tensor[2] = torch.tensor([50.0, -10.0, 110.0, 70.0])
    original = rescale_instances(wide, 90, 120)
    assert original.image_size == (90, 120)
    torch.testing.assert_close(
        original.pred_boxes.tensor,
        torch.tensor(
            [[12.0, 45.0, 60.0, 63.0], [48.0, 18.0, 72.0, 27.0], [60.0, 0.0, 120.0, 90.0]]
        ),
    )


def test_bad_images_are_rejected_with_clear_errors(tiny_refine_model):
    model = tiny_refine_model.eval()
    with pytest.raises(ValueError, match=r"shape \(3, H, W\).*\(64, 64, 3\)"):
        model([{"image": torch.zeros(64, 64, 3, dtype=torch.uint8)}])
    with pytest.raises(TypeError, match=r"uint8.*torch\.int32"):
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.int32)}])
    with pytest.raises(TypeError, match="'image' tensor"):
        model([{"file_name": "x.jpg"}])


def test_two_stage_without_box_refinement_is_refused_at_construction():
    cfg = tiny_model_config("two_stage")
    cfg.model.with_box_refine = False
    with pytest.raises(ValueError, match=r"as_two_stage=True needs with_box_refine=True"):
        instantiate(cfg.model)


def test_training_inputs_checks(tiny_refine_model):
    model = tiny_refine_model.train()
    with pytest.raises(KeyError, match="no 'instances'"):
        model([{"image": random_image(64, 64)}])

    # an image without objects is a valid sample: every query is a negative
    empty = Instances((64, 64))
    empty.gt_boxes = Boxes(torch.zeros((0, 4)))
    empty.gt_classes = torch.zeros((0,), dtype=torch.int64)
    losses = model([{"image": random_image(64, 64), "instances": empty}])
    assert torch.isfinite(sum(losses.values()))
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_class"].item() > 0


# Host reads a training forward may make: the Hungarian matcher copies its cost matrix to the CPU
# once per call (scipy solves the assignment), and the transformer reads the level shapes back
# (not a check: the shapes of the feature maps).
ALLOWED_HOST_READS = {
    ("detrkit/modeling/matcher.py:forward", "to CPU"),
    ("projects/deformable_detr/modeling/deformable_transformer.py:get_reference_points", "tolist"),
    (
        "projects/deformable_detr/modeling/deformable_transformer.py:gen_encoder_output_proposals",
        "tolist",
    ),
}
# on the CPU the deformable-attention entry point reads its level table to check it (no sync
# there); on CUDA it reads nothing (tests/test_ms_deform_attn_cuda.py runs it in sync-debug mode)
OP_PREFIX = "detrkit/layers/ms_deform_attn"


@pytest.mark.parametrize("variant", ["refine", "two_stage"])
def test_training_forward_reads_nothing_back_to_validate(variant):
    """On a GPU every read of a tensor value by the host is a sync; the training forward must
    make none to check its inputs (the data pipeline checks them where they enter)."""
    from host_syncs import HostReads

    torch.manual_seed(random.randrange(2**31))
    model = instantiate(tiny_model_config(variant).model).train()
    batch = [
        training_record(64, 80, [[1, 1, 20, 30], [10, 10, 60, 40]], [0, 3]),
        training_record(48, 64, [[5, 5, 30, 30]], [1]),
    ]
    with HostReads() as reads:
        losses = model(batch)
    assert torch.isfinite(sum(losses.values()))
    sites = {site for site in reads.sites if not site[0].startswith(OP_PREFIX)}
    assert sites <= ALLOWED_HOST_READS, sites - ALLOWED_HOST_READS
    # the instrumentation sees reads: one cost-matrix copy per matched output (3 decoder
    # layers; + the two-stage proposals, or x2 with the quickstart's one-to-many queries)
    expected = 4 if variant == "two_stage" else 6
    assert reads.sites[("detrkit/modeling/matcher.py:forward", "to CPU")] == expected


def test_loss_weights_resolve_to_base_names():
    losses = {k: torch.tensor(1.0) for k in ("loss_class", "loss_bbox_3", "loss_giou_enc", "x")}
    weighted = weight_losses(losses, {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou_enc": 0.5})
    assert {k: v.item() for k, v in weighted.items()} == {
        "loss_class": 2.0,
        "loss_bbox_3": 5.0,
        "loss_giou_enc": 0.5,
    }


# --------------------------------------------------------------------------- learning


ITERATIONS = 200


def test_tiny_model_overfits_four_images():
    """Four images with two boxes each: a small model drives the loss to near zero and then
    finds every box with the right class."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    generator = random.Random(seed)
    cfg = tiny_model_config("refine")
    cfg.model.num_queries = 10
    model = instantiate(cfg.model).train()

    records = []
    for _ in range(4):
        height, width = 64, 80
        image = torch.full((3, height, width), 30, dtype=torch.uint8)
        boxes, classes = [], []
        for x0 in (generator.randint(0, 8), generator.randint(40, 48)):
            y0, w, h = (
                generator.randint(0, 24),
                generator.randint(16, 28),
                generator.randint(16, 36),
            )
            cls = generator.randrange(4)
            color = torch.tensor(
                [60 * cls + 60, 255 - 50 * cls, 40 + 70 * (cls % 2)], dtype=torch.uint8
            )
            image[:, y0 : y0 + h, x0 : x0 + w] = color[:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            classes.append(cls)
        record = training_record(height, width, boxes, classes)
        record["image"] = image
        records.append(record)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    first = None
    for _ in range(ITERATIONS):
        losses = model(records)
        total = sum(losses.values())
        first = first if first is not None else total.item()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    last = total.item()
    assert last < 0.03 * first, (first, last)
    print(f"overfit: total loss {first:.3f} -> {last:.4f}")

    model.eval()
    with torch.no_grad():
        outputs = model(records)
    for record, output in zip(records, outputs):
        predictions = output["instances"]
        confident = predictions.scores > 0.5
        for box, cls in zip(record["instances"].gt_boxes.tensor, record["instances"].gt_classes):
            candidates = confident & (predictions.pred_classes == cls)
            assert candidates.any()
            error = (predictions.pred_boxes.tensor[candidates] - box).abs().max(dim=1).values
            assert error.min() < 3.0


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage"])
def test_bfloat16_autocast_training_step(variant):
    """Under CPU autocast the attention reads bfloat16 values with float32 sampling locations,
    and the losses and gradients stay finite."""
    torch.manual_seed(random.randrange(2**31))
    model = instantiate(tiny_model_config(variant).model).train()
    seen = []
    attention = model.transformer.encoder.layers[0].attentions[0]
    attention.value_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = [
        training_record(72, 96, [[4, 6, 40, 50], [30, 20, 90, 70]], [3, 1]),
        training_record(64, 56, [[10, 12, 30, 60]], [0]),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    total = sum(losses.values())
    assert seen == [torch.bfloat16]
    assert all(v.dtype == torch.float32 for v in losses.values())  # losses upcast
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
