"""Augmentations: output sizes, image content and box coordinates against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detrkit.data import transforms as T


def _random_image(h, w, rng=None):
    rng = rng or np.random.default_rng()
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "hw, short, max_size, expected",
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67 -> 1067
        ((640, 480), 800, 1333, (1067, 800)),
        ((500, 2000), 800, 1333, (333, 1333)),  # long side capped: 800 * 1333 / 3200 = 333.25
        ((427, 640), 800, 1333, (800, 1199)),  # 640 * 800 / 427 = 1199.06
        ((100, 100), 50, 1333, (50, 50)),
        ((375, 500), 480, 1333, (480, 640)),
        ((333, 1000), 600, 1000, (333, 1000)),  # 600 short would make 1801 > 1000: scale to 1000
        ((181, 170), 128, 320, (136, 128)),  # 181 * 128 / 170 = 136.28
    ],
)
def test_resize_shortest_edge_sizes(hw, short, max_size, expected):
    assert T.ResizeShortestEdge.get_output_shape(*hw, short, max_size) == expected
    aug = T.ResizeShortestEdge(short, max_size)
    image = _random_image(*hw)
    out, _ = T.apply_augmentations([aug], image)
    assert out.shape == (*expected, 3)
    assert out.dtype == np.uint8


def test_resize_uses_pil_bilinear_and_scales_boxes():
    image = _random_image(100, 200)
    tfm = T.ResizeTransform(100, 200, 50, 400)
    expected = np.asarray(Image.fromarray(image).resize((400, 50), Image.BILINEAR))
    np.testing.assert_array_equal(tfm.apply_image(image), expected)
    # x scales by 400/200 = 2, y by 50/100 = 0.5
    box = tfm.apply_box(np.array([[10.0, 20.0, 30.0, 40.0]]))
    np.testing.assert_allclose(box, [[20.0, 10.0, 60.0, 20.0]])
    # grayscale HxWx1 keeps its channel axis
    assert tfm.apply_image(image[:, :, :1]).shape == (50, 400, 1)


def test_resize_choice_and_range_draw_from_the_allowed_values():
    image = _random_image(60, 80)
    sizes = set()
    aug = T.ResizeShortestEdge((30, 45, 90), sample_style="choice")
    for _ in range(60):
        sizes.add(aug.get_transform(image).new_h)
    assert sizes == {30, 45, 90}
    aug = T.ResizeShortestEdge((20, 25), sample_style="range")
    drawn = {aug.get_transform(image).new_h for _ in range(200)}
    assert drawn == set(range(20, 26))
    with pytest.raises(ValueError, match="sample_style"):
        T.ResizeShortestEdge(10, sample_style="random")


def test_flip_image_and_boxes():
    image = _random_image(30, 100)
    tfm = T.RandomFlip(prob=1.0).get_transform(image)
    np.testing.assert_array_equal(tfm.apply_image(image), image[:, ::-1])
    # x' = W - x: [10, 20, 30, 40] in a 100-wide image -> [70, 20, 90, 40]
    np.testing.assert_allclose(
        tfm.apply_box(np.array([[10.0, 20.0, 30.0, 40.0]])), [[70, 20, 90, 40]]
    )
    assert isinstance(T.RandomFlip(prob=0.0).get_transform(image), T.NoOpTransform)
    vflip = T.RandomFlip(prob=1.0, horizontal=False, vertical=True).get_transform(image)
    np.testing.assert_array_equal(vflip.apply_image(image), image[::-1])


def test_crop_boxes_are_shifted_clipped_and_degenerate_ones_dropped():
    image = _random_image(100, 120)
    crop = T.CropTransform(10, 5, 50, 40)  # x0, y0, w, h
    np.testing.assert_array_equal(crop.apply_image(image), image[5:45, 10:60])
    boxes = np.array(
        [
            [0.0, 0.0, 30.0, 30.0],  # -> [-10, -5, 20, 25] -> clipped [0, 0, 20, 25]
            [20.0, 10.0, 40.0, 30.0],  # inside -> [10, 5, 30, 25]
            [70.0, 70.0, 90.0, 90.0],  # outside the crop -> dropped
            [55.0, 20.0, 80.0, 30.0],  # partly right of the crop -> [45, 15, 50, 25]
            [60.0, 10.0, 70.0, 20.0],  # touches the crop edge only -> zero width, dropped
        ]
    )
    out, keep = T.apply_transform_to_boxes(boxes, crop, (40, 50))
    np.testing.assert_allclose(out[keep], [[0, 0, 20, 25], [10, 5, 30, 25], [45, 15, 50, 25]])
    assert keep.tolist() == [True, True, False, True, False]


def test_random_crop_absolute_range_sizes():
    rng = np.random.default_rng()
    aug = T.RandomCrop("absolute_range", (384, 600))
    for _ in range(50):
        h, w = int(rng.integers(300, 900)), int(rng.integers(300, 900))
        tfm = aug.get_transform(np.zeros((h, w, 3), dtype=np.uint8))
        assert min(h, 384) <= tfm.h <= min(h, 600) and min(w, 384) <= tfm.w <= min(w, 600)
        assert 0 <= tfm.x0 <= w - tfm.w and 0 <= tfm.y0 <= h - tfm.h
    with pytest.raises(ValueError, match="crop_type"):
        T.RandomCrop("absolute_rang", (1, 2))


def test_resize_crop_resize_chain_box_by_hand():
    # the DETR crop branch with fixed draws: 200x300 -> resize short 100 -> (100, 150);
    # crop x0=30, y0=20, 80x60 (w x h); resize short 120 -> (120, 160)
    image = _random_image(200, 300)
    chain = T.TransformList(
        [
            T.ResizeTransform(200, 300, 100, 150),
            T.CropTransform(30, 20, 80, 60),
            T.ResizeTransform(60, 80, 120, 160),
        ]
    )
    assert chain.apply_image(image).shape == (120, 160, 3)
    # box [100, 60, 160, 120]: *0.5 -> [50, 30, 80, 60]; -crop -> [20, 10, 50, 40];
    # *2 -> [40, 20, 100, 80]
    out, keep = T.apply_transform_to_boxes(np.array([[100.0, 60, 160, 120]]), chain, (120, 160))
    np.testing.assert_allclose(out, [[40, 20, 100, 80]])
    assert keep.all()


def test_random_select_uses_both_branches_and_aug_input_tracks_boxes():
    image = _random_image(40, 60)
    select = T.RandomSelect(T.RandomFlip(prob=1.0), [T.ResizeShortestEdge(20)], prob=0.5)
    shapes = set()
    for _ in range(40):
        aug_input = T.AugInput(image, boxes=np.array([[0.0, 0.0, 10.0, 10.0]]))
        tfm = select(aug_input)
        shapes.add(aug_input.image.shape)
        if aug_input.image.shape == (40, 60, 3):  # flipped
            np.testing.assert_allclose(aug_input.boxes, [[50, 0, 60, 10]])
        else:  # resized by 0.5
            np.testing.assert_allclose(aug_input.boxes, [[0, 0, 5, 5]])
        np.testing.assert_array_equal(tfm.apply_image(image), aug_input.image)
    assert shapes == {(40, 60, 3), (20, 30, 3)}
