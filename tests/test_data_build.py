"""Samplers, datasets and loaders: sharding, determinism, batching, worker seeds."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from detrkit.data import (
    AspectRatioGroupedDataset,
    DatasetFromList,
    InferenceSampler,
    MapDataset,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detrkit.data import build as build_module


def _as_rank(monkeypatch, rank, world_size):
    monkeypatch.setattr(build_module, "get_rank", lambda: rank)
    monkeypatch.setattr(build_module, "get_world_size", lambda: world_size)


@pytest.mark.parametrize("trial", range(5))
def test_inference_shards_cover_the_dataset_exactly_once(monkeypatch, trial):
    size, world = random.randint(0, 50), random.randint(1, 8)
    shards = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        sampler = InferenceSampler(size)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert list(itertools.chain(*shards)) == list(range(size))  # contiguous, in order, once each
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1


def test_training_sampler_ranks_are_disjoint_slices_of_one_stream(monkeypatch):
    size, world, seed = random.randint(5, 40), random.randint(2, 4), random.randint(0, 10**6)
    per_rank = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        per_rank.append(list(itertools.islice(iter(TrainingSampler(size, seed=seed)), 3 * size)))
    _as_rank(monkeypatch, 0, 1)
    stream = list(itertools.islice(iter(TrainingSampler(size, seed=seed)), 3 * size * world))
    for rank in range(world):
        assert per_rank[rank] == stream[rank::world]
    # every epoch of the shared stream is a permutation, split between the ranks without overlap
    for epoch in range(3 * world):
        assert sorted(stream[epoch * size : (epoch + 1) * size]) == list(range(size))
    first_epoch = [set(stream[r:size:world]) for r in range(world)]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(first_epoch, 2))


def test_training_sampler_is_deterministic_per_seed():
    def take(seed, n=50):
        return list(itertools.islice(iter(TrainingSampler(20, seed=seed)), n))

    seed = random.randint(0, 10**6)
    assert take(seed) == take(seed)
    assert take(seed) != take(seed + 1)
    assert list(itertools.islice(iter(TrainingSampler(5, shuffle=False, seed=0)), 7)) == [
        0, 1, 2, 3, 4, 0, 1,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="positive"):
        TrainingSampler(0, seed=0)


def test_dataset_from_list_roundtrip_and_copies():
    records = [{"a": i, "nested": {"v": [i] * i}, "b": np.arange(i)} for i in range(6)]
    for serialize in (True, False):
        ds = DatasetFromList(records, copy=True, serialize=serialize)
        assert len(ds) == 6
        for i in range(6):
            item = ds[i]
            assert item["a"] == i and item["nested"] == {"v": [i] * i}
            np.testing.assert_array_equal(item["b"], np.arange(i))
            item["nested"]["v"].append(99)  # must not leak into the dataset
            assert ds[i]["nested"]["v"] == [i] * i


def test_map_dataset_retries_and_gives_up():
    calls = []

    def mapper(record):
        calls.append(record["i"])
        return None if record["i"] % 2 else record

    ds = MapDataset(DatasetFromList([{"i": i, "file_name": f"f{i}"} for i in range(10)]), mapper)
    for idx in range(10):
        assert ds[idx]["i"] % 2 == 0
    assert MapDataset(DatasetFromList([{"i": 1}]), mapper, retry=False)[0] is None
    broken = MapDataset(DatasetFromList([{"i": 1, "file_name": "x.jpg"}] * 3), mapper)
    with pytest.raises(RuntimeError, match=r"x\.jpg"):
        broken[0]


def _sized_records(shapes):
    return [{"image_id": i, "height": h, "width": w} for i, (h, w) in enumerate(shapes)]


def _image_mapper(record):
    return {
        "image_id": record["image_id"],
        "image": torch.zeros(3, record["height"], record["width"], dtype=torch.uint8),
        "height": record["height"],
        "width": record["width"],
    }


def test_train_loader_batches_and_aspect_ratio_groups():
    shapes = [(random.randint(10, 30), random.randint(10, 30)) for _ in range(30)]
    loader = build_detection_train_loader(
        _sized_records(shapes), mapper=_image_mapper, total_batch_size=4, seed=3
    )
    for batch, _ in zip(loader, range(20)):
        assert isinstance(batch, list) and len(batch) == 4
        landscape = {x["image"].shape[2] > x["image"].shape[1] for x in batch}
        assert len(landscape) == 1

    plain = build_detection_train_loader(
        _sized_records(shapes), mapper=_image_mapper, total_batch_size=3,
        aspect_ratio_grouping=False, seed=3,
    )  # fmt: skip
    ids = [x["image_id"] for batch, _ in zip(plain, range(10)) for x in batch]
    assert sorted(ids) == list(range(30))  # one epoch of the permutation


def test_train_batch_must_divide_by_world_size(monkeypatch):
    monkeypatch.setattr(build_module, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"total_batch_size=4.*3"):
        build_detection_train_loader(_sized_records([(4, 4)]), mapper=None, total_batch_size=4)
    loader = build_detection_train_loader(
        _sized_records([(4, 4)] * 5), mapper=_image_mapper, total_batch_size=6,
        aspect_ratio_grouping=False, sampler=TrainingSampler(5, seed=0),
    )  # fmt: skip
    assert len(next(iter(loader))) == 2  # per-process batch = 6 / 3


def test_aspect_ratio_grouping_uses_augmented_size():
    samples = [{"image": torch.zeros(3, 10, 20)}, {"image": torch.zeros(3, 20, 10)},
               {"image": torch.zeros(3, 30, 31)}, {"image": torch.zeros(3, 30, 30)}]  # fmt: skip
    batches = list(AspectRatioGroupedDataset(samples, 2))
    assert [[tuple(x["image"].shape[1:]) for x in b] for b in batches] == [
        [(10, 20), (30, 31)],  # landscape (w > h) bucket, full after the third sample
        [(20, 10), (30, 30)],  # portrait and square
    ]


def test_test_loader_batch_size_and_order():
    records = _sized_records([(5, 6)] * 7)
    loader = build_detection_test_loader(records, mapper=_image_mapper, batch_size=3)
    assert [[x["image_id"] for x in b] for b in loader] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        build_detection_test_loader(records, mapper=_image_mapper, batch_size=0)


def _random_draw(record):
    return {
        "image_id": record["image_id"],
        "draw": float(np.random.rand()),
        "torch": float(torch.rand(1)),
    }


def test_workers_have_distinct_seeds():
    loader = build_detection_train_loader(
        _sized_records([(4, 4)] * 8), mapper=_random_draw, total_batch_size=1,
        aspect_ratio_grouping=False, num_workers=2, seed=0,
    )  # fmt: skip
    draws = [b[0] for b, _ in zip(loader, range(8))]
    # both workers produce samples, and their numpy draws are not copies of each other
    assert len({round(d["draw"], 12) for d in draws}) == 8
    assert len({round(d["torch"], 12) for d in draws}) == 8


def test_dataset_given_as_a_name_is_a_clear_error():
    with pytest.raises(TypeError, match="get_detection_dataset_dicts"):
        build_detection_test_loader("coco_2017_val", mapper=None)


def test_category_id_outside_the_thing_classes_is_named_at_load():
    from detrkit.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

    name = "test_build_bad_category_id"
    records = [
        {"file_name": "a.jpg", "image_id": 1, "annotations": [{"category_id": 1}]},
        {
            "file_name": "b.jpg",
            "image_id": 2,
            "annotations": [{"category_id": 0}, {"category_id": 3}],
        },
    ]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["x", "y", "z"])
    try:
        with pytest.raises(ValueError) as info:
            get_detection_dataset_dicts(name)
        message = str(info.value)
        assert "b.jpg (image_id 2)" in message and "category_id=3" in message
        assert "accepted: 0..2" in message and "3 thing_classes" in message
        records[1]["annotations"][1]["category_id"] = 2
        assert len(get_detection_dataset_dicts(name)) == 2
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
