"""Two real processes (gloo on CPU): sharded inference + gathered COCO AP equals one process."""

from __future__ import annotations

import json
import multiprocessing as mp
import traceback
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist

from detrkit.data import (
    DatasetCatalog,
    InferenceSampler,
    MetadataCatalog,
    TrainingSampler,
    register_coco_instances,
)
from detrkit.evaluation import COCOEvaluator, inference_on_dataset
from detrkit.structures import Boxes, Instances


def _scene(seed):
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, 12):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": 200, "width": 300})
        boxes, scores, labels = [], [], []
        for _ in range(int(rng.integers(1, 4))):
            x, y = float(rng.integers(0, 200)), float(rng.integers(0, 120))
            w, h = float(rng.integers(10, 90)), float(rng.integers(10, 70))
            cat = int(rng.integers(0, 2))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": [3, 8][cat], "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})  # fmt: skip
            dx, dy = rng.uniform(-8, 8, 2)
            boxes.append([x + dx, y + dy, x + dx + w, y + dy + h])
            scores.append(float(rng.uniform(0.1, 1)))
            labels.append(cat if rng.random() > 0.2 else 1 - cat)
        predictions[image_id] = (boxes, scores, labels)
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 3, "name": "c3"}, {"id": 8, "name": "c8"}]}  # fmt: skip
    return gt, predictions


class _Model(torch.nn.Module):
    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            boxes, scores, labels = self.predictions[x["image_id"]]
            inst = Instances((200, 300))
            inst.pred_boxes = Boxes(torch.tensor(boxes))
            inst.scores = torch.tensor(scores)
            inst.pred_classes = torch.tensor(labels)
            outputs.append({"instances": inst})
        return outputs


def _run(rank, world_size, init_file, json_file, seed, queue):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size)  # fmt: skip
        name = f"dist_{uuid.uuid4().hex[:6]}"
        register_coco_instances(name, {}, json_file, "/nonexistent")
        _, predictions = _scene(seed)
        ids = list(range(1, 12))
        loader = [[{"image_id": ids[i]}] for i in InferenceSampler(len(ids))]
        results = inference_on_dataset(_Model(predictions), loader, COCOEvaluator(name))
        stream = [next(it) for it in [iter(TrainingSampler(11))] for _ in range(11)]
        queue.put((rank, results, stream))
        dist.destroy_process_group()
    except Exception:
        queue.put((rank, traceback.format_exc(), None))


def test_two_processes_give_the_single_process_ap(tmp_path):
    seed = int(np.random.default_rng().integers(10**6))
    gt, predictions = _scene(seed)
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))

    name = f"single_{uuid.uuid4().hex[:6]}"
    register_coco_instances(name, {}, str(json_file), "/nonexistent")
    try:
        loader = [[{"image_id": i}] for i in range(1, 12)]
        single = inference_on_dataset(_Model(predictions), loader, COCOEvaluator(name))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    args = (2, str(tmp_path / "init"), str(json_file), seed, queue)
    procs = [ctx.Process(target=_run, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        outcome = {r: (res, stream) for r, res, stream in (queue.get(timeout=120) for _ in procs)}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
    for rank in (0, 1):
        if isinstance(outcome[rank][0], str):
            pytest.fail(f"rank {rank} failed:\n{outcome[rank][0]}")
    assert outcome[1][0] == {}  # only the main process reports
    merged = outcome[0][0]["bbox"]
    assert 0 < single["bbox"]["AP"] < 100
    for key, value in single["bbox"].items():
        assert merged[key] == pytest.approx(value, nan_ok=True)
    # the training sampler: both ranks draw disjoint halves of the same shared permutation
    first, second = outcome[0][1], outcome[1][1]
    # (rank 0 takes positions 0, 2, .., 10 of the first epoch and rank 1 positions 1, 3, .., 9)
    assert set(first[:6]).isdisjoint(second[:5])
    assert sorted(first[:6] + second[:5]) == list(range(11))
