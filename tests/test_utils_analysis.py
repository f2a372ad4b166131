"""FLOP counting: deformable attention and scaled dot-product attention counted with hand-derived
multiply-add formulas; tools/analyze_model.py and tools/benchmark.py run on a tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from detrkit.data import DatasetCatalog, generate_shapes_dataset, register_coco_instances
from detrkit.layers import MultiScaleDeformableAttention
from detrkit.utils.analysis import FlopCountAnalysis
from tests.helpers import load_script
from tests.test_engine_defaults import SHAPES_TINY

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


class _Attention(nn.Module):
    """A MultiScaleDeformableAttention called as the encoder calls it."""

    def __init__(self, embed_dim, heads, levels, points, shapes) -> None:
        super().__init__()
        self.attn = MultiScaleDeformableAttention(embed_dim, heads, levels, points, dropout=0.0)
        self.attn.batch_first = True
        self.register_buffer("shapes", torch.tensor(shapes))

    def forward(self, query, value, reference_points):
        return self.attn(
            query, value=value, reference_points=reference_points, spatial_shapes=self.shapes
        )


def test_deformable_attention_multiply_adds():
    n, lq, c, m, levels, p = 2, 7, 32, 4, 2, 3
    shapes = [[6, 5], [3, 3]]
    s = sum(h * w for h, w in shapes)
    model = _Attention(c, m, levels, p, shapes).eval()
    inputs = (torch.randn(n, lq, c), torch.randn(n, s, c), torch.rand(n, lq, levels, 2))
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, inputs)
        by_op = analysis.by_operator()
    d = c // m
    # each sampled point: 4 bilinear corners x D channels, then x its attention weight
    assert by_op["ms_deform_attn_forward"] == n * lq * m * levels * p * d * (4 + 1)
    linears = n * s * c * c  # value_proj
    linears += n * lq * c * (m * levels * p * 2)  # sampling_offsets
    linears += n * lq * c * (m * levels * p)  # attention_weights
    linears += n * lq * c * c  # output_proj
    assert by_op["linear"] == linears
    assert analysis.total() == linears + by_op["ms_deform_attn_forward"]

    with torch.no_grad():
        with_elementwise = FlopCountAnalysis(model, inputs, count_elementwise=True)
        softmax = with_elementwise.by_operator()["softmax"]
    assert softmax == n * lq * m * levels * p  # one flop per attention weight


def test_multihead_attention_multiply_adds():
    n, length, e, heads = 2, 9, 24, 3
    mha = nn.MultiheadAttention(e, heads, batch_first=True).eval()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, q, v):
            return self.mha(q, q, v, need_weights=False)[0]

    with torch.no_grad():
        total = FlopCountAnalysis(Wrapper(), (torch.randn(n, length, e),) * 2).total()
    projections = n * length * e * 3 * e + n * length * e * e  # in-projection, out-projection
    attention = n * length * length * e * 2  # Q K^T and the weighted sum of V, all heads
    assert total == projections + attention


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("analysis_data")
    json_file = generate_shapes_dataset(str(root), "val", 4, image_size=((80, 100), (90, 120)))
    name = "analysis_test_shapes"
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    register_coco_instances(name, {}, json_file, str(root / "val"))
    return name


def test_analyze_model_tasks(tiny_dataset, capsys):
    tool = load_script(REPO_ROOT / "tools" / "analyze_model.py", "analyze_model_under_test")
    config = ["--config-file", str(SHAPES_TINY), "train.device=cpu"]
    tasks = ["--tasks", "flop", "activation", "parameter", "structure"]
    dataset = [f"dataloader.test.dataset.names={tiny_dataset}"]
    assert tool.main([*tasks, "-n", "1", "--max-depth", "2", *config, *dataset]) == 0
    out = capsys.readouterr().out
    assert "Total GFlops" in out and "#activations" in out and "backbone.res5" in out
    # an override right after --tasks (whose nargs="+" takes it) still counts as one
    shape = ["--input-shape", "64", "96"]
    assert tool.main([*config[:2], *shape, "--tasks", "flop", "train.device=cpu"]) == 0
    assert "of mean size 64x96" in capsys.readouterr().out
    code = tool.main(["--tasks", "flop", "-n", "0", *config])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--num-inputs 0" in err[0] and "N >= 1" in err[0]


def test_benchmark_tasks(tiny_dataset, capsys):
    tool = load_script(REPO_ROOT / "tools" / "benchmark.py", "benchmark_under_test")
    base = ["--config-file", str(SHAPES_TINY), "--iters", "1", "--warmup", "1"]
    data = [
        f"dataloader.test.dataset.names={tiny_dataset}",
        f"dataloader.train.dataset.names={tiny_dataset}",
        "dataloader.train.total_batch_size=2",
        "train.device=cpu",
    ]
    assert tool.main([*base, "--task", "eval", "--batch-size", "2", "--amp", "bf16", *data]) == 0
    assert "images/s" in capsys.readouterr().out
    assert tool.main([*base, "--task", "train", *data]) == 0
    assert "iterations/s" in capsys.readouterr().out
    assert tool.main([*base, "--task", "data", *data]) == 0
    assert "samples/s" in capsys.readouterr().out
    assert tool.main([*base, "--task", "train", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size is for --task eval" in err[0]


@pytest.mark.parametrize(
    "script, flags",
    [
        (
            "analyze_model.py",
            [
                "--config-file",
                "--tasks",
                "--num-inputs",
                "--input-shape",
                "--max-depth",
                "--count-elementwise",
                "KEY=VALUE",
            ],
        ),
        (
            "benchmark.py",
            [
                "--config-file",
                "--task",
                "--iters",
                "--warmup",
                "--batch-size",
                "--amp",
                "KEY=VALUE",
            ],
        ),
    ],
)
def test_help_lists_every_flag(script, flags, capsys):
    tool = load_script(REPO_ROOT / "tools" / script, f"{script[:-3]}_help_under_test")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert [flag for flag in flags if flag not in help_text] == []


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("analyze_model.py", ["--tasks", "flop", "--input-shape", "8", "8"], "H and W >= 32"),
        ("analyze_model.py", ["--tasks", "flop", "-n", "1", "train.device"], "has no '='"),
        ("analyze_model.py", ["--tasks", "flops"], "--tasks flops: unknown; accepted: parameter"),
        ("benchmark.py", ["--task", "eval", "--iters", "0"], "--iters 0 is not positive"),
        ("benchmark.py", ["--task", "eval", "--warmup", "-1"], "accepted: W >= 0"),
    ],
)
def test_tool_user_errors_are_one_line(script, argv, message, capsys):
    tool = load_script(REPO_ROOT / "tools" / script, f"{script[:-3]}_errors_under_test")
    assert tool.main(["--config-file", str(SHAPES_TINY), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
