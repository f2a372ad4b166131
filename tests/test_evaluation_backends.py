"""The faster-coco-eval backend against pycocotools, the reference, on a random COCO-like set."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from benchmarks.coco_eval import random_coco_set
from detrkit.evaluation.coco import (
    EVAL_BACKENDS,
    COCOEvaluator,
    evaluate_box_predictions,
    run_cocoeval,
    summary_stats,
)

pytest.importorskip("faster_coco_eval")


@pytest.mark.parametrize("max_dets", [100, 300])
def test_faster_coco_eval_equals_pycocotools(max_dets, capsys):
    rng = np.random.default_rng()
    coco_gt, detections = random_coco_set(rng, num_images=60, dets_per_image=40)
    given = copy.deepcopy(detections)
    reference = run_cocoeval(coco_gt, detections, max_dets, backend="pycocotools")
    fast = run_cocoeval(coco_gt, detections, max_dets, backend="faster_coco_eval")
    assert type(fast).__module__.startswith("faster_coco_eval")
    np.testing.assert_allclose(summary_stats(fast), summary_stats(reference), rtol=0, atol=1e-9)
    assert (summary_stats(reference)[:6] > 0).all()  # every AP line measures something
    np.testing.assert_allclose(fast.eval["precision"], reference.eval["precision"], atol=1e-9)
    np.testing.assert_allclose(fast.eval["recall"], reference.eval["recall"], atol=1e-9)
    # per-class APs and the report agree too
    metrics_ref, _ = evaluate_box_predictions(coco_gt, detections, max_dets_per_image=max_dets)
    metrics_fast, _ = evaluate_box_predictions(
        coco_gt, detections, max_dets_per_image=max_dets, backend="faster_coco_eval"
    )
    assert metrics_ref.keys() == metrics_fast.keys()
    for name, value in metrics_ref.items():
        assert metrics_fast[name] == pytest.approx(value, abs=1e-7, nan_ok=True), name
    assert detections == given  # the caller's result dicts are left as they were


def test_unknown_backend_is_one_line_error():
    with pytest.raises(
        ValueError, match=r"backend 'cocoapi' .*accepted: pycocotools, faster_coco_eval"
    ):
        COCOEvaluator("coco_2017_val", backend="cocoapi")
    assert EVAL_BACKENDS == ("pycocotools", "faster_coco_eval")
