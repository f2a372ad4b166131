"""HungarianMatcher against a brute-force search over all assignments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from detrkit.modeling import HungarianMatcher


def _xyxy(box: list[float]) -> list[float]:
    cx, cy, w, h = box
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _giou(a: list[float], b: list[float]) -> float:
    a, b = _xyxy(a), _xyxy(b)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _pair_cost(logits, box, label, tgt_box, weights, class_type, alpha=0.25, gamma=2.0) -> float:
    """Matching cost of one query and one target, in Python floats."""
    w_class, w_bbox, w_giou = weights
    if class_type == "focal_loss_cost":
        p = 1 / (1 + math.exp(-logits[label]))
        pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
        neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
        class_cost = pos - neg
    else:
        exps = [math.exp(v) for v in logits]
        class_cost = -exps[label] / sum(exps)
    l1 = sum(abs(u - v) for u, v in zip(box, tgt_box))
    return w_class * class_cost + w_bbox * l1 + w_giou * -_giou(box, tgt_box)


def _brute_force_min_cost(cost: list[list[float]]) -> float:
    """Cheapest one-to-one assignment of a (Q, T) cost matrix, by enumeration."""
    num_q, num_t = len(cost), len(cost[0])
    if num_t <= num_q:
        return min(
            sum(cost[q][t] for t, q in enumerate(perm))
            for perm in itertools.permutations(range(num_q), num_t)
        )
    return min(
        sum(cost[q][t] for q, t in enumerate(perm))
        for perm in itertools.permutations(range(num_t), num_q)
    )


def _random_problem(batch: int, num_queries: int, num_classes: int, sizes: list[int]):
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes) * 2,
        "pred_boxes": torch.rand(batch, num_queries, 4) * 0.5 + 0.1,
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,)),
            "boxes": torch.rand(n, 4) * 0.5 + 0.1,
        }
        for n in sizes
    ]
    return outputs, targets


@pytest.mark.parametrize("class_type", ["focal_loss_cost", "ce_cost"])
@pytest.mark.parametrize("weights", [(2.0, 5.0, 2.0), (1.0, 0.0, 3.0), (0.0, 1.0, 0.0)])
def test_matches_brute_force(class_type: str, weights: tuple[float, float, float]) -> None:
    matcher = HungarianMatcher(*weights, cost_class_type=class_type)
    for _ in range(4):
        num_queries = int(torch.randint(1, 7, ()).item())
        sizes = [int(torch.randint(1, 4, ()).item()) for _ in range(3)]
        outputs, targets = _random_problem(3, num_queries, 5, sizes)
        indices = matcher(outputs, targets)
        assert len(indices) == 3
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            assert pred_idx.dtype == tgt_idx.dtype == torch.int64
            num_t = sizes[b]
            assert len(pred_idx) == len(tgt_idx) == min(num_queries, num_t)
            assert len(set(pred_idx.tolist())) == len(pred_idx)  # one-to-one
            assert len(set(tgt_idx.tolist())) == len(tgt_idx)
            logits = outputs["pred_logits"][b].tolist()
            boxes = outputs["pred_boxes"][b].tolist()
            labels = targets[b]["labels"].tolist()
            tgt_boxes = targets[b]["boxes"].tolist()
            cost = [
                [
                    _pair_cost(logits[q], boxes[q], labels[t], tgt_boxes[t], weights, class_type)
                    for t in range(num_t)
                ]
                for q in range(num_queries)
            ]
            chosen = sum(cost[q][t] for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()))
            assert chosen == pytest.approx(_brute_force_min_cost(cost), abs=1e-4)


def test_recovers_a_known_permutation_from_boxes() -> None:
    # queries 0..5 hold the targets' boxes in a shuffled order, plus noise-free extras
    targets_boxes = torch.rand(4, 4) * 0.4 + 0.2
    perm = torch.randperm(6)[:4]  # target t sits at query perm[t]
    pred_boxes = torch.rand(1, 6, 4) * 0.4 + 0.2
    pred_boxes[0, perm] = targets_boxes
    outputs = {"pred_logits": torch.randn(1, 6, 3), "pred_boxes": pred_boxes}
    targets = [{"labels": torch.randint(0, 3, (4,)), "boxes": targets_boxes}]
    pred_idx, tgt_idx = HungarianMatcher(cost_class=0.0)(outputs, targets)[0]
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {t: int(perm[t]) for t in range(4)}


def test_empty_targets() -> None:
    outputs, targets = _random_problem(3, 5, 4, [0, 2, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert [len(p) for p, _ in indices] == [0, 2, 0]
    assert all(p.dtype == torch.int64 and t.dtype == torch.int64 for p, t in indices)
    outputs, targets = _random_problem(2, 5, 4, [0, 0])
    assert all(len(p) == 0 and len(t) == 0 for p, t in HungarianMatcher()(outputs, targets))


def test_non_finite_costs_name_the_cost() -> None:
    outputs, targets = _random_problem(2, 4, 3, [2, 1])
    bad = {**outputs, "pred_boxes": outputs["pred_boxes"].clone()}
    bad["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="cost_bbox"):
        HungarianMatcher()(bad, targets)
    bad = {**outputs, "pred_logits": outputs["pred_logits"].clone()}
    # a NaN logit only enters the cost through a class some target has
    bad["pred_logits"][0, 1, targets[1]["labels"][0]] = float("nan")
    with pytest.raises(FloatingPointError, match="cost_class"):
        HungarianMatcher()(bad, targets)


def test_runs_without_grad_and_validates() -> None:
    outputs, targets = _random_problem(1, 4, 3, [2])
    outputs["pred_logits"].requires_grad_(True)
    pred_idx, _ = HungarianMatcher()(outputs, targets)[0]
    assert not pred_idx.requires_grad
    with pytest.raises(ValueError, match="cost_class_type 'l2'"):
        HungarianMatcher(cost_class_type="l2")
    with pytest.raises(ValueError, match="cost_bbox must be >= 0; got -1"):
        HungarianMatcher(cost_bbox=-1)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        HungarianMatcher()(outputs, targets * 2)
