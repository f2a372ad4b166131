"""demo/demo.py on generated images and a generated video: pictures with boxes, COCO-results
json equal to DefaultPredictor's detections, unreadable inputs named and skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detrkit.config import LazyConfig, instantiate
from detrkit.data import generate_shapes_dataset, read_image
from detrkit.engine import DefaultPredictor
from tests.helpers import load_script
from tests.test_engine_defaults import SHAPES_TINY

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "demo" / "demo.py"
THRESHOLD = 0.3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo():
    return load_script(DEMO, "demo_under_test")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """shapes_tiny with random weights whose class biases put some scores above THRESHOLD."""
    cfg = LazyConfig.load(str(SHAPES_TINY))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    for head in model.class_embed:
        torch.nn.init.normal_(head.bias, -1.5, 1.0)
    path = tmp_path_factory.mktemp("demo_model") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("demo_images")
    generate_shapes_dataset(
        str(root), "val", 3, image_size=((100, 140), (110, 160)), seed=5, image_format="png"
    )
    return sorted((root / "val").glob("*.png"))


def _overrides(checkpoint: Path) -> list[str]:
    return [f"train.init_checkpoint={checkpoint}", "train.device=cpu"]


def _run(demo, *args) -> int:
    """demo.main with shapes_tiny and the given arguments (paths and numbers as text)."""
    return demo.main(["--config-file", str(SHAPES_TINY), *(str(a) for a in args)])


def _predictor(checkpoint: Path) -> DefaultPredictor:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(SHAPES_TINY)), _overrides(checkpoint))
    return DefaultPredictor(cfg)


def _check_json(entries: list[dict], instances, file_name: str) -> None:
    """The json's detections are the predictor's above THRESHOLD (shapes ids are class + 1)."""
    keep = instances.scores >= THRESHOLD
    assert len(entries) == int(keep.sum()) > 0
    boxes = instances.pred_boxes.tensor[keep].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    torch.testing.assert_close(
        torch.tensor([e["bbox"] for e in entries], dtype=torch.float64), xywh, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor([e["score"] for e in entries], dtype=torch.float64),
        instances.scores[keep].double(),
        atol=1e-4,
        rtol=0,
    )
    assert [e["category_id"] for e in entries] == (instances.pred_classes[keep] + 1).tolist()
    assert {e["file_name"] for e in entries} == {file_name}


def test_demo_images_pictures_json_and_a_corrupt_file(demo, checkpoint, images, tmp_path, capsys):
    corrupt = images[0].parent / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    code = demo.main(
        [
            "--config-file",
            str(SHAPES_TINY),
            "--input",
            str(images[0].parent),  # a folder: the three images and the corrupt file
            "--output",
            str(out),
            "--confidence-threshold",
            str(THRESHOLD),
            *_overrides(checkpoint),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "broken.jpg" in error_lines[0]
    assert not (out / "broken.jpg").exists()

    predictor = _predictor(checkpoint)
    for path in images:
        picture = read_image(str(out / path.name), "RGB").astype(int)
        original = read_image(str(path), "RGB")
        instances = predictor(original)["instances"]
        entries = json.loads((out / f"{path.stem}.json").read_text())
        _check_json(entries, instances, str(path))
        # the picture (a png, like its input) differs clearly from the input along the drawn
        # boxes' left edges, and not at all away from the boxes and their labels
        diff = np.abs(picture - original.astype(int)).mean(-1)
        near_boxes = np.zeros(diff.shape, bool)
        edges = []
        for entry in entries:
            x, y, _, h = entry["bbox"]
            column = min(round(x), original.shape[1] - 1)
            edges.append(diff[int(y + h * 0.3) : int(y + h * 0.7) + 1, column])
            near_boxes[max(int(y) - 16, 0) : int(y + h) + 4, max(int(x) - 4, 0) :] = True
        assert np.concatenate(edges).mean() > 30, path.name
        assert (~near_boxes).sum() > 100 and diff[~near_boxes].max() == 0, path.name


def test_demo_video(demo, checkpoint, images, tmp_path):
    av = pytest.importorskip("av")
    frames = [read_image(str(p), "RGB")[:96, :104] for p in images]
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 104, 96, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    threshold = ["--confidence-threshold", THRESHOLD]
    code = _run(demo, "--video-input", video, "--output", out, *threshold, *_overrides(checkpoint))
    assert code == 0
    # the decoded input frames, read independently, through the predictor
    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    per_frame = json.loads((out / "clip.json").read_text())
    assert len(per_frame) == len(decoded) == 3
    predictor = _predictor(checkpoint)
    for index, (entries, frame) in enumerate(zip(per_frame, decoded)):
        _check_json(entries, predictor(frame)["instances"], f"{video}#{index}")
    with av.open(str(out / "clip.mp4")) as container:
        written = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(written) == 3 and written[0].shape == decoded[0].shape
    assert np.abs(written[0].astype(int) - decoded[0]).mean() > 1  # boxes were drawn


def test_video_without_pyav_names_the_package(demo, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    code = demo.main(["--config-file", str(SHAPES_TINY), "--video-input", str(video)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "PyAV" in err[0] and "pip install av" in err[0]


def test_opts_form_single_output_file_and_missing_inputs(demo, checkpoint, images, tmp_path):
    target = tmp_path / "one" / "picture.png"
    opts = ["train.init_checkpoint", str(checkpoint), "train.device", "cpu"]
    code = _run(demo, "--input", images[1], "--output", target, "--opts", *opts)
    assert code == 0 and target.is_file() and (tmp_path / "one" / "picture.json").is_file()
    # a glob that matches nothing and a missing file: reported, exit code 1
    nothing, missing = tmp_path / "nothing*.jpg", tmp_path / "missing.jpg"
    code = _run(demo, "--input", nothing, missing, *_overrides(checkpoint))
    assert code == 1


def test_demo_sampling_points_picture(demo, checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = _run(
        demo,
        "--input",
        images[2],
        "--output",
        out,
        "--show-sampling-points",
        "--confidence-threshold",
        0.0,
        *_overrides(checkpoint),
    )
    assert code == 0
    picture = read_image(str(out / f"{images[2].stem}_sampling_points.png"), "RGB")
    # 4 detection panels and the encoder's in 2 rows, each enlarged to a long side of 320 px
    assert picture.shape[0] >= 2 * 200 and picture.shape[1] >= 3 * 320

    # an encoder pixel outside the image: that image's error is reported, exit code 1
    args = ["--input", images[2], "--output", out, "--show-sampling-points"]
    code = _run(demo, *args, "--encoder-pixel", 5000, 5, *_overrides(checkpoint))
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 1 and len(err) == 1
    assert images[2].name in err[0] and "encoder pixel (5000, 5) is outside" in err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--confidence-threshold", "1.5", "--input", "x.jpg"], "outside [0, 1]"),
        ([], "either --input (images) or --video-input"),
        (["--input", "x.jpg", "--opts", "train.device"], "has no value"),
        (["--input", "x.jpg", "--metadata-dataset", "nope"], "'nope' is not registered"),
        (["--input", "x.jpg", "train.nope_key=1"], "train.nope_key"),
        (["--video-input", "x.mp4", "--show-sampling-points"], "not with --video-input"),
    ],
)
def test_user_errors_are_one_line(demo, argv, message, capsys):
    code = demo.main(["--config-file", str(SHAPES_TINY), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_help_lists_every_flag(demo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--config-file",
        "--input",
        "--video-input",
        "--output",
        "--confidence-threshold",
        "--metadata-dataset",
        "--show-sampling-points",
        "--sampling-points-top-k",
        "--encoder-pixel",
        "--encoder-level",
        "--decoder-layer",
        "--encoder-layer",
        "--opts",
        "KEY=VALUE",
    ):
        assert flag in help_text
