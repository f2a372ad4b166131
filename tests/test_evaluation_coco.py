"""COCOEvaluator against pycocotools itself and hand-computed AP values."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import uuid

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detrkit.data import DatasetCatalog, MetadataCatalog, register_coco_instances
from detrkit.evaluation import COCOEvaluator, inference_on_dataset
from detrkit.evaluation import coco as coco_module
from detrkit.structures import Boxes, Instances

CATEGORY_IDS = [1, 5, 9]  # deliberately not contiguous
CLASS_NAMES = ["ant", "bee", "cat"]


@pytest.fixture
def registered():
    """Register datasets under unique names and unregister them afterwards."""
    names = []

    def register(json_file, image_root="/nonexistent", metadata=None):
        name = f"test_eval_{uuid.uuid4().hex[:8]}"
        register_coco_instances(name, metadata or {}, str(json_file), image_root)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _write_gt(path, images, annotations, categories=None):
    """images: list of (id, h, w); annotations: list of (image_id, category_id, [x, y, w, h]);
    categories: the json's list (default: CATEGORY_IDS named CLASS_NAMES)."""
    if categories is None:
        categories = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASS_NAMES)]
    data = {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, h, w in images
        ],
        "annotations": [
            {
                "id": k + 1,
                "image_id": img,
                "category_id": cat,
                "bbox": list(box),
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for k, (img, cat, box) in enumerate(annotations)
        ],
        "categories": categories,
    }
    path.write_text(json.dumps(data))
    return path


def _prediction(height, width, boxes_xyxy, scores, classes):
    inst = Instances((height, width))
    inst.pred_boxes = Boxes(torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    return {"instances": inst}


def _pycocotools_stats(gt_file, results, max_dets=(1, 10, 100), cat_ids=None):
    """The oracle: pycocotools on the same ground truth and results, without detrkit."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = list(max_dets)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _random_scene(rng, num_images):
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        images.append((image_id * 7, h, w))  # ids need not be 1..N
        for _ in range(int(rng.integers(0, 5))):
            bw, bh = float(rng.integers(8, 150)), float(rng.integers(8, 150))
            x, y = float(rng.integers(0, w - bw)), float(rng.integers(0, h - bh))
            annotations.append((image_id * 7, int(rng.choice(CATEGORY_IDS)), [x, y, bw, bh]))
    return images, annotations


def _evaluate(name, images, predictions_per_image, output_dir=None, **kwargs):
    evaluator = COCOEvaluator(name, output_dir=output_dir, **kwargs)
    evaluator.reset()
    for (image_id, h, w), pred in zip(images, predictions_per_image):
        evaluator.process([{"image_id": image_id, "height": h, "width": w}], [pred])
    return evaluator.evaluate()


def test_perfect_predictions_give_100(tmp_path, registered):
    rng = np.random.default_rng()
    images, annotations = _random_scene(rng, 6)
    gt = _write_gt(tmp_path / "gt.json", images, annotations)
    name = registered(gt)
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    preds = []
    for image_id, h, w in images:
        anns = [a for a in annotations if a[0] == image_id]
        boxes = [[x, y, x + bw, y + bh] for _, _, (x, y, bw, bh) in anns]
        preds.append(_prediction(h, w, boxes, [0.9] * len(anns), [contiguous[a[1]] for a in anns]))
    result = _evaluate(name, images, preds, output_dir=str(tmp_path / "out"))["bbox"]
    assert result["AP"] == pytest.approx(100.0)
    assert result["AP50"] == pytest.approx(100.0)
    assert result["AP75"] == pytest.approx(100.0)
    for cls in CLASS_NAMES:
        if any(a[1] == CATEGORY_IDS[CLASS_NAMES.index(cls)] for a in annotations):
            assert result[f"AP-{cls}"] == pytest.approx(100.0)
    assert (tmp_path / "out" / "instances_predictions.pth").is_file()

    # the written results use the dataset's original category ids, in XYWH
    written = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert len(written) == len(annotations)
    assert {r["category_id"] for r in written} <= set(CATEGORY_IDS)
    expected = sorted((a[0], a[1], tuple(a[2])) for a in annotations)
    got = sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in written)
    assert got == expected  # integer coordinates survive float32 exactly


def test_single_box_iou_062_hand_computed(tmp_path, registered):
    # one 100x100 ground-truth box; the prediction covers its left 62 columns: IoU = 0.62,
    # which passes the IoU thresholds 0.50, 0.55, 0.60 and fails 0.65..0.95 -> AP = 3/10
    gt = _write_gt(tmp_path / "gt.json", [(1, 300, 300)], [(1, 5, [50.0, 60.0, 100.0, 100.0])])
    name = registered(gt)
    pred = _prediction(300, 300, [[50.0, 60.0, 112.0, 160.0]], [0.8], [1])
    result = _evaluate(name, [(1, 300, 300)], [pred])["bbox"]
    assert result["AP"] == pytest.approx(30.0)
    assert result["AP50"] == pytest.approx(100.0)
    assert result["AP75"] == pytest.approx(0.0)
    assert result["APl"] == pytest.approx(30.0)  # area 10000 > 96**2: a "large" object
    assert math.isnan(result["APs"]) and math.isnan(result["APm"])
    assert result["AP-bee"] == pytest.approx(30.0)
    assert math.isnan(result["AP-ant"]) and math.isnan(result["AP-cat"])


def test_wrong_class_gives_zero(tmp_path, registered):
    gt = _write_gt(tmp_path / "gt.json", [(1, 100, 100)], [(1, 9, [10.0, 10.0, 50.0, 50.0])])
    name = registered(gt)
    pred = _prediction(100, 100, [[10.0, 10.0, 60.0, 60.0]], [0.9], [0])  # "ant" instead of "cat"
    result = _evaluate(name, [(1, 100, 100)], [pred])["bbox"]
    assert result["AP"] == 0.0 and result["AP-cat"] == 0.0


# category ids listed unsorted and not contiguous: the loader sorts them (3 -> 0, 7 -> 1, 12 -> 2)
UNSORTED_CATEGORIES = [
    {"id": 12, "name": "cat"},
    {"id": 3, "name": "ant"},
    {"id": 7, "name": "bee"},
]
UNSORTED_ANNOTATIONS = [  # (image_id, category_id, XYWH)
    (1, 12, [10.0, 20.0, 40.0, 30.0]),
    (1, 3, [60.0, 5.0, 25.0, 50.0]),
    (2, 7, [15.0, 15.0, 30.0, 30.0]),
    (2, 12, [50.0, 40.0, 20.0, 45.0]),
    (3, 3, [5.0, 60.0, 70.0, 20.0]),
    (3, 7, [40.0, 10.0, 35.0, 35.0]),
]


def _write_unsorted_gt(path):
    images = [(1, 100, 120), (2, 100, 120), (3, 100, 120)]
    return _write_gt(path, images, UNSORTED_ANNOTATIONS, UNSORTED_CATEGORIES)


def test_labels_learned_from_the_loader_map_back_to_the_files_category_ids(tmp_path, registered):
    """The loader's contiguous labels go back to the json's ids through the metadata map."""
    name = registered(_write_unsorted_gt(tmp_path / "gt.json"))
    records = DatasetCatalog.get(name)  # as training does: fills the metadata
    metadata = MetadataCatalog.get(name)
    assert metadata.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    assert metadata.thing_classes == ["ant", "bee", "cat"]

    # a perfect model predicts each record's boxes with the contiguous labels it was trained on
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "out"))
    evaluator.reset()
    for record in records:
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in record["annotations"])]
        labels = [a["category_id"] for a in record["annotations"]]
        pred = _prediction(100, 120, boxes, [0.9] * len(boxes), labels)
        evaluator.process([{"image_id": record["image_id"]}], [pred])
    result = evaluator.evaluate()["bbox"]
    assert result["AP"] == pytest.approx(100.0)
    for cls in ("ant", "bee", "cat"):
        assert result[f"AP-{cls}"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    got = sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in written)
    assert got == sorted((img, cat, tuple(box)) for img, cat, box in UNSORTED_ANNOTATIONS)


def test_a_registered_category_map_in_its_own_order_is_used(tmp_path, registered):
    """A dataset registered with its own (unsorted) id map: labels follow that map, not the
    sorted ids, and each per-class AP is named after the class it measures."""
    label = {12: 0, 3: 1, 7: 2}
    metadata = {"thing_classes": ["cat", "ant", "bee"], "thing_dataset_id_to_contiguous_id": label}
    name = registered(_write_unsorted_gt(tmp_path / "gt.json"), metadata=metadata)
    # ants and bees found, cats predicted with the right label but in the wrong place
    evaluator = COCOEvaluator(name)
    evaluator.reset()
    for image_id in (1, 2, 3):
        anns = [a for a in UNSORTED_ANNOTATIONS if a[0] == image_id]
        boxes = []
        for _, cat, (x, y, w, h) in anns:
            shift = 200.0 if cat == 12 else 0.0
            boxes.append([x + shift, y, x + w + shift, y + h])
        labels = [label[cat] for _, cat, _ in anns]
        pred = _prediction(100, 120, boxes, [0.9] * len(anns), labels)
        evaluator.process([{"image_id": image_id}], [pred])
    result = evaluator.evaluate()["bbox"]
    assert result["AP-ant"] == pytest.approx(100.0)
    assert result["AP-bee"] == pytest.approx(100.0)
    assert result["AP-cat"] == pytest.approx(0.0)
    assert result["AP"] == pytest.approx(200.0 / 3)


def test_shifted_boxes_match_pycocotools(tmp_path, registered):
    rng = np.random.default_rng()
    images, annotations = _random_scene(rng, 12)
    gt = _write_gt(tmp_path / "gt.json", images, annotations)
    name = registered(gt)
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    preds, raw_results = [], []
    for image_id, h, w in images:
        boxes, scores, classes = [], [], []
        for _, cat, (x, y, bw, bh) in (a for a in annotations if a[0] == image_id):
            dx, dy = rng.uniform(-0.3, 0.3) * bw, rng.uniform(-0.3, 0.3) * bh
            box = [x + dx, y + dy, x + dx + bw, y + dy + bh]
            score = float(rng.uniform(0.05, 1.0))
            label = contiguous[cat] if rng.random() > 0.15 else int(rng.integers(3))
            boxes.append(box)
            scores.append(score)
            classes.append(label)
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            boxes.append([x, y, x + 20, y + 20])
            scores.append(float(rng.uniform(0.0, 1.0)))
            classes.append(int(rng.integers(3)))
        preds.append(_prediction(h, w, boxes, scores, classes))
        # float32 like the Instances, then XYWH by hand for the oracle
        b32 = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).double().tolist()
        s32 = torch.as_tensor(scores, dtype=torch.float32).double().tolist()
        for (x0, y0, x1, y1), s, c in zip(b32, s32, classes):
            raw_results.append(
                {
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[c],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": s,
                }
            )
    result = _evaluate(name, images, preds)["bbox"]
    stats = _pycocotools_stats(gt, raw_results)
    for i, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        if stats[i] < 0:
            assert math.isnan(result[key])
        else:
            assert result[key] == pytest.approx(100 * stats[i], abs=1e-9)
    assert 0 < result["AP"] < 100
    for cat, cls in zip(CATEGORY_IDS, CLASS_NAMES):
        per_cat = _pycocotools_stats(gt, raw_results, cat_ids=[cat])[0]
        if per_cat < 0:
            assert math.isnan(result[f"AP-{cls}"])
        else:
            assert result[f"AP-{cls}"] == pytest.approx(100 * per_cat, abs=1e-9)


def test_max_dets_hand_computed(tmp_path, registered):
    # one ground-truth box; 100 confident wrong boxes and the right one with the lowest score.
    # With maxDets 100 the right box is cut off (AP 0); with 300 it is the 101st detection:
    # precision 1/101 at recall 1, so every IoU threshold gives AP = 1/101.
    gt = _write_gt(tmp_path / "gt.json", [(1, 1000, 1000)], [(1, 1, [900.0, 900.0, 50.0, 50.0])])
    name = registered(gt)
    boxes = [[i * 8.0, 0.0, i * 8.0 + 6.0, 6.0] for i in range(100)] + [[900.0, 900.0, 950, 950]]
    scores = [0.9 - i * 0.001 for i in range(100)] + [0.1]
    pred = _prediction(1000, 1000, boxes, scores, [0] * 101)
    default = _evaluate(name, [(1, 1000, 1000)], [pred], output_dir=str(tmp_path / "a"))
    assert default["bbox"]["AP"] == pytest.approx(0.0)
    more = _evaluate(name, [(1, 1000, 1000)], [pred], max_dets_per_image=300)
    assert more["bbox"]["AP"] == pytest.approx(100 / 101)
    assert more["bbox"]["AP50"] == pytest.approx(100 / 101)
    # every prediction is kept in the results file, not only the first 100
    written = json.loads((tmp_path / "a" / "coco_instances_results.json").read_text())
    assert len(written) == 101


def test_two_halves_gathered_equal_one_evaluator(tmp_path, registered, monkeypatch):
    rng = np.random.default_rng()
    images, annotations = _random_scene(rng, 10)
    name = registered(_write_gt(tmp_path / "gt.json", images, annotations))
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    preds = []
    for image_id, h, w in images:
        anns = [a for a in annotations if a[0] == image_id]
        boxes = [[x + 3, y - 2, x + bw + 4, y + bh] for _, _, (x, y, bw, bh) in anns]
        scores = rng.uniform(0.1, 1, len(anns)).tolist()
        preds.append(_prediction(h, w, boxes, scores, [contiguous[a[1]] for a in anns]))
    single = _evaluate(name, images, preds)

    half = len(images) // 2
    rank0, rank1 = COCOEvaluator(name), COCOEvaluator(name)
    for evaluator, part in ((rank0, slice(0, half)), (rank1, slice(half, None))):
        evaluator.reset()
        for (image_id, h, w), pred in zip(images[part], preds[part]):
            evaluator.process([{"image_id": image_id, "height": h, "width": w}], [pred])
    # rank 0's view of a 2-process job: gather returns both shards (rank 1's shard repeats an
    # image, as a padding sampler would; it must be counted once)
    rank1_preds = rank1._predictions + rank1._predictions[:1]
    monkeypatch.setattr(coco_module, "get_world_size", lambda: 2)
    monkeypatch.setattr(coco_module, "synchronize", lambda: None)
    monkeypatch.setattr(coco_module, "gather", lambda data, dst=0: [data, rank1_preds])
    merged = rank0.evaluate()
    for key, value in single["bbox"].items():
        if math.isnan(value):
            assert math.isnan(merged["bbox"][key])
        else:
            assert merged["bbox"][key] == pytest.approx(value)

    # a non-main rank sends its predictions and returns an empty dict
    monkeypatch.setattr(coco_module, "is_main_process", lambda: False)
    monkeypatch.setattr(coco_module, "gather", lambda data, dst=0: [])
    assert rank1.evaluate() == {}


def test_no_predictions_warns_and_gives_zero(tmp_path, registered, caplog):
    gt = _write_gt(tmp_path / "gt.json", [(1, 100, 100)], [(1, 1, [10.0, 10.0, 30.0, 30.0])])
    name = registered(gt)
    empty = _prediction(100, 100, [], [], [])
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        result = _evaluate(name, [(1, 100, 100)], [empty], output_dir=str(tmp_path / "o"))
    assert "no predictions" in caplog.text
    assert result["bbox"]["AP"] == 0.0 and result["bbox"]["APs"] == 0.0
    assert json.loads((tmp_path / "o" / "coco_instances_results.json").read_text()) == []

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        result = _evaluate(name, [], [])
    assert "did not receive any image" in caplog.text
    assert result["bbox"]["AP"] == 0.0


def test_dataset_without_json_is_converted(tmp_path):
    name = f"test_eval_nojson_{uuid.uuid4().hex[:8]}"
    records = [
        {
            "file_name": f"{i}.jpg",
            "image_id": i,
            "height": 120,
            "width": 160,
            "annotations": [
                {"bbox": [10.0 * i, 5.0, 30.0, 40.0], "bbox_mode": 1, "category_id": i % 2}
            ],
        }
        for i in range(1, 5)
    ]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    try:
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path))
        evaluator.reset()
        for r in records:
            x, y, w, h = r["annotations"][0]["bbox"]
            pred = _prediction(120, 160, [[x, y, x + w, y + h]], [1.0], [r["image_id"] % 2])
            evaluator.process([{"image_id": r["image_id"]}], [pred])
        result = evaluator.evaluate()["bbox"]
        assert result["AP"] == pytest.approx(100.0)
        assert result["AP-a"] == pytest.approx(100.0) and result["AP-b"] == pytest.approx(100.0)
        assert (tmp_path / f"{name}_coco_format.json").is_file()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_with_inference_on_dataset(tmp_path, registered):
    gt = _write_gt(
        tmp_path / "gt.json",
        [(3, 100, 100), (4, 100, 100)],
        [(3, 1, [10.0, 10.0, 30.0, 30.0]), (4, 9, [50.0, 20.0, 20.0, 60.0])],
    )
    name = registered(gt)
    answers = {3: ([[10.0, 10.0, 40.0, 40.0]], [0]), 4: ([[50.0, 20.0, 70.0, 80.0]], [2])}

    class Model(torch.nn.Module):
        def forward(self, inputs):
            return [
                _prediction(100, 100, *answers[x["image_id"]][:1], [0.5], answers[x["image_id"]][1])
                for x in inputs
            ]

    loader = [[{"image_id": 3}, {"image_id": 4}]]
    result = inference_on_dataset(Model(), loader, COCOEvaluator(name))
    assert result["bbox"]["AP"] == pytest.approx(100.0)


def test_user_errors(tmp_path, registered):
    with pytest.raises(KeyError, match="not registered"):
        COCOEvaluator("no_such_dataset_xyz")
    gt = _write_gt(tmp_path / "gt.json", [(1, 100, 100)], [(1, 1, [10.0, 10.0, 30.0, 30.0])])
    name = registered(gt)
    with pytest.raises(ValueError, match="segm"):
        COCOEvaluator(name, tasks=("bbox", "segm"))
    evaluator = COCOEvaluator(name)
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [_prediction(100, 100, [[0, 0, 5, 5]], [1.0], [7])])
    with pytest.raises(ValueError, match="predicted class 7"):
        evaluator.evaluate()
    assert COCOEvaluator([name])._dataset_name == name
    with pytest.raises(ValueError, match="one dataset"):
        COCOEvaluator([name, name])


def test_hand_written_ground_truth_without_area_and_an_empty_box(tmp_path, registered, caplog):
    # a hand-written file: no 'area' keys, and one box of zero width. It stays a ground-truth
    # object (as pycocotools counts it when area is given), with a warning naming the file.
    images = [(1, 100, 100), (2, 100, 100)]
    annotations = [(1, 1, [10.0, 10.0, 30.0, 30.0]), (2, 5, [50.0, 50.0, 0.0, 20.0])]
    gt = _write_gt(tmp_path / "gt.json", images, annotations)
    data = json.loads(gt.read_text())
    for ann in data["annotations"]:
        del ann["area"]
    gt.write_text(json.dumps(data))
    name = registered(gt)
    preds = [
        _prediction(100, 100, [[10, 10, 40, 40]], [0.9], [0]),
        _prediction(100, 100, [[50, 50, 51, 70]], [0.8], [1]),
    ]
    with caplog.at_level(logging.WARNING):
        result = _evaluate(name, images, preds)["bbox"]
    assert "gt.json: 1 ground-truth boxes have zero or negative width/height" in caplog.text
    # the oracle: pycocotools on the file with the areas w * h written in by hand (0 for the
    # empty box), and the same results in XYWH
    for ann in data["annotations"]:
        ann["area"] = max(ann["bbox"][2], 0) * max(ann["bbox"][3], 0)
    oracle_gt = tmp_path / "oracle.json"
    oracle_gt.write_text(json.dumps(data))
    raw = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 2, "category_id": 5, "bbox": [50, 50, 1, 20], "score": 0.8},
    ]
    stats = _pycocotools_stats(oracle_gt, raw)
    assert result["AP"] == pytest.approx(100 * stats[0], abs=1e-9)
    assert result["AP-ant"] == pytest.approx(100.0) and result["AP-bee"] == pytest.approx(0.0)


def test_ground_truth_box_that_is_not_4_numbers_names_file_and_annotation(tmp_path, registered):
    gt = _write_gt(tmp_path / "gt.json", [(1, 100, 100)], [(1, 1, [10.0, 10.0, 30.0, 30.0])])
    data = json.loads(gt.read_text())
    data["annotations"][0]["bbox"] = [10.0, 10.0, 30.0]
    gt.write_text(json.dumps(data))
    name = registered(gt)
    with pytest.raises(ValueError, match=r"gt\.json: annotation id 1 \(image_id 1\): bbox"):
        _evaluate(name, [(1, 100, 100)], [_prediction(100, 100, [[0, 0, 5, 5]], [1.0], [0])])


def test_images_that_never_reached_the_evaluator_are_reported(tmp_path, registered, caplog):
    images = [(1, 100, 100), (2, 100, 100), (3, 100, 100)]
    annotations = [(i, 1, [10.0, 10.0, 30.0, 30.0]) for i, _, _ in images]
    name = registered(_write_gt(tmp_path / "gt.json", images, annotations))
    perfect = _prediction(100, 100, [[10, 10, 40, 40]], [0.9], [0])
    with caplog.at_level(logging.WARNING):
        result = _evaluate(name, images[:1], [perfect])["bbox"]  # image 2 and 3 left out
    assert "2 of 3 images" in caplog.text and "Image ids: [2, 3]" in caplog.text
    # their objects are misses: recall 1/3 at every threshold, precision 1 up to it
    assert result["AP"] == pytest.approx(100 * 34 / 101, abs=1e-6)
