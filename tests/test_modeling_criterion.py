"""sigmoid_focal_loss and SetCriterion against losses written out element by element."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from detrkit.modeling import HungarianMatcher, SetCriterion, sigmoid_focal_loss

# ----------------------------------------------------------------------------------------------
# python oracles
# ----------------------------------------------------------------------------------------------


def _focal_element(logit: float, target: float, alpha: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def _giou_cxcywh(a: list[float], b: list[float]) -> float:
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _oracle_losses(outputs, targets, indices, num_boxes, alpha=0.25, gamma=2.0) -> dict:
    logits = outputs["pred_logits"].tolist()
    boxes = outputs["pred_boxes"].tolist()
    loss_class = loss_bbox = loss_giou = 0.0
    for b, (pred_idx, tgt_idx) in enumerate(indices):
        matched = dict(zip(pred_idx.tolist(), tgt_idx.tolist()))
        labels = targets[b]["labels"].tolist()
        tgt_boxes = targets[b]["boxes"].tolist()
        for q, row in enumerate(logits[b]):
            for c, logit in enumerate(row):
                is_target = q in matched and labels[matched[q]] == c
                loss_class += _focal_element(logit, 1.0 if is_target else 0.0, alpha, gamma)
        for q, t in matched.items():
            loss_bbox += sum(abs(u - v) for u, v in zip(boxes[b][q], tgt_boxes[t]))
            loss_giou += 1 - _giou_cxcywh(boxes[b][q], tgt_boxes[t])
    return {
        "loss_class": loss_class / num_boxes,
        "loss_bbox": loss_bbox / num_boxes,
        "loss_giou": loss_giou / num_boxes,
    }


class _FixedMatcher(nn.Module):
    """Returns queued assignments, one list per call, and records what it was called with."""

    def __init__(self, *assignments: list[tuple[list[int], list[int]]]) -> None:
        super().__init__()
        self.assignments = [
            [(torch.tensor(p, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for p, t in a]
            for a in assignments
        ]
        self.calls: list[dict] = []

    def forward(self, outputs, targets):
        self.calls.append(outputs)
        return self.assignments[len(self.calls) - 1]


def _random_outputs(batch: int, num_queries: int, num_classes: int) -> dict:
    return {
        "pred_logits": torch.randn(batch, num_queries, num_classes, requires_grad=True),
        "pred_boxes": (torch.rand(batch, num_queries, 4) * 0.4 + 0.2).requires_grad_(True),
    }


def _random_targets(sizes: list[int], num_classes: int) -> list[dict]:
    return [
        {"labels": torch.randint(0, num_classes, (n,)), "boxes": torch.rand(n, 4) * 0.4 + 0.2}
        for n in sizes
    ]


# ----------------------------------------------------------------------------------------------
# sigmoid_focal_loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.0), (0.8, 0.0)])
def test_focal_loss_matches_hand_formula(alpha: float, gamma: float) -> None:
    logits = torch.randn(2, 5, 3) * 3
    targets = (torch.rand(2, 5, 3) < 0.3).float()
    num_boxes = 2.5
    got = sigmoid_focal_loss(logits, targets, num_boxes, alpha=alpha, gamma=gamma)
    expected = sum(
        _focal_element(x, t, alpha, gamma)
        for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist())
    )
    assert got.item() == pytest.approx(expected / num_boxes, rel=1e-5)


def test_focal_loss_without_alpha_and_gamma_is_summed_bce() -> None:
    logits = torch.randn(3, 4, 6)
    targets = (torch.rand(3, 4, 6) < 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 4.0
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, 4.0, alpha=-1, gamma=0.0), expected
    )


def test_focal_loss_gradients() -> None:
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(2, 3, 4) < 0.4).double()
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, targets, 3.0), (logits,))
    sigmoid_focal_loss(logits, targets, 3.0).backward()
    # raising a positive's logit or lowering a negative's always lowers the loss
    assert (logits.grad[targets == 1] < 0).all()
    assert (logits.grad[targets == 0] > 0).all()


# ----------------------------------------------------------------------------------------------
# SetCriterion
# ----------------------------------------------------------------------------------------------
def test_losses_for_given_matching_match_oracle() -> None:
    outputs = _random_outputs(2, 4, 3)
    targets = _random_targets([2, 1], 3)
    assignment = [([3, 1], [0, 1]), ([2], [0])]
    matcher = _FixedMatcher(assignment)
    criterion = SetCriterion(3, matcher, weight_dict={"loss_class": 1.0})
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    expected = _oracle_losses(outputs, targets, matcher.assignments[0], num_boxes=3)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    assert criterion.weight_dict == {"loss_class": 1.0}


def test_aux_outputs_are_matched_separately_and_suffixed() -> None:
    outputs = _random_outputs(2, 4, 3)
    outputs["aux_outputs"] = [_random_outputs(2, 4, 3) for _ in range(2)]
    targets = _random_targets([2, 1], 3)
    assignments = [
        [([3, 1], [0, 1]), ([2], [0])],
        [([0, 2], [1, 0]), ([0], [0])],
        [([1, 2], [0, 1]), ([3], [0])],
    ]
    matcher = _FixedMatcher(*assignments)
    losses = SetCriterion(3, matcher, weight_dict={})(outputs, targets)
    assert len(matcher.calls) == 3
    assert matcher.calls[1]["pred_logits"] is outputs["aux_outputs"][0]["pred_logits"]
    assert "aux_outputs" not in matcher.calls[0]
    names = ["loss_class", "loss_bbox", "loss_giou"]
    assert set(losses) == {f"{n}{s}" for n in names for s in ["", "_0", "_1"]}
    for i in range(2):
        expected = _oracle_losses(outputs["aux_outputs"][i], targets, matcher.assignments[i + 1], 3)
        for name in names:
            assert losses[f"{name}_{i}"].item() == pytest.approx(expected[name], rel=1e-5)


def test_with_real_matcher_exact_predictions_have_zero_box_loss() -> None:
    targets = _random_targets([3, 2], 4)
    outputs = _random_outputs(2, 6, 4)
    with torch.no_grad():
        for b, target in enumerate(targets):
            slots = torch.randperm(6)[: len(target["boxes"])]
            outputs["pred_boxes"][b, slots] = target["boxes"]
    # on box costs alone, the exact copies are the unique optimum (L1 0, -GIoU -1)
    matcher = HungarianMatcher(cost_class=0.0)
    losses = SetCriterion(4, matcher, weight_dict={})(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    indices = matcher(outputs, targets)
    expected = _oracle_losses(outputs, targets, indices, num_boxes=5)
    assert losses["loss_class"].item() == pytest.approx(expected["loss_class"], rel=1e-5)


def test_images_without_targets() -> None:
    outputs = _random_outputs(2, 5, 3)
    targets = _random_targets([0, 2], 3)
    criterion = SetCriterion(3, HungarianMatcher(), weight_dict={})
    losses = criterion(outputs, targets)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices[0][0]) == 0
    expected = _oracle_losses(outputs, targets, indices, num_boxes=2)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5)

    # a batch with no boxes at all: num_boxes clamps to 1, every query is a negative
    targets = _random_targets([0, 0], 3)
    losses = criterion(outputs, targets)
    negatives = sum(
        _focal_element(x, 0.0, 0.25, 2.0) for x in outputs["pred_logits"].flatten().tolist()
    )
    assert losses["loss_class"].item() == pytest.approx(negatives, rel=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_degenerate_predicted_boxes_give_finite_losses_and_gradients() -> None:
    outputs = _random_outputs(1, 3, 2)
    with torch.no_grad():
        outputs["pred_boxes"][0, :, 2:] = 0.0  # zero width and height
    targets = _random_targets([2], 2)
    losses = SetCriterion(2, HungarianMatcher(), weight_dict={})(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_boxes"].grad).all()


def test_ce_loss_is_weighted_cross_entropy_with_no_object_class() -> None:
    num_classes, eos_coef = 3, 0.1
    outputs = _random_outputs(2, 4, num_classes + 1)
    targets = _random_targets([2, 1], num_classes)
    assignment = [([0, 2], [1, 0]), ([3], [0])]
    criterion = SetCriterion(
        num_classes,
        _FixedMatcher(assignment),
        weight_dict={},
        losses=["class"],
        loss_class_type="ce_loss",
        eos_coef=eos_coef,
    )
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_class"}
    total = weight_sum = 0.0
    for b, (pred_idx, tgt_idx) in enumerate(assignment):
        matched = dict(zip(pred_idx, tgt_idx))
        for q, row in enumerate(outputs["pred_logits"][b].tolist()):
            label = targets[b]["labels"][matched[q]].item() if q in matched else num_classes
            weight = eos_coef if label == num_classes else 1.0
            log_norm = math.log(sum(math.exp(v) for v in row))
            total += weight * (log_norm - row[label])
            weight_sum += weight
    assert losses["loss_class"].item() == pytest.approx(total / weight_sum, rel=1e-5)


def test_get_num_boxes_single_process() -> None:
    targets = _random_targets([3, 0, 2], 2)
    assert SetCriterion.get_num_boxes(targets, torch.device("cpu")) == 5.0
    assert SetCriterion.get_num_boxes(_random_targets([0, 0], 2), torch.device("cpu")) == 1.0


# per case: (boxes per image on rank 0, on rank 1), the expected num_boxes on every rank
_DIST_CASES = [
    (([3, 2], [1]), 3.0),  # (5 + 1) / 2
    (([0], [1, 0]), 1.0),  # (0 + 1) / 2 = 0.5, clamped to 1
]


def _num_boxes_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        values = []
        for sizes, _ in _DIST_CASES:
            targets = _random_targets(sizes[rank], 2)
            values.append(SetCriterion.get_num_boxes(targets, torch.device("cpu")))
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(" ".join(repr(v) for v in values))
    finally:
        dist.destroy_process_group()


def test_get_num_boxes_is_averaged_over_processes(tmp_path) -> None:
    mp.spawn(_num_boxes_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = [value for _, value in _DIST_CASES]
    for rank in range(2):
        got = [float(v) for v in (tmp_path / f"rank{rank}.txt").read_text().split()]
        assert got == expected


def test_targets_of_the_wrong_structure_are_named() -> None:
    criterion = SetCriterion(3, HungarianMatcher(), weight_dict={})
    outputs = _random_outputs(2, 4, 3)
    # (values: class ids and finite boxes are the data pipeline's checks, not the criterion's)
    with pytest.raises(ValueError, match="got 1 targets for a batch of 2"):
        criterion(outputs, _random_targets([1], 3))
    targets = _random_targets([1, 2], 3)
    targets[1]["boxes"] = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"boxes of image 1 must have shape \(2, 4\)"):
        criterion(outputs, targets)
    with pytest.raises(ValueError, match=r"unknown losses \['masks'\]"):
        SetCriterion(3, HungarianMatcher(), weight_dict={}, losses=["class", "masks"])
    with pytest.raises(ValueError, match="loss_class_type 'bce'"):
        SetCriterion(3, HungarianMatcher(), weight_dict={}, loss_class_type="bce")


def test_src_permutation_idx() -> None:
    indices = [
        (torch.tensor([3, 1]), torch.tensor([0, 1])),
        (torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
        (torch.tensor([2]), torch.tensor([0])),
    ]
    batch_idx, src_idx = SetCriterion._get_src_permutation_idx(indices)
    assert batch_idx.tolist() == [0, 0, 2] and src_idx.tolist() == [3, 1, 2]
