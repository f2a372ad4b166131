"""Visualizer: boxes where the detections are, stable class colours, labels inside the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detrkit.data import Metadata
from detrkit.structures import Boxes, BoxMode, Instances
from detrkit.utils.visualizer import (
    Visualizer,
    class_color,
    font_size_for,
    tile_panels,
)


def _instances(boxes, scores, classes, size=(200, 300)) -> Instances:
    return Instances(
        size,
        pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
        scores=torch.tensor(scores),
        pred_classes=torch.tensor(classes),
    )


def test_boxes_are_drawn_in_the_class_colour_at_their_place():
    image = np.full((200, 300, 3), 40, np.uint8)
    meta = Metadata(thing_classes=["cat", "dog", "bird"])
    instances = _instances([[50, 80, 150, 180], [200, 20, 280, 90]], [0.9, 0.3], [2, 0])
    out = Visualizer(image, meta).draw_instance_predictions(instances, 0.5).get_image()
    assert out.shape == image.shape
    # the left edge of the kept box is in class 2's colour; the dropped box is not drawn
    np.testing.assert_array_equal(out[130, 50], class_color(2))
    np.testing.assert_array_equal(out[60, 200], image[60, 200])
    # far from the box nothing changed
    np.testing.assert_array_equal(out[190, 290], image[190, 290])
    assert class_color(2) == class_color(2 + 20) and class_color(0) != class_color(1)


def test_label_stays_inside_the_image_for_a_box_at_the_corner():
    image = np.zeros((100, 120, 3), np.uint8)
    vis = Visualizer(image, Metadata(thing_classes=["a very long class name"]))
    vis.draw_instance_predictions(_instances([[100, 0, 120, 20]], [0.99], [0], (100, 120)))
    out = vis.get_output().get_image()
    color = np.array(class_color(0))
    filled = np.all(out == color, axis=-1)
    ys, xs = np.nonzero(filled)
    # the label's filled background is inside the image and wider than the box
    assert xs.min() < 100 and xs.max() <= 119 and ys.min() >= 0
    assert filled.sum() > 20 * 20


def test_font_grows_with_the_image():
    assert font_size_for(100, 100) == 10
    assert font_size_for(800, 1200) > 2 * font_size_for(200, 300)


def test_ground_truth_from_a_dataset_record():
    image = np.zeros((64, 64, 3), np.uint8)
    record = {
        "annotations": [{"bbox": [10, 12, 20, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]
    }
    out = Visualizer(image).draw_dataset_dict(record).get_image()
    # the dashed right edge x = 30 starts with a dash at its top (y = 12 .. 12 + dash)
    assert np.all(out[14, 30] == class_color(1))
    assert out.sum() > 0


def test_bad_inputs_name_what_is_accepted():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
        Visualizer(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="scale must be > 0"):
        Visualizer(np.zeros((10, 10, 3), np.uint8), scale=0)
    with pytest.raises(ValueError, match="no panels"):
        tile_panels([])


def test_tile_panels_with_colorbar():
    panels = [np.zeros((50, 60, 3), np.uint8) for _ in range(3)]
    grid = tile_panels(panels, columns=2, colorbar_vmax=0.5, gap=4)
    assert grid.shape[1] > 2 * 60 + 4 and grid.shape[0] >= 2 * 50 + 4
    np.testing.assert_array_equal(grid[:50, :60], 0)
