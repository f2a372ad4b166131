"""load_coco_json: records, category remapping and the bad-data policy."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from detrkit.data import (
    DatasetCatalog,
    MetadataCatalog,
    convert_to_coco_dict,
    get_detection_dataset_dicts,
    load_coco_json,
)
from detrkit.structures import BoxMode


def _coco(annotations, images=None, categories=None):
    return {
        "images": images
        or [
            {"id": 10, "file_name": "a.jpg", "height": 100, "width": 200},
            {"id": 20, "file_name": "sub/b.jpg", "height": 50, "width": 60},
            {"id": 30, "file_name": "c.jpg", "height": 70, "width": 80},
        ],
        "annotations": annotations,
        "categories": categories
        or [{"id": 9, "name": "nine"}, {"id": 1, "name": "one"}, {"id": 5, "name": "five"}],
    }


def _ann(ann_id, image_id, category_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@pytest.fixture
def name():
    n = f"test_coco_{uuid.uuid4().hex[:8]}"
    yield n
    DatasetCatalog.pop(n, None)
    MetadataCatalog.remove(n)


def test_records_and_contiguous_ids(tmp_path, name):
    data = _coco(
        [
            _ann(1, 10, 9, [1, 2, 3, 4], iscrowd=0, area=12, score=0.5),
            _ann(2, 10, 1, [5.5, 6, 7, 8], iscrowd=1),
            _ann(3, 20, 5, [0, 0, 60, 50]),
        ]
    )
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    records = load_coco_json(path, tmp_path / "imgs", name, extra_annotation_keys=["score"])
    assert [r["image_id"] for r in records] == [10, 20, 30]
    assert records[0]["file_name"] == str(tmp_path / "imgs" / "a.jpg")
    assert records[1]["file_name"] == str(tmp_path / "imgs" / "sub" / "b.jpg")
    assert (records[0]["height"], records[0]["width"]) == (100, 200)
    # categories sorted by original id: 1 -> 0, 5 -> 1, 9 -> 2
    assert records[0]["annotations"] == [
        {"bbox": [1.0, 2.0, 3.0, 4.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2,
         "iscrowd": 0, "score": 0.5},
        {"bbox": [5.5, 6.0, 7.0, 8.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
         "iscrowd": 1},
    ]  # fmt: skip
    assert records[1]["annotations"][0]["category_id"] == 1
    assert records[2]["annotations"] == []  # an image without annotations is a valid record
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["one", "five", "nine"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 5: 1, 9: 2}

    # and back: convert_to_coco_dict restores the original ids
    DatasetCatalog.register(name, lambda: records)
    back = convert_to_coco_dict(name)
    assert [c["id"] for c in back["categories"]] == [1, 5, 9]
    assert sorted(a["category_id"] for a in back["annotations"]) == [1, 5, 9]
    assert [a["bbox"] for a in back["annotations"] if a["category_id"] == 9] == [[1, 2, 3, 4]]


def test_truncated_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    text = json.dumps(_coco([_ann(1, 10, 9, [1, 2, 3, 4])]), indent=1)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError) as info:
        load_coco_json(path, tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "line" in message and "column" in message and "truncated" in message


def test_not_a_coco_json(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json.*JSON object"):
        load_coco_json(path, tmp_path)
    path.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(ValueError, match=r"list\.json.*'images'"):
        load_coco_json(path, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_coco_json(tmp_path / "nope.json", tmp_path)


def test_unknown_category_names_annotation_image_and_known_ids(tmp_path):
    path = tmp_path / "cats.json"
    path.write_text(
        json.dumps(_coco([_ann(1, 10, 9, [1, 2, 3, 4]), _ann(77, 20, 4, [1, 1, 2, 2])]))
    )
    with pytest.raises(ValueError) as info:
        load_coco_json(path, tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "annotation id 77" in message and "image_id 20" in message
    assert "category_id 4" in message and "[1, 5, 9]" in message


def test_bad_boxes_dropped_with_one_summarised_warning(tmp_path, caplog):
    bad_boxes = [[1, 2, 0, 5], [1, 2, 5, 0], [1, 2, -3, 4], [1, 2, "nan", 4], [0, 0, 4]]
    anns = [_ann(100 + i, 10, 1, box) for i, box in enumerate(bad_boxes)]
    anns += [_ann(200 + i, 20, 5, [0, 0, 0, 0]) for i in range(7)]
    anns.append(_ann(1, 10, 9, [1, 2, 3, 4]))
    data = _coco(anns)
    data["annotations"][3]["bbox"] = [1, 2, float("nan"), 4]  # json.dumps writes NaN
    data["annotations"].append(_ann(300, 30, 1, [1, 1, float("inf"), 2]))
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        records = load_coco_json(path, tmp_path)
    assert [len(r["annotations"]) for r in records] == [1, 0, 0]
    assert records[0]["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary, not one line per box
    message = warnings[0].getMessage()
    assert str(path) in message and "dropped 13 annotations" in message
    assert "annotation id 100 (image_id 10)" in message and "zero or negative" in message
    assert "and 8 more" in message


def test_get_detection_dataset_dicts_filters_empty(tmp_path, name, caplog):
    path = tmp_path / "d.json"
    anns = [_ann(1, 10, 9, [1, 2, 3, 4]), _ann(2, 20, 1, [1, 1, 5, 5], iscrowd=1)]
    path.write_text(json.dumps(_coco(anns)))
    DatasetCatalog.register(name, lambda: load_coco_json(path, tmp_path, name))
    assert len(get_detection_dataset_dicts(name, filter_empty=False)) == 3
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        kept = get_detection_dataset_dicts([name], filter_empty=True)
    # image 20 has only a crowd box and image 30 nothing: both dropped for training
    assert [r["image_id"] for r in kept] == [10]
    assert "Removed 2 of 3 images" in caplog.text

    only_empty = tmp_path / "e.json"
    only_empty.write_text(json.dumps(_coco([])))
    other = name + "_empty"
    DatasetCatalog.register(other, lambda: load_coco_json(only_empty, tmp_path))
    try:
        with pytest.raises(ValueError, match="nothing to train on"):
            get_detection_dataset_dicts(other)
    finally:
        DatasetCatalog.remove(other)
