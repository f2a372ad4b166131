"""DatasetCatalog / MetadataCatalog / builtin registrations."""

from __future__ import annotations

import uuid

import pytest

from detrkit.data import (
    DatasetCatalog,
    Metadata,
    MetadataCatalog,
    register_all_coco,
    register_coco_instances,
)
from detrkit.data.builtin_meta import COCO_CATEGORY_IDS, COCO_THING_CLASSES


@pytest.fixture
def name():
    n = f"test_catalog_{uuid.uuid4().hex[:8]}"
    yield n
    DatasetCatalog.pop(n, None)
    MetadataCatalog.remove(n)


def test_register_get_list_remove(name):
    records = [{"file_name": "a.jpg", "image_id": 1, "height": 2, "width": 3}]
    DatasetCatalog.register(name, lambda: records)
    assert name in DatasetCatalog.list()
    assert DatasetCatalog.get(name) == records
    with pytest.raises(KeyError, match="already registered"):
        DatasetCatalog.register(name, lambda: records)
    DatasetCatalog.remove(name)
    assert name not in DatasetCatalog.list()


def test_unknown_dataset_lists_registered_names():
    with pytest.raises(KeyError) as info:
        DatasetCatalog.get("coco_2017_vall")
    message = str(info.value)
    assert "coco_2017_vall" in message
    assert "coco_2017_val" in message and "shapes_train" in message
    assert "Did you mean 'coco_2017_val'" in message


def test_registered_function_must_return_a_list(name):
    DatasetCatalog.register(name, lambda: {"not": "a list"})
    with pytest.raises(TypeError, match=name):
        DatasetCatalog.get(name)
    with pytest.raises(TypeError):
        DatasetCatalog.register(name + "x", "not callable")


def test_metadata_attribute_access_and_conflicts(name):
    meta = MetadataCatalog.get(name)
    assert MetadataCatalog.get(name) is meta
    meta.set(thing_classes=["a", "b"], evaluator_type="coco")
    assert meta.thing_classes == ["a", "b"]
    assert meta.get("missing", 5) == 5
    assert meta.as_dict() == {"name": name, "thing_classes": ["a", "b"], "evaluator_type": "coco"}
    meta.thing_classes = ["a", "b"]  # the same value again is fine
    with pytest.raises(ValueError, match="thing_classes"):
        meta.thing_classes = ["x"]
    with pytest.raises(AttributeError, match="json_file") as info:
        _ = meta.json_file
    assert "thing_classes" in str(info.value)  # lists what is set
    MetadataCatalog.remove(name)
    assert "thing_classes" not in MetadataCatalog.get(name)
    assert Metadata(name="x", a=1).a == 1


def test_register_coco_instances_sets_metadata(name, tmp_path):
    register_coco_instances(name, {"thing_classes": ["q"]}, tmp_path / "x.json", tmp_path)
    meta = MetadataCatalog.get(name)
    assert meta.json_file == str(tmp_path / "x.json")
    assert meta.image_root == str(tmp_path)
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == ["q"]
    with pytest.raises(FileNotFoundError, match=r"x\.json"):
        DatasetCatalog.get(name)


def test_builtin_coco_metadata_and_missing_files(tmp_path, monkeypatch):
    meta = MetadataCatalog.get("coco_2017_val")
    assert len(meta.thing_classes) == 80 and meta.thing_classes[0] == "person"
    id_map = meta.thing_dataset_id_to_contiguous_id
    assert sorted(id_map) == COCO_CATEGORY_IDS and sorted(id_map.values()) == list(range(80))
    assert id_map[90] == 79 and id_map[13] == 11
    assert len(COCO_THING_CLASSES) == 80
    try:
        monkeypatch.setenv("DETRKIT_DATASETS", str(tmp_path))
        register_all_coco()
        meta = MetadataCatalog.get("coco_2017_train")
        assert meta.json_file == str(tmp_path / "coco/annotations/instances_train2017.json")
        assert meta.image_root == str(tmp_path / "coco/train2017")
        with pytest.raises(FileNotFoundError) as info:
            DatasetCatalog.get("coco_2017_train")
        message = str(info.value)
        assert "instances_train2017.json" in message and "DETRKIT_DATASETS" in message
        assert str(tmp_path) in message
    finally:
        monkeypatch.delenv("DETRKIT_DATASETS")
        register_all_coco()


def test_register_coco_instances_again_with_the_same_files_is_a_no_op(tmp_path):
    name = f"twice_{tmp_path.name}"
    json_file, image_root = str(tmp_path / "a.json"), str(tmp_path / "images")
    try:
        register_coco_instances(name, {}, json_file, image_root)
        loader = DatasetCatalog[name]
        register_coco_instances(name, {}, json_file, image_root)  # a config loaded twice
        assert DatasetCatalog[name] is loader
        with pytest.raises(KeyError, match="already registered"):
            register_coco_instances(name, {}, str(tmp_path / "other.json"), image_root)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
