"""Compare an exported artifact's detections with the PyTorch model's.

Top-k lists can legitimately differ in order where two detections score within rounding of
each other, so detections are matched rather than compared position by position: sorted scores
are compared as vectors, and every reference detection must find an exported one with the same
label, a score within tolerance and (reported) box difference. Only a detection at the very end
of the list, scoring within tolerance of the last kept score, may be missing (it can swap with
the first one left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BOX_TOLERANCE", "SCORE_TOLERANCE", "DetectionDifference", "compare_detections"]

SCORE_TOLERANCE = 1e-4  # max |score difference|
BOX_TOLERANCE = 1e-2  # max |box coordinate difference| in input pixels


@dataclass
class DetectionDifference:
    """How far two detection sets are apart, over all images and the top `compared`."""

    max_score: float = 0.0
    max_box: float = 0.0
    unmatched: int = 0  # reference detections with no exported one of equal label and score
    compared: int = 0

    def ok(self, score_tolerance: float = SCORE_TOLERANCE, box_tolerance: float = BOX_TOLERANCE):
        return (
            self.unmatched == 0
            and self.max_score <= score_tolerance
            and self.max_box <= box_tolerance
        )

    def merge(self, other: DetectionDifference) -> DetectionDifference:
        return DetectionDifference(
            max(self.max_score, other.max_score),
            max(self.max_box, other.max_box),
            self.unmatched + other.unmatched,
            self.compared + other.compared,
        )

    def __str__(self) -> str:
        return (
            f"max |score diff| {self.max_score:.3g}, max |box diff| {self.max_box:.3g} px, "
            f"{self.unmatched} of {self.compared} detections without a same-label match"
        )


def _compare_image(ref: tuple, out: tuple, top: int, score_tolerance: float):
    ref_boxes, ref_scores, ref_labels = (np.asarray(a)[:top] for a in ref)
    out_boxes, out_scores, out_labels = (np.asarray(a)[:top] for a in out)
    n = min(len(ref_scores), len(out_scores))
    diff = DetectionDifference(compared=len(ref_scores))
    if len(ref_scores) != len(out_scores):
        diff.unmatched = abs(len(ref_scores) - len(out_scores))
    if n == 0:
        return diff
    diff.max_score = float(
        np.abs(np.sort(ref_scores)[::-1][:n] - np.sort(out_scores)[::-1][:n]).max()
    )
    last_score = ref_scores[:n].min()
    used = np.zeros(len(out_scores), dtype=bool)
    for i in range(len(ref_scores)):
        candidates = (
            ~used
            & (out_labels == ref_labels[i])
            & (np.abs(out_scores - ref_scores[i]) <= score_tolerance)
        )
        if not candidates.any():
            if ref_scores[i] - last_score > score_tolerance:
                diff.unmatched += 1
            continue
        box_diff = np.abs(out_boxes - ref_boxes[i]).max(axis=1)
        box_diff[~candidates] = np.inf
        j = int(box_diff.argmin())
        used[j] = True
        diff.max_box = max(diff.max_box, float(box_diff[j]))
    return diff


def compare_detections(
    reference: tuple, exported: tuple, top: int = 100, score_tolerance: float = SCORE_TOLERANCE
) -> DetectionDifference:
    """Match the top `top` detections of each image: `reference` and `exported` are (boxes
    (N, K, 4), scores (N, K), labels (N, K)) arrays, scores in decreasing order."""
    total = DetectionDifference()
    for image in range(len(reference[1])):
        total = total.merge(
            _compare_image(
                tuple(a[image] for a in reference),
                tuple(a[image] for a in exported),
                top,
                score_tolerance,
            )
        )
    return total
