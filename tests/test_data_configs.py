"""The bundled data configs load, interpolate and build working loaders and evaluators."""

from __future__ import annotations

import pytest
import torch

from detrkit.config import LazyConfig, get_config, instantiate
from detrkit.data import DetrDatasetMapper, register_shapes
from detrkit.data import transforms as T
from detrkit.evaluation import COCOEvaluator
from detrkit.structures import Instances


@pytest.fixture
def tiny_shapes(tmp_path):
    register_shapes(
        root=tmp_path, splits={"shapes_train": ("train", 8), "shapes_val": ("val", 3)}, seed=3
    )
    yield tmp_path
    register_shapes()  # back to the builtin registration


def test_coco_detr_config_matches_the_recipe():
    """DETR's augmentation recipe, checked in this one place: the config's lists (what training
    uses) by value, and `transforms.detr_train_augmentation()` / `detr_test_augmentation()`, the
    same recipe for Python callers, as building identical lists."""
    cfg = get_config("common/data/coco_detr.py")
    train, test = cfg.dataloader.train, cfg.dataloader.test
    assert train.dataset.names == "coco_2017_train" and train.total_batch_size == 16
    assert test.dataset.names == "coco_2017_val" and test.dataset.filter_empty is False
    assert cfg.dataloader.evaluator.dataset_name == "coco_2017_val"  # interpolated
    mapper = instantiate(train.mapper)
    assert isinstance(mapper, DetrDatasetMapper)
    multi_scale = tuple(range(480, 801, 32))  # 480, 512, ..., 800
    plain = mapper.augmentation.augmentations
    assert [type(a) for a in plain] == [T.RandomFlip, T.ResizeShortestEdge]
    assert (plain[0].prob, plain[0].horizontal, plain[0].vertical) == (0.5, True, False)
    assert plain[1].short_edge_length == multi_scale and plain[1].max_size == 1333
    assert plain[1].sample_style == "choice"
    crop = mapper.augmentation_with_crop.augmentations
    assert [type(a) for a in crop] == [
        T.RandomFlip, T.ResizeShortestEdge, T.RandomCrop, T.ResizeShortestEdge,
    ]  # fmt: skip
    assert (crop[0].prob, crop[0].horizontal, crop[0].vertical) == (0.5, True, False)
    assert crop[1].short_edge_length == (400, 500, 600) and crop[1].sample_style == "choice"
    assert crop[2].crop_type == "absolute_range" and crop[2].crop_size == (384, 600)
    assert crop[3].short_edge_length == multi_scale and crop[3].max_size == 1333
    assert crop[3].sample_style == "choice"
    test_mapper = instantiate(test.mapper)
    (resize,) = test_mapper.augmentation.augmentations
    assert resize.short_edge_length == (800, 800) and resize.max_size == 1333

    built_plain, built_crop = T.detr_train_augmentation()
    assert repr(built_plain) == repr(list(plain))
    assert repr(built_crop) == repr(list(crop))
    assert repr(T.detr_test_augmentation()) == repr([resize])


def test_shapes_config_builds_loaders_and_evaluator(tiny_shapes, tmp_path):
    cfg = get_config("common/data/shapes.py")
    cfg.dataloader.evaluator.output_dir = str(tmp_path / "eval")
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))  # no lambdas: it saves as YAML
    train_loader = instantiate(cfg.dataloader.train)
    batch = next(iter(train_loader))
    assert len(batch) == 4
    for sample in batch:
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3
        assert isinstance(sample["instances"], Instances) and len(sample["instances"]) > 0
        assert min(sample["image"].shape[1:]) <= 192

    test_loader = instantiate(cfg.dataloader.test)
    images = [x for b in test_loader for x in b]
    assert len(images) == 3 and all(min(x["image"].shape[1:]) == 160 for x in images)
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator._dataset_name == "shapes_val"


def test_project_configs_have_exactly_the_documented_top_level_keys():
    # docs/architecture.md: model, dataloader, optimizer, lr_multiplier, train; a loop variable
    # or helper left at module level would become a stray sixth key of config.yaml
    from pathlib import Path

    config_dir = Path(__file__).resolve().parents[1] / "projects" / "deformable_detr" / "configs"
    configs = sorted(config_dir.glob("*.py"))
    assert len(configs) == 6
    for path in configs:
        keys = set(LazyConfig.load(str(path)).keys())
        assert keys == {"model", "dataloader", "optimizer", "lr_multiplier", "train"}, path.name
