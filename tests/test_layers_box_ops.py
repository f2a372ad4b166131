"""Box conversions, IoU / GIoU against per-pair Python and hand-computed cases, inverse_sigmoid."""

from __future__ import annotations

import math

import pytest
import torch

from detrkit.layers import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_generalized_box_iou,
)


def _brute_force_giou(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(iou, union, giou) of two xyxy boxes in plain Python; an inverted side has length 0."""

    def area(box: list[float]) -> float:
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = area(a) + area(b) - inter
    enclosing = max(0.0, max(a[2], b[2]) - min(a[0], b[0])) * max(
        0.0, max(a[3], b[3]) - min(a[1], b[1])
    )
    iou = inter / union if union > 0 else 0.0
    giou = iou - (enclosing - union) / enclosing if enclosing > 0 else iou
    return iou, union, giou


def _random_xyxy(n: int) -> torch.Tensor:
    xy = torch.rand(n, 2)
    wh = torch.rand(n, 2) * 0.6
    return torch.cat([xy, xy + wh], dim=1)


def test_conversions_round_trip_and_hand_values() -> None:
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.8, 0.1, 1.0]]))
    boxes = torch.rand(3, 5, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_iou_and_giou_match_brute_force() -> None:
    boxes1, boxes2 = _random_xyxy(7), _random_xyxy(5)
    iou, union = box_iou(boxes1, boxes2)
    giou = generalized_box_iou(boxes1, boxes2)
    assert iou.shape == union.shape == giou.shape == (7, 5)
    for i, a in enumerate(boxes1.tolist()):
        for j, b in enumerate(boxes2.tolist()):
            e_iou, e_union, e_giou = _brute_force_giou(a, b)
            assert iou[i, j].item() == pytest.approx(e_iou, abs=1e-5)
            assert union[i, j].item() == pytest.approx(e_union, abs=1e-5)
            assert giou[i, j].item() == pytest.approx(e_giou, abs=1e-5)


@pytest.mark.parametrize(
    ("a", "b", "iou", "giou"),
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),  # identical
        ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # disjoint: enclosing 3, union 2
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # overlap 1, union 7, enclosing 9
        ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),  # contained: enclosing == union
        ([0, 0, 1, 1], [10, 10, 11, 11], 0.0, -(121 - 2) / 121),  # far apart
    ],
)
def test_hand_computed_cases(a: list, b: list, iou: float, giou: float) -> None:
    t_a, t_b = torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)
    assert box_iou(t_a, t_b)[0].item() == pytest.approx(iou, abs=1e-6)
    assert generalized_box_iou(t_a, t_b).item() == pytest.approx(giou, abs=1e-6)
    # symmetric
    assert generalized_box_iou(t_b, t_a).item() == pytest.approx(giou, abs=1e-6)


def test_degenerate_boxes_are_finite_and_have_finite_gradients() -> None:
    pred = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],  # a point inside the target
            [0.6, 0.6, 0.4, 0.4],  # inverted (x1 < x0, y1 < y0)
            [0.2, 0.2, 0.2, 0.8],  # zero width
            [0.6, 0.2, 0.4, 0.8],  # inverted in x only
            [3.0, 3.0, 3.0, 3.0],  # a point far away
        ],
        requires_grad=True,
    )
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    giou = generalized_box_iou(pred, target)
    assert torch.isfinite(giou).all()
    # against the point/inverted boxes (area 0) IoU is 0 and the enclosing box is the target
    assert giou[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert giou[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert giou[2, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert giou[3, 0].item() == pytest.approx(0.0, abs=1e-6)
    # point at (3, 3) vs the unit box: enclosing 9, union 1
    assert giou[4, 0].item() == pytest.approx(-8 / 9, abs=1e-6)
    # two identical points: everything is 0, no 0/0
    assert giou[4, 1].item() == pytest.approx(0.0, abs=1e-6)
    for i, a in enumerate(pred.tolist()):
        for j, b in enumerate(target.tolist()):
            assert giou[i, j].item() == pytest.approx(_brute_force_giou(a, b)[2], abs=1e-6)
    (1 - giou).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_paired_giou_is_the_diagonal() -> None:
    boxes1, boxes2 = _random_xyxy(6), _random_xyxy(6)
    torch.testing.assert_close(
        paired_generalized_box_iou(boxes1, boxes2), generalized_box_iou(boxes1, boxes2).diagonal()
    )
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5, 4\)"):
        paired_generalized_box_iou(boxes1, boxes2[:5])


def test_inverse_sigmoid() -> None:
    x = torch.rand(100) * 0.998 + 0.001
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inverse_sigmoid(x), torch.log(x / (1 - x)), atol=1e-5, rtol=1e-5)
    edge = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5, 0.5]))
    expected = [math.log(1e-5), -math.log(1e-5), math.log(1e-5), -math.log(1e-5), 0.0]
    assert edge.tolist() == pytest.approx(expected, abs=1e-4)
    # custom eps
    assert inverse_sigmoid(torch.tensor([0.0]), eps=1e-3).item() == pytest.approx(
        math.log(1e-3), abs=1e-5
    )
