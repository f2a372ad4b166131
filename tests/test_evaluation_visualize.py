"""COCOEvaluator(visualize_n=K): pictures of the first K images, predictions beside the ground
truth, written to output_dir/visualize/."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detrkit.config import LazyConfig, instantiate
from detrkit.data import (
    DatasetCatalog,
    MetadataCatalog,
    generate_shapes_dataset,
    read_image,
    register_coco_instances,
)
from detrkit.evaluation import COCOEvaluator
from detrkit.structures import Boxes, Instances
from detrkit.utils.visualizer import class_color
from tests.test_engine_defaults import SHAPES_TINY


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    json_file = generate_shapes_dataset(
        str(root), "val", 3, image_format="png", empty_fraction=0.0, seed=11
    )
    name = "visualize_test_val"
    DatasetCatalog.pop(name, None)
    MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, str(root / "val"))
    DatasetCatalog.get(name)  # fills in the class names and id map
    with open(json_file) as f:
        return name, json.load(f), root / "val"


def test_first_k_images_are_drawn_with_their_ground_truth(dataset, tmp_path):
    name, coco, image_root = dataset
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "out"), visualize_n=2)
    evaluator.reset()
    images = {im["id"]: im for im in coco["images"]}
    for image_id, image in images.items():
        annotations = [a for a in coco["annotations"] if a["image_id"] == image_id]
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        # predicted: the ground-truth boxes, contiguous class ids (shapes: id - 1)
        predicted = Instances(
            (image["height"], image["width"]),
            pred_boxes=Boxes(boxes),
            scores=torch.full((len(annotations),), 0.9),
            pred_classes=torch.tensor([a["category_id"] - 1 for a in annotations]),
        )
        file_name = str(image_root / image["file_name"])
        evaluator.process(
            [{"image_id": image_id, "file_name": file_name}], [{"instances": predicted}]
        )
    evaluator.evaluate()

    written = sorted((tmp_path / "out" / "visualize").iterdir())
    first_two = sorted(coco["images"], key=lambda im: im["id"])[:2]
    assert [p.stem for p in written] == [im["file_name"].rsplit(".", 1)[0] for im in first_two]
    image = first_two[0]
    picture = read_image(str(written[0]), "RGB").astype(int)
    original = read_image(str(image_root / image["file_name"]), "RGB")
    height, width = original.shape[:2]
    assert picture.shape[0] == height and picture.shape[1] > 2 * width
    # a box with room for its label above it (the label then covers none of its edges)
    annotation = next(
        a for a in coco["annotations"] if a["image_id"] == image["id"] and a["bbox"][1] > 20
    )
    x, y, _, h = (int(v) for v in annotation["bbox"])
    color = np.array(class_color(annotation["category_id"] - 1))
    left_edge = picture[y + h // 2, x]  # the predicted box, left panel
    np.testing.assert_array_equal(left_edge, color)
    right_panel = picture[:, width + 4 : 2 * width + 4]  # after the 4-px gap
    corner = right_panel[y + 1, x]  # the dashed ground-truth box's left edge starts with a dash
    np.testing.assert_array_equal(corner, color)


def test_visualize_n_from_the_config_and_bad_values(dataset):
    name, _, _ = dataset
    cfg = LazyConfig.load(str(SHAPES_TINY))
    cfg = LazyConfig.apply_overrides(
        cfg, [f"dataloader.test.dataset.names={name}", "dataloader.evaluator.visualize_n=3"]
    )
    assert instantiate(cfg.dataloader.evaluator)._visualize_n == 3
    with pytest.raises(ValueError, match=r"visualize_n must be an integer >= 0.*-1"):
        COCOEvaluator(name, visualize_n=-1)
