"""Exported detectors (torch.export, ONNX run by onnxruntime, AOTInductor) give the PyTorch
model's detections for all five variants, at image sizes other than the traced one; the ONNX
forms of the deformable attention match the pure-PyTorch reference; tools/export_model.py
reports bad inputs in one line."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from test_deformable_detr import VARIANT_CONFIGS, tiny_model_config

from detrkit.config import instantiate
from detrkit.export import (
    ExportableDetector,
    compare_detections,
    export_onnx,
    export_program,
    load_runner,
)
from detrkit.layers import ms_deform_attn, ms_deform_attn_reference

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = (2, 128, 160)  # the traced (batch, height, width)
# (batch, height, width) the artifacts run at: other sizes than the sample, batch 1 included;
# every side > 64 so that the coarsest level (stride 64) is at least 2 x 2, as it is traced
RUN_SIZES = [(1, 96, 136), (3, 200, 150)]
TOP = 100


def random_images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)


def small_model(variant: str) -> torch.nn.Module:
    """The tiny variant with one encoder and two decoder layers (refinement chains through)."""
    cfg = tiny_model_config(variant)
    cfg.model.transformer.encoder.num_layers = 1
    cfg.model.transformer.decoder.num_layers = 2
    cfg.model.select_box_nums_for_evaluation = TOP + 50  # of 50 queries x 4 classes
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    return instantiate(cfg.model).eval()


def eager_detections(model, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The oracle: the model's own eval forward (Instances), one image at a time."""
    boxes, scores, labels = [], [], []
    with torch.no_grad():
        for image in images:
            instances = model([{"image": image}])[0]["instances"]
            boxes.append(instances.pred_boxes.tensor.numpy())
            scores.append(instances.scores.numpy())
            labels.append(instances.pred_classes.numpy())
    return np.stack(boxes), np.stack(scores), np.stack(labels)


def assert_same_detections(reference, exported) -> None:
    """Top 100 per image: scores within 1e-4, boxes within 1e-2 px, labels equal.

    Near-tied scores may come out in another order, so the reference's top 100 are paired with
    the exported top 110 by an optimal assignment that only pairs equal labels with scores
    within 1e-4, minimizing the box difference; every pair must then be within tolerance."""
    ref_boxes, ref_scores, ref_labels = reference
    out_boxes, out_scores, out_labels = (np.asarray(a) for a in exported)
    assert out_boxes.shape == ref_boxes.shape and out_scores.shape == ref_scores.shape
    assert out_labels.dtype == np.int64
    assert ref_scores.shape[1] > TOP, "K must exceed TOP, or a tie at the cut cannot be paired"
    pool = TOP + 10
    for i in range(len(ref_scores)):
        np.testing.assert_allclose(
            np.sort(out_scores[i])[::-1][:TOP], ref_scores[i, :TOP], rtol=0, atol=1e-4
        )
        same_label = ref_labels[i, :TOP, None] == out_labels[i, None, :pool]
        close = np.abs(ref_scores[i, :TOP, None] - out_scores[i, None, :pool]) <= 1e-4
        box_diff = np.abs(ref_boxes[i, :TOP, None] - out_boxes[i, None, :pool]).max(-1)
        cost = np.where(same_label & close, box_diff, 1e6)
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == TOP
        worst = cost[rows, cols].max()
        assert worst <= 1e-2, f"image {i}: a detection is {worst} px (1e6: unpaired) off"


_PROGRAMS: dict = {}


def exported(variant: str):
    """(model, dynamic ExportedProgram) of the small `variant`, built once per session."""
    if variant not in _PROGRAMS:
        model = small_model(variant)
        program = export_program(ExportableDetector(model), random_images(*SAMPLE), dynamic=True)
        _PROGRAMS[variant] = model, program
    return _PROGRAMS[variant]


# --------------------------------------------------------------------- the ONNX attention forms


class _Attention(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def attention_inputs(batch: int, sizes: list, queries: int, heads=2, channels=4, points=3):
    shapes = torch.tensor(sizes, dtype=torch.long)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(batch, int(areas.sum()), heads, channels)
    # some points fall outside the maps (they read zeros)
    locations = torch.rand(batch, queries, heads, len(sizes), points, 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(sizes), points)
    return value, shapes, starts, locations, weights


@pytest.mark.parametrize("form", ["gather", "grid_sample"])
def test_onnx_attention_form_matches_reference(form, tmp_path):
    import onnx
    import onnxruntime as ort

    from detrkit.export import onnx_translation_table

    path = str(tmp_path / "attention.onnx")
    names = ["value", "spatial_shapes", "level_start_index", "locations", "weights"]
    dynamic = ({0: "n", 1: "s"}, None, None, {0: "n", 1: "q"}, {0: "n", 1: "q"})
    program = torch.onnx.export(
        _Attention(),
        attention_inputs(2, [(5, 7), (3, 4)], 6),
        dynamo=True,
        opset_version=18,
        input_names=names,
        dynamic_shapes=dynamic,
        custom_translation_table=onnx_translation_table(form),
        optimize=False,
    )
    program.save(path, external_data=False)
    onnx.checker.check_model(path, full_check=True)
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert ("GridSample" in ops) == (form == "grid_sample")
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(path).graph.node)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # other batch, level sizes (1 x 1 included) and query counts than traced
    for args in (
        attention_inputs(3, [(6, 9), (2, 5)], 11),
        attention_inputs(1, [(1, 1), (4, 2)], 3),
    ):
        (out,) = session.run(None, {n: t.numpy() for n, t in zip(names, args)})
        expected = ms_deform_attn_reference(*args).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------- the five variants


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_torch_export_matches_pytorch(variant, tmp_path):
    model, program = exported(variant)
    targets = {str(node.target) for node in program.graph.nodes}
    assert "detrkit.ms_deform_attn_forward.default" in targets
    path = str(tmp_path / "model.pt2")
    torch.export.save(program, path)
    run = load_runner("torch_export", path)
    for size in RUN_SIZES:
        images = random_images(*size)
        assert_same_detections(eager_detections(model, images), run(images.numpy()))


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_onnx_matches_pytorch(variant, tmp_path):
    import onnx

    model, program = exported(variant)
    path = export_onnx(program, str(tmp_path / "model.onnx"))
    onnx.checker.check_model(path, full_check=True)
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels"]
    run = load_runner("onnx", path)
    for size in RUN_SIZES:
        images = random_images(*size)
        assert_same_detections(eager_detections(model, images), run(images.numpy()))


def test_onnx_grid_sample_form_matches_pytorch(tmp_path):
    model, program = exported("deformable_detr")
    path = export_onnx(program, str(tmp_path / "model.onnx"), attention="grid_sample")
    run = load_runner("onnx", path)
    images = random_images(*RUN_SIZES[1])
    assert_same_detections(eager_detections(model, images), run(images.numpy()))


def test_exported_program_loads_in_a_process_importing_only_detrkit(tmp_path):
    model, program = exported("deformable_detr")
    path = str(tmp_path / "model.pt2")
    torch.export.save(program, path)
    images = random_images(*RUN_SIZES[0])
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys, numpy as np, torch, detrkit.layers\n"
        "assert 'projects' not in sys.modules\n"
        f"module = torch.export.load({path!r}).module()\n"
        f"images = torch.from_numpy(np.load({str(tmp_path / 'images.npy')!r}))\n"
        "boxes, scores, labels = module(images)\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, boxes=boxes.detach().numpy(), "
        "scores=scores.detach().numpy(), labels=labels.numpy())\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path))
    out = np.load(tmp_path / "out.npz")
    exported_out = (out["boxes"], out["scores"], out["labels"])
    assert_same_detections(eager_detections(model, images), exported_out)


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory) -> str:
    """The multi-scale program compiled by AOTInductor for the CPU (minutes)."""
    from detrkit.export import compile_aoti

    _, program = exported("deformable_detr")
    return compile_aoti(program, str(tmp_path_factory.mktemp("aoti") / "model_aoti.pt2"))


@pytest.mark.slow
def test_aoti_package_matches_pytorch(aoti_package):
    model, _ = exported("deformable_detr")
    run = load_runner("aoti", aoti_package)
    for size in RUN_SIZES:
        images = random_images(*size)
        assert_same_detections(eager_detections(model, images), run(images.numpy()))


@pytest.mark.slow
def test_aoti_package_runs_from_cpp(aoti_package, tmp_path):
    """docs/deploy/aoti_runner.cpp, compiled against the wheel's libtorch, runs the package
    with detrkit's C++ op library and no Python."""
    compiler = shutil.which("g++")
    torch_dir = os.path.dirname(torch.__file__)
    if compiler is None or not os.path.isdir(os.path.join(torch_dir, "include")):
        pytest.skip("needs g++ and the torch wheel's C++ headers")
    extension = glob.glob(os.path.join(REPO, "detrkit", "_C*.so"))
    if not extension:
        pytest.skip("detrkit._C is not built")
    runner = str(tmp_path / "aoti_runner")
    include = os.path.join(torch_dir, "include")
    lib = os.path.join(torch_dir, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    subprocess.run(
        [
            compiler, "-std=c++17", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{include}", f"-I{include}/torch/csrc/api/include",
            os.path.join(REPO, "docs", "deploy", "aoti_runner.cpp"), "-o", runner,
            f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}", "-ldl",
        ],
        check=True,
    )  # fmt: skip
    model, _ = exported("deformable_detr")
    images = random_images(*RUN_SIZES[0])
    images.numpy().tofile(tmp_path / "image.raw")
    height, width = RUN_SIZES[0][1:]
    result = subprocess.run(
        [runner, aoti_package, extension[0], str(tmp_path / "image.raw"), str(height), str(width)],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    rows = np.array([[float(v) for v in line.split()] for line in result.stdout.splitlines()])
    cpp_out = (rows[None, :, 2:6], rows[None, :, 1], rows[None, :, 0].astype(np.int64))
    assert_same_detections(eager_detections(model, images), cpp_out)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_r50_configs_export_to_onnx_and_torch_export(variant, tmp_path):
    """The ResNet-50 COCO configs (random weights, 300 detections) at small input sizes."""
    from test_deformable_detr import load_config

    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = instantiate(load_config(variant).model).eval()
    program = export_program(ExportableDetector(model), random_images(2, 256, 320), dynamic=True)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    runners = [
        load_runner("torch_export", str(tmp_path / "model.pt2")),
        load_runner("onnx", export_onnx(program, str(tmp_path / "model.onnx"))),
    ]
    for size in [(1, 224, 288), (2, 288, 352)]:
        images = random_images(*size)
        reference = eager_detections(model, images)
        for run in runners:
            assert_same_detections(reference, run(images.numpy()))


# --------------------------------------------------------------------- detection matching


def test_compare_detections_tolerates_tie_swaps_only():
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]]], dtype=np.float32)
    scores = np.array([[0.9, 0.5, 0.5]], dtype=np.float32)
    labels = np.array([[1, 2, 3]])
    swapped = (boxes[:, [0, 2, 1]], scores[:, [0, 2, 1]], labels[:, [0, 2, 1]])
    diff = compare_detections((boxes, scores, labels), swapped)
    assert diff.ok() and diff.max_box == 0 and diff.compared == 3
    relabeled = (boxes, scores, np.array([[0, 2, 3]]))
    assert compare_detections((boxes, scores, labels), relabeled).unmatched == 1
    # the last kept detection may be replaced by one scoring alike (the first one cut off)
    cut = (boxes, scores, np.array([[1, 2, 0]]))
    assert compare_detections((boxes, scores, labels), cut).unmatched == 0
    moved = (boxes + np.float32(0.05), scores, labels)
    assert not compare_detections((boxes, scores, labels), moved).ok()
    rescored = (boxes, scores + np.float32(1e-3), labels)
    diff = compare_detections((boxes, scores, labels), rescored)
    assert diff.max_score == pytest.approx(1e-3, rel=1e-4) and not diff.ok()


# --------------------------------------------------------------------- the command line


def export_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "export_model.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
    )


TINY_CONFIG = os.path.join(REPO, "projects/deformable_detr/configs/shapes_tiny.py")
SMALL_OVERRIDES = [
    "model.transformer.encoder.num_layers=1",
    "model.transformer.decoder.num_layers=2",
]


def test_tool_exports_and_verifies_onnx(tmp_path):
    from detrkit.config import LazyConfig

    cfg = LazyConfig.apply_overrides(LazyConfig.load(TINY_CONFIG), SMALL_OVERRIDES)
    torch.save({"model": instantiate(cfg.model).state_dict()}, tmp_path / "model.pth")
    result = export_tool(
        "--config-file", TINY_CONFIG, "--format", "onnx", "--output", str(tmp_path / "out"),
        "--sample-size", "128", "160", "--dynamic",
        *SMALL_OVERRIDES, f"train.init_checkpoint={tmp_path / 'model.pth'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "out" / "model.onnx")
    assert "batch: [1, inf], height: [65, inf], width: [65, inf]" in result.stdout
    verified = [line for line in result.stdout.splitlines() if line.startswith("verify onnx")]
    assert len(verified) == 2 and all(line.endswith("OK") for line in verified)


def test_tool_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.pth"
    result = export_tool(
        "--config-file", TINY_CONFIG, "--format", "onnx", "--output", str(tmp_path / "out"),
        f"train.init_checkpoint={missing}",
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0]


def test_tool_unsupported_format(tmp_path):
    result = export_tool(
        "--config-file", TINY_CONFIG, "--format", "tflite", "--output", str(tmp_path)
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--format" in last and "'tflite'" in last and "onnx" in last


def test_tool_output_is_a_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = export_tool(
        "--config-file", TINY_CONFIG, "--format", "torch_export", "--output", str(target),
        "--random-weights",
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "is a file" in lines[0]


def test_tool_verification_fails_for_other_weights(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "export_model", os.path.join(REPO, "tools", "export_model.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model, program = exported("single_scale")
    path = str(tmp_path / "model.pt2")
    torch.export.save(program, path)
    images = random_images(*RUN_SIZES[0])
    assert tool.verify(model, "torch_export", path, [images], "cpu")
    assert not tool.verify(small_model("single_scale"), "torch_export", path, [images], "cpu")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("OK") and "FAILED" in lines[1]
