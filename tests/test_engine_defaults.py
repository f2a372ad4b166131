"""DefaultPredictor gives, image by image, the detections of the evaluator's inference path
(`inference_on_dataset` over the test loader), in single and batched calls."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detrkit.config import ConfigError, LazyConfig, instantiate
from detrkit.data import (
    DatasetCatalog,
    MetadataCatalog,
    generate_shapes_dataset,
    read_image,
    register_coco_instances,
    register_shapes,
)
from detrkit.engine import DefaultPredictor, build_inference_model
from detrkit.evaluation import DatasetEvaluator, inference_on_dataset
from tests.helpers import capture_logs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES_TINY = REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py"

pytestmark = pytest.mark.usefixtures("one_thread")


class _Capture(DatasetEvaluator):
    """Keeps each image's outputs by file name."""

    def reset(self) -> None:
        self.outputs: dict[str, dict] = {}

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            self.outputs[inp["file_name"]] = out


_registered: dict[str, tuple[str, str]] = {}  # dataset name -> (json file, image root)


def _dataset(root: Path, name: str, num_images: int = 4) -> None:
    json_file = generate_shapes_dataset(
        str(root), "val", num_images, image_size=((90, 150), (100, 170)), seed=7
    )
    DatasetCatalog.pop(name, None)
    MetadataCatalog.remove(name)
    _registered[name] = (json_file, str(root / "val"))
    register_coco_instances(name, {}, json_file, str(root / "val"))


def _config(dataset: str, checkpoint: str):
    cfg = LazyConfig.load(str(SHAPES_TINY))
    return LazyConfig.apply_overrides(
        cfg,
        [
            f"dataloader.test.dataset.names={dataset}",
            f"train.init_checkpoint={checkpoint}",
            "train.device=cpu",
            "model.select_box_nums_for_evaluation=20",
        ],
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A shapes_tiny model with random weights saved to a checkpoint, and a small dataset."""
    root = tmp_path_factory.mktemp("predictor")
    name = "predictor_test_val"
    _dataset(root, name)
    torch.manual_seed(0)
    cfg = _config(name, "")
    model = instantiate(cfg.model)
    # spread the class biases so that top-k has no near-ties
    for head in model.class_embed:
        torch.nn.init.normal_(head.bias, -2.0, 1.0)
    checkpoint = root / "random.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return _config(name, str(checkpoint)), checkpoint


def _reference_outputs(cfg, checkpoint: Path) -> dict[str, dict]:
    """The evaluator's path: a model loaded with torch's own load_state_dict, the test loader
    (mapper) and inference_on_dataset."""
    model = instantiate(cfg.model)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    capture = _Capture()
    inference_on_dataset(model, instantiate(cfg.dataloader.test), capture)
    return capture.outputs


def _assert_same(actual: dict, expected: dict, what: str) -> None:
    """Same detections within 1e-4 (scores and boxes) and the same classes. Detections whose
    scores tie within that tolerance may come in either order, so each one is paired with an
    unused expected detection of its class, score and box."""
    a, e = actual["instances"].to("cpu"), expected["instances"].to("cpu")
    assert a.image_size == e.image_size, what
    assert len(a) == len(e), what
    torch.testing.assert_close(a.scores, e.scores, atol=1e-4, rtol=0, msg=what)
    unused = list(range(len(e)))
    for i in range(len(a)):
        match = [
            j
            for j in unused
            if a.pred_classes[i] == e.pred_classes[j]
            and abs(float(a.scores[i] - e.scores[j])) < 1e-4
            and float((a.pred_boxes.tensor[i] - e.pred_boxes.tensor[j]).abs().max()) < 1e-4
        ]
        assert match, f"{what}: detection {i} has no counterpart"
        unused.remove(match[0])


def test_predictor_equals_evaluator_path(setup):
    cfg, checkpoint = setup
    reference = _reference_outputs(cfg, checkpoint)
    predictor = DefaultPredictor(cfg)
    assert predictor.input_format == "RGB"
    files = sorted(reference)
    images = [read_image(f, "RGB") for f in files]
    for file_name, image in zip(files, images):
        out = predictor(image)
        assert out["instances"].image_size == image.shape[:2]
        _assert_same(out, reference[file_name], f"single {file_name}")
    # one batch of images of different sizes
    assert len({im.shape for im in images}) > 1
    for file_name, out in zip(files, predictor.predict_batch(images)):
        _assert_same(out, reference[file_name], f"batched {file_name}")


def test_predictor_metadata_and_input_checks(setup):
    cfg, _ = setup
    # a dataset registered but not loaded yet: the class names come from its json
    DatasetCatalog.pop("predictor_test_val")
    MetadataCatalog.remove("predictor_test_val")
    register_coco_instances("predictor_test_val", {}, *_registered["predictor_test_val"])
    assert MetadataCatalog.get("predictor_test_val").get("thing_classes") is None
    predictor = DefaultPredictor(cfg)
    assert list(predictor.metadata.thing_classes) == ["circle", "square", "triangle", "cross"]
    assert predictor.metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\).*got \(10, 10\)"):
        predictor(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match=r"must be uint8.*float32"):
        predictor(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        predictor(torch.zeros(10, 10, 3, dtype=torch.uint8))
    assert predictor.predict_batch([]) == []


def test_predictor_checkpoint_metadata_wins(setup, tmp_path):
    cfg, checkpoint = setup
    data = torch.load(checkpoint, weights_only=True)
    data["metadata"] = {"thing_classes": ["a", "b", "c", "d"]}
    path = tmp_path / "with_meta.pth"
    torch.save(data, path)
    cfg = LazyConfig.apply_overrides(cfg, [f"train.init_checkpoint={path}"])
    assert DefaultPredictor(cfg).metadata.thing_classes == ["a", "b", "c", "d"]


def test_build_inference_model_loads_weights_and_falls_back_to_cpu(setup, monkeypatch):
    cfg, checkpoint = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = LazyConfig.apply_overrides(cfg, ["train.device=cuda"])
    with capture_logs("detrkit.engine.config_checks", logging.WARNING) as records:
        model, device, input_format = build_inference_model(cfg)
    assert device == torch.device("cpu") and input_format == "RGB"
    assert any("CUDA is not available" in r.getMessage() for r in records)
    assert not model.training
    expected = torch.load(checkpoint, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_predictor_missing_config_key_is_named():
    cfg = LazyConfig.load(str(SHAPES_TINY))
    del cfg.dataloader["test"]
    with pytest.raises(ConfigError, match=r"dataloader\.test\.mapper"):
        DefaultPredictor(cfg)


@pytest.mark.slow
def test_predictor_on_quickstart_checkpoint(quickstart_run):
    """The same check on the quickstart's trained model over the whole validation set."""
    trained = quickstart_run.output_dir / "model_final.pth"
    register_shapes(str(quickstart_run.datasets_dir / "shapes"))  # the run's validation images
    try:
        _check_trained_predictor(trained)
    finally:
        register_shapes()


def _check_trained_predictor(trained: Path) -> None:
    cfg = LazyConfig.load(str(SHAPES_TINY))
    cfg = LazyConfig.apply_overrides(cfg, [f"train.init_checkpoint={trained}", "train.device=cpu"])
    reference = _reference_outputs(cfg, trained)
    predictor = DefaultPredictor(cfg)
    files = sorted(reference)
    images = [read_image(f, "RGB") for f in files]
    for file_name, image in zip(files, images):
        _assert_same(predictor(image), reference[file_name], f"single {file_name}")
    for start in range(0, len(files), 8):
        chunk = slice(start, start + 8)
        for file_name, out in zip(files[chunk], predictor.predict_batch(images[chunk])):
            what = f"batched {os.path.basename(file_name)}"
            _assert_same(out, reference[file_name], what)
