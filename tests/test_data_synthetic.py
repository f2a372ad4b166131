"""The generated shapes dataset: determinism, exact boxes, registration and safe generation."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.data import DatasetCatalog, MetadataCatalog, load_coco_json
from detrkit.data.synthetic import (
    SHAPE_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_shapes,
)

SMALL = {"image_size": ((48, 80), (48, 80)), "object_size": (8, 30)}


def _bytes(path):
    return Path(path).read_bytes()


def _load(path):
    return json.loads(Path(path).read_text())


def _files(root, split):
    return {p.name: p.read_bytes() for p in sorted((Path(root) / split).iterdir())}


def test_same_seed_same_bytes(tmp_path):
    seed = random.randint(0, 10**6)
    a = generate_shapes_dataset(tmp_path / "a", "train", 24, seed=seed, **SMALL)
    b = generate_shapes_dataset(tmp_path / "b", "train", 24, seed=seed, **SMALL)
    c = generate_shapes_dataset(tmp_path / "c", "train", 24, seed=seed + 1, **SMALL)
    assert _bytes(a) == _bytes(b)
    files_a, files_b = _files(tmp_path / "a", "train"), _files(tmp_path / "b", "train")
    assert len(files_a) == 24 and files_a == files_b
    assert _bytes(a) != _bytes(c)
    assert files_a != _files(tmp_path / "c", "train")
    # the split name is part of the seed: val is not a copy of train
    v = generate_shapes_dataset(tmp_path / "a", "val", 24, seed=seed, **SMALL)
    assert _load(v)["annotations"] != _load(a)["annotations"]


def test_boxes_are_tight_around_the_shape_pixels(tmp_path):
    # lossless PNG on flat backgrounds: the shape's pixels are exactly those of its colour
    path = generate_shapes_dataset(
        tmp_path, "val", 30, seed=random.randint(0, 10**6), backgrounds=("flat",),
        image_format="png", border_fraction=0.5, **SMALL,
    )  # fmt: skip
    data = _load(path)
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    checked = 0
    for img in data["images"]:
        pixels = np.asarray(Image.open(tmp_path / "val" / img["file_name"]))
        assert pixels.shape == (img["height"], img["width"], 3)
        for ann in by_image.get(img["id"], []):
            match = (pixels == np.asarray(ann["color"], dtype=np.uint8)).all(axis=2)
            rows, cols = np.flatnonzero(match.any(axis=1)), np.flatnonzero(match.any(axis=0))
            tight = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
            np.testing.assert_allclose(ann["bbox"], tight, atol=1)
            assert ann["area"] == int(match.sum())
            name = SHAPE_CLASSES[ann["category_id"] - 1]
            x, y, w, h = ann["bbox"]
            fill = ann["area"] / (w * h)
            inside = x > 0 and y > 0 and x + w < img["width"] and y + h < img["height"]
            if name == "square":
                assert fill == 1.0
            elif name == "triangle" and inside:
                assert 0.4 < fill < 0.7  # half the box, give or take the pixel grid
            checked += 1
    assert checked > 10


def test_dataset_properties(tmp_path):
    path = generate_shapes_dataset(tmp_path, "train", 80, seed=random.randint(0, 10**6), **SMALL)
    data = _load(path)
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    assert all(48 <= h <= 80 and 48 <= w <= 80 for h, w in sizes.values())
    counts = {i: 0 for i in sizes}
    touching = 0
    boxes_per_image = {}
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h and bw >= 4 and bh >= 4
        touching += x == 0 or y == 0 or x + bw == w or y + bh == h
        counts[ann["image_id"]] += 1
        boxes_per_image.setdefault(ann["image_id"], []).append((x, y, x + bw, y + bh))
    assert 0 in counts.values() and max(counts.values()) >= 3  # empty and crowded images
    assert touching > 0  # some objects are cut by the border
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4}
    for boxes in boxes_per_image.values():  # boxes do not overlap
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    # the json loads through the normal COCO path
    records = load_coco_json(path, tmp_path / "train")
    assert len(records) == 80 and os.path.isfile(records[0]["file_name"])


def test_register_shapes_generates_on_first_use(tmp_path, caplog):
    name = f"test_shapes_{uuid.uuid4().hex[:6]}"
    register_shapes(root=tmp_path, splits={name: ("tiny", 6)}, seed=1, **SMALL)
    try:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SHAPE_CLASSES)
        assert meta.evaluator_type == "coco"
        assert meta.json_file == str(tmp_path / "annotations" / "tiny.json")
        assert not os.path.exists(meta.json_file)  # nothing is generated until used
        records = DatasetCatalog.get(name)
        assert len(records) == 6 and os.path.isfile(meta.json_file)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
        stamp = os.stat(meta.json_file).st_mtime_ns
        DatasetCatalog.get(name)
        assert os.stat(meta.json_file).st_mtime_ns == stamp  # reused, not regenerated

        # different parameters for the same folder: regenerated, with a warning
        register_shapes(root=tmp_path, splits={name: ("tiny", 9)}, seed=1, **SMALL)
        with caplog.at_level(logging.WARNING, logger="detrkit"):
            assert len(DatasetCatalog.get(name)) == 9
        assert "different parameters" in caplog.text
        assert len(os.listdir(tmp_path / "tiny")) == 9
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_shapes_rejects_unknown_arguments(tmp_path):
    with pytest.raises(TypeError, match="max_object"):
        register_shapes(root=tmp_path, splits={"x_unused": ("x", 1)}, max_object=3)


def _worker(root, queue):
    queue.put(ensure_shapes_dataset(root, "race", 40, seed=5, **SMALL))


def test_concurrent_generation_is_safe(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / "annotations" / "race.json")}
    data = _load(paths.pop())
    assert len(data["images"]) == 40 and len(os.listdir(tmp_path / "race")) == 40
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    reference = generate_shapes_dataset(tmp_path / "ref", "race", 40, seed=5, **SMALL)
    assert _load(reference) == data
