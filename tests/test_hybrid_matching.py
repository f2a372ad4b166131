"""Hybrid matching (`model.num_queries_one2many`): the one-to-many queries are a training aid
that never changes what the one-to-one queries compute, and their losses see every target
`one2many_repeats` times."""

from __future__ import annotations

import random

import pytest
import torch

from detrkit.config import instantiate
from detrkit.modeling import HungarianMatcher
from detrkit.structures import ImageList
from projects.deformable_detr.modeling import DeformableCriterion
from projects.deformable_detr.modeling.deformable_detr import weight_losses
from tests.test_deformable_detr import (
    assert_same_detections,
    random_image,
    tiny_model_config,
    training_record,
)

EXTRA_QUERIES = 20


def hybrid_and_plain_models(variant: str = "refine"):
    """A tiny model with EXTRA_QUERIES one-to-many queries and the plain model holding the same
    weights, its queries the hybrid model's first `num_queries` rows."""
    torch.manual_seed(random.randrange(2**31))
    cfg = tiny_model_config(variant)
    cfg.model.num_queries_one2many = EXTRA_QUERIES
    hybrid = instantiate(cfg.model)
    cfg.model.num_queries_one2many = 0
    plain = instantiate(cfg.model)
    state = hybrid.state_dict()
    num_queries = cfg.model.num_queries
    assert state["query_embedding.weight"].shape[0] == num_queries + EXTRA_QUERIES
    state["query_embedding.weight"] = state["query_embedding.weight"][:num_queries].clone()
    plain.load_state_dict(state)
    return hybrid, plain


@pytest.mark.parametrize("fast_inference", [True, False])
def test_eval_uses_only_the_one2one_queries(fast_inference):
    hybrid, plain = hybrid_and_plain_models()
    for model in (hybrid, plain):
        model.eval().set_fast_inference(fast_inference)
    inputs = [{"image": random_image(96, 128)}, {"image": random_image(112, 80)}]
    with torch.no_grad():
        expected = plain(inputs)
        got = hybrid(inputs)
    for a, b in zip(got, expected):
        assert_same_detections(a["instances"], b["instances"], atol=1e-5)


def test_training_one2one_outputs_do_not_see_the_one2many_queries():
    """In training the decoder runs both groups at once; the one-to-one group's outputs equal
    the plain model's, whatever the one-to-many rows hold (the self-attention mask)."""
    hybrid, plain = hybrid_and_plain_models()
    hybrid.train()
    plain.train()
    images = ImageList.from_tensors([random_image(96, 128).float(), random_image(80, 112).float()])
    with torch.no_grad():
        expected = plain.predict(*plain._features_and_masks(images))
        hybrid.query_embedding.weight[hybrid.num_queries :].normal_(std=3.0)
        got = hybrid.predict(*hybrid._features_and_masks(images))

    num_layers = hybrid.transformer.decoder.num_layers
    assert len(got["aux_outputs"]) == len(got["one2many_outputs"]["aux_outputs"]) == num_layers - 1
    assert got["one2many_outputs"]["pred_boxes"].shape == (2, EXTRA_QUERIES, 4)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
        for aux_got, aux_expected in zip(got["aux_outputs"], expected["aux_outputs"]):
            torch.testing.assert_close(aux_got[key], aux_expected[key], rtol=0, atol=1e-5)


def test_training_step_trains_the_one2many_queries():
    hybrid, _ = hybrid_and_plain_models()
    hybrid.train()
    records = [
        training_record(96, 128, [[10, 12, 50, 60], [60, 20, 120, 90]], [0, 3]),
        training_record(80, 112, [[5, 5, 40, 70]], [2]),
    ]
    losses = hybrid(records)
    one2many = {name for name in losses if name.endswith("_one2many")}
    assert one2many == {f"{name}_one2many" for name in losses if not name.endswith("_one2many")}
    sum(losses.values()).backward()
    grad = hybrid.query_embedding.weight.grad
    assert grad[: hybrid.num_queries].abs().sum() > 0
    assert grad[hybrid.num_queries :].abs().sum() > 0


def focal_loss_by_hand(logits: torch.Tensor, onehot: torch.Tensor, num_boxes: float) -> float:
    p = logits.double().sigmoid()
    t = onehot.double()
    pos = -0.25 * t * (1 - p) ** 2 * torch.log(p)
    neg = -0.75 * (1 - t) * p**2 * torch.log(1 - p)
    return float((pos + neg).sum() / num_boxes)


def test_one2many_losses_against_repeated_targets_by_hand():
    """k copies of every target, each matched to its own query: with boxes exactly on the
    copies the box losses are 0, and the class loss is the focal loss with one-hot rows at
    those queries, normalized by k x targets, times one2many_weight."""
    repeats, weight, num_classes, num_queries = 3, 0.5, 4, 12
    criterion = DeformableCriterion(
        num_classes=num_classes,
        matcher=HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        one2many_repeats=repeats,
        one2many_weight=weight,
    )
    target = {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.1]]),
    }
    boxes = torch.rand(1, num_queries, 4) * 0.1 + torch.tensor([0.1, 0.1, 0.05, 0.05])
    matched = torch.randperm(num_queries)[: 2 * repeats]  # the queries placed on the copies
    boxes[0, matched] = target["boxes"].repeat(repeats, 1)
    logits = torch.randn(1, num_queries, num_classes)
    one2many = {"pred_logits": logits, "pred_boxes": boxes}
    one2one = {"pred_logits": torch.randn(1, 5, num_classes), "pred_boxes": torch.rand(1, 5, 4)}

    losses = criterion({**one2one, "one2many_outputs": one2many}, [target])

    onehot = torch.zeros(1, num_queries, num_classes)
    onehot[0, matched, target["labels"].repeat(repeats)] = 1
    expected_class = weight * focal_loss_by_hand(logits, onehot, num_boxes=2 * repeats)
    assert losses["loss_class_one2many"].item() == pytest.approx(expected_class, rel=1e-5)
    assert losses["loss_bbox_one2many"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_one2many"].item() == pytest.approx(0.0, abs=1e-6)
    # the one-to-one losses are those of the criterion without the extra outputs
    plain = criterion(one2one, [target])
    assert {k: v for k, v in losses.items() if not k.endswith("_one2many")} == plain


def test_one2many_losses_take_their_base_weights():
    names = ("loss_class_one2many", "loss_bbox_2_one2many", "loss_giou_one2many", "loss_bbox")
    losses = {name: torch.tensor(1.0) for name in names}
    weighted = weight_losses(losses, {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 0.5})
    assert {k: v.item() for k, v in weighted.items()} == {
        "loss_class_one2many": 2.0,
        "loss_bbox_2_one2many": 5.0,
        "loss_giou_one2many": 0.5,
        "loss_bbox": 5.0,
    }


def test_bad_settings_are_refused_at_construction():
    cfg = tiny_model_config("two_stage")
    cfg.model.num_queries_one2many = 10
    with pytest.raises(ValueError, match=r"num_queries_one2many.*as_two_stage"):
        instantiate(cfg.model)
    cfg = tiny_model_config("refine")
    cfg.model.num_queries_one2many = -1
    with pytest.raises(ValueError, match="num_queries_one2many must be >= 0"):
        instantiate(cfg.model)
    cfg.model.num_queries_one2many = 10
    cfg.model.criterion.one2many_repeats = 0
    with pytest.raises(ValueError, match="one2many_repeats must be >= 1"):
        instantiate(cfg.model)
