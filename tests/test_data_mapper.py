"""DetrDatasetMapper output contract, image decoding (EXIF, modes) and bad images."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.data import (
    DetrDatasetMapper,
    ImageLoadError,
    build_detection_test_loader,
    build_detection_train_loader,
    read_image,
)
from detrkit.data import transforms as T
from detrkit.structures import BoxMode, Instances

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _two_colour_image(h, w):
    """Left half red, right half blue (RGB)."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 2] = RED
    image[:, w // 2 :] = BLUE
    return image


def _record(path, h, w, image_id=7, annotations=None):
    return {
        "file_name": str(path),
        "height": h,
        "width": w,
        "image_id": image_id,
        "annotations": annotations or [],
    }


def _ann(box_xywh, category_id, iscrowd=0):
    return {"bbox": box_xywh, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id,
            "iscrowd": iscrowd}  # fmt: skip


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(_two_colour_image(30, 40)).save(path)
    return path


def test_inference_output_contract(png):
    record = _record(png, 30, 40, annotations=[_ann([1, 2, 3, 4], 0)])
    out = DetrDatasetMapper([], is_train=False)(record)
    image = out["image"]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    assert image.shape == (3, 30, 40) and image.is_contiguous()
    # RGB order, channels first: red on the left, blue on the right
    assert (image[0, :, :20] == 255).all() and (image[2, :, :20] == 0).all()
    assert (image[2, :, 20:] == 255).all() and (image[0, :, 20:] == 0).all()
    assert (out["height"], out["width"], out["image_id"]) == (30, 40, 7)
    assert out["file_name"] == str(png)
    assert "annotations" not in out and "instances" not in out
    assert record["annotations"] == [_ann([1, 2, 3, 4], 0)]  # the record is not modified

    bgr = DetrDatasetMapper([], is_train=False, img_format="BGR")(record)["image"]
    assert torch.equal(bgr, image.flip(0))


def test_training_instances_after_resize_and_flip(png):
    annotations = [_ann([2.0, 4.0, 6.0, 8.0], 3), _ann([0, 0, 10, 10], 1, iscrowd=1),
                   _ann([30.0, 20.0, 10.0, 10.0], 0)]  # fmt: skip
    record = _record(png, 30, 40, annotations=annotations)
    # short side 30 -> 60: scale 2; then a certain horizontal flip in the 80-wide image
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(60), T.RandomFlip(prob=1.0)], is_train=True)
    out = mapper(record)
    assert out["image"].shape == (3, 60, 80)
    instances = out["instances"]
    assert isinstance(instances, Instances) and instances.image_size == (60, 80)
    assert instances.gt_classes.dtype == torch.int64
    assert instances.gt_classes.tolist() == [3, 0]  # the crowd box is dropped
    # [2, 4, 8, 12] * 2 = [4, 8, 16, 24]; flipped in width 80: x -> 80 - x
    # [30, 20, 40, 30] * 2 = [60, 40, 80, 60] -> [0, 40, 20, 60]
    expected = torch.tensor([[64.0, 8.0, 76.0, 24.0], [0.0, 40.0, 20.0, 60.0]])
    torch.testing.assert_close(instances.gt_boxes.tensor, expected)
    assert instances.gt_boxes.tensor.dtype == torch.float32
    # the image was flipped too: blue is now on the left
    assert (out["image"][2, :, :38] == 255).all()  # (bilinear blends the middle columns)


def test_training_uses_both_augmentation_lists(png):
    record = _record(png, 30, 40, annotations=[_ann([0.0, 0.0, 40.0, 30.0], 0)])
    mapper = DetrDatasetMapper(
        [T.ResizeShortestEdge(60)], augmentation_with_crop=[T.ResizeShortestEdge(15)]
    )
    sizes = {tuple(mapper(record)["image"].shape[1:]) for _ in range(40)}
    assert sizes == {(60, 80), (15, 20)}


def test_box_cropped_away_is_removed(png):
    record = _record(
        png, 30, 40, annotations=[_ann([0.0, 0.0, 5.0, 5.0], 1), _ann([20.0, 10.0, 10.0, 10.0], 2)]
    )

    class FixedCrop(T.Augmentation):
        def get_transform(self, image):
            return T.CropTransform(10, 8, 25, 20)

    out = DetrDatasetMapper([FixedCrop()], is_train=True)(record)
    assert out["instances"].gt_classes.tolist() == [2]
    torch.testing.assert_close(
        out["instances"].gt_boxes.tensor, torch.tensor([[10.0, 2.0, 20.0, 12.0]])
    )


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (_ann([1, 2, 3, 4], -1), r"annotation 1 has category_id=-1; accepted: an integer >= 0"),
        (_ann([1, 2, 3, 4], 1.5), r"annotation 1 has category_id=1.5; accepted: an integer"),
        (_ann([1, 2, 3, 4], "cat"), r"annotation 1 has category_id='cat'"),
        (_ann([1, 2, float("nan"), 4], 0), r"annotation 1 has bbox=\[1, 2, nan, 4\]; accepted: 4"),
        (_ann([1, 2, 3], 0), r"annotation 1 has bbox=\[1, 2, 3\]; accepted: 4 finite numbers"),
    ],
)
def test_bad_annotation_names_image_and_value(png, annotation, expected):
    record = _record(png, 30, 40, image_id=9, annotations=[_ann([1, 2, 3, 4], 0), annotation])
    with pytest.raises(ValueError, match=expected) as info:
        DetrDatasetMapper([], is_train=True)(record)
    assert f"{png} (image_id 9)" in str(info.value)
    # integral ids of any number type are fine
    record = _record(
        png, 30, 40, annotations=[_ann([1, 2, 3, 4], np.int64(2)), _ann([1, 2, 3, 4], 1.0)]
    )
    assert DetrDatasetMapper([], is_train=True)(record)["instances"].gt_classes.tolist() == [2, 1]


def test_exif_orientation_is_applied(tmp_path):
    stored = _two_colour_image(20, 40)  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    image = read_image(path)
    assert image.shape == (40, 20, 3)
    # the stored left (red) half is on top once displayed upright
    assert image[:15, :, 0].mean() > 200 and image[:15, :, 2].mean() < 50
    assert image[25:, :, 2].mean() > 200 and image[25:, :, 0].mean() < 50
    out = DetrDatasetMapper([], is_train=False)(_record(path, 40, 20))
    assert out["image"].shape == (3, 40, 20)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rng = np.random.default_rng()
    gray = rng.integers(0, 256, size=(12, 16), dtype=np.uint8)
    if mode == "L":
        pil = Image.fromarray(gray, mode="L")
    elif mode == "I;16":
        pil = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit grey, full range
    else:
        pil = Image.fromarray(np.stack([gray] * 3, axis=2)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    pil.save(path)
    image = read_image(path)
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    if mode in ("L", "RGBA", "I;16"):
        for c in range(3):
            np.testing.assert_array_equal(image[:, :, c], gray)


@pytest.mark.parametrize("format", ["RGB", "L"])
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, format):
    rng = np.random.default_rng()
    gray = rng.integers(0, 256, size=(12, 16), dtype=np.uint8)
    expected = gray[:, :, None] if format == "L" else np.stack([gray] * 3, axis=2)
    wide = tmp_path / "wide.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(wide)  # 16-bit, full range
    np.testing.assert_array_equal(read_image(wide, format=format), expected)
    fraction = tmp_path / "fraction.tiff"
    Image.fromarray(gray.astype(np.float32) / 255.0, mode="F").save(fraction)  # float in [0, 1]
    np.testing.assert_array_equal(read_image(fraction, format=format), expected)


def test_missing_image_names_file_and_image_id(tmp_path):
    record = _record(tmp_path / "gone.jpg", 10, 10, image_id=4242)
    with pytest.raises(FileNotFoundError) as info:
        DetrDatasetMapper([], is_train=True)(record)
    message = str(info.value)
    assert "gone.jpg" in message and "4242" in message and "skip_bad_images" in message
    assert isinstance(info.value, ImageLoadError)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_corrupt_image_names_file(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    buffer_path = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer_path
    )
    data = buffer_path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not an image" * 20, "empty": b""}[kind]
    )
    with pytest.raises(ImageLoadError) as info:
        DetrDatasetMapper([], is_train=False)(_record(path, 64, 64, image_id=99))
    assert str(path) in str(info.value) and "99" in str(info.value)


def test_size_mismatch_names_file(png):
    with pytest.raises(ValueError, match=r"img\.png.*40x30.*annotations say 41x30"):
        DetrDatasetMapper([], is_train=False)(_record(png, 30, 41))


def test_skip_bad_images_returns_none_with_warning(tmp_path, caplog):
    mapper = DetrDatasetMapper([], is_train=True, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        assert mapper(_record(tmp_path / "missing.png", 5, 5, image_id=3)) is None
    assert "missing.png" in caplog.text and "image_id=3" in caplog.text


def _bad_dataset(tmp_path):
    good = []
    for i in range(4):
        path = tmp_path / f"good{i}.png"
        Image.fromarray(_two_colour_image(20, 20 + i)).save(path)
        good.append(_record(path, 20, 20 + i, image_id=i, annotations=[_ann([1, 1, 5, 5], 0)]))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    bad = [
        _record(
            tmp_path / "missing.png", 20, 20, image_id=100, annotations=[_ann([1, 1, 5, 5], 0)]
        ),
        _record(corrupt, 20, 20, image_id=101, annotations=[_ann([1, 1, 5, 5], 0)]),
    ]
    return good, bad


def test_train_loader_skips_bad_images_and_draws_others(tmp_path, caplog):
    good, bad = _bad_dataset(tmp_path)
    mapper = DetrDatasetMapper([], is_train=True, skip_bad_images=True)
    loader = build_detection_train_loader(
        bad[:1] + good + bad[1:],
        mapper=mapper,
        total_batch_size=2,
        aspect_ratio_grouping=False,
        seed=1,
    )
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        seen = [x["image_id"] for batch, _ in zip(loader, range(12)) for x in batch]
    assert len(seen) == 24 and set(seen) == {0, 1, 2, 3}
    assert "missing.png" in caplog.text and "corrupt.jpg" in caplog.text

    # without the switch the first bad image stops training with a clear error
    strict = DetrDatasetMapper([], is_train=True)
    loader = build_detection_train_loader(bad, mapper=strict, total_batch_size=1, seed=1)
    with pytest.raises(ImageLoadError, match=r"missing\.png|corrupt\.jpg"):
        next(iter(loader))


def test_fully_broken_dataset_errors_out(tmp_path):
    _, bad = _bad_dataset(tmp_path)
    mapper = DetrDatasetMapper([], is_train=True, skip_bad_images=True)
    loader = build_detection_train_loader(bad, mapper=mapper, total_batch_size=1, seed=0)
    with pytest.raises(RuntimeError, match="no usable image"):
        next(iter(loader))


def test_test_loader_leaves_bad_images_out(tmp_path):
    good, bad = _bad_dataset(tmp_path)
    mapper = DetrDatasetMapper([], is_train=False, skip_bad_images=True)
    loader = build_detection_test_loader(good[:2] + bad + good[2:], mapper=mapper, batch_size=2)
    batches = list(loader)
    assert [[x["image_id"] for x in b] for b in batches] == [[0, 1], [], [2, 3]]


def test_cache_mode_reads_each_file_once(tmp_path):
    good, _ = _bad_dataset(tmp_path)
    mapper = DetrDatasetMapper([], is_train=False)
    loader = build_detection_test_loader(good, mapper=mapper, cache_mode=True)
    for record in good:
        os.remove(record["file_name"])  # from now on only the in-memory bytes exist
    images = [b[0] for b in loader]
    assert [x["image_id"] for x in images] == [0, 1, 2, 3]
    assert all("image_bytes" not in x for x in images)
    assert (images[0]["image"][0, :, :10] == 255).all()
