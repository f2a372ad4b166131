"""The benchmark scripts run end to end on small inputs, and what they compare is computed right:
inference.py's fast path against the plain one and its machine-limit row, bf16_check.py's
matching of detections against hand-placed boxes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrkit.data import generate_shapes_dataset
from detrkit.structures import Boxes, Instances
from tests.helpers import load_script
from tests.test_engine_defaults import SHAPES_TINY

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_inference_benchmark_compares_paths_and_prints_the_limit():
    command = [
        sys.executable, "benchmarks/inference.py", "--variants", "multi_scale", "--dtypes",
        "fp32", "--batch", "1", "--paths", "fast", "plain", "--size", "96", "128", "--repeat",
        "1", "--warmup", "0", "--threads", "1", "--check", "--limit",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = {line.split()[4]: line.split() for line in out.splitlines() if "eager" in line}
    assert set(rows) == {"fast", "plain", "limit"}
    # the fast path's detections are the plain path's (random weights, fp32)
    assert re.search(r"check: image 0: 100/100 matched", out), out
    # the limit row: multiply-adds / matmul rate, stage by stage, summing to the total
    total_macs, rate = map(
        float, re.search(r"limit: ([\d.]+) G multiply-adds at ([\d.]+) G/s", out).groups()
    )
    stages = [float(v) for v in rows["limit"][5:11]]  # backbone .. other
    limit_total = float(rows["limit"][11])
    assert total_macs > 0 and rate > 0
    assert abs(limit_total - total_macs / rate) <= 2e-3 + 0.01 * limit_total
    assert abs(sum(stages) - limit_total) <= 4e-3


def instances(boxes, classes, scores) -> Instances:
    result = Instances((100, 100))
    result.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    result.pred_classes = torch.tensor(classes)
    result.scores = torch.tensor(scores)
    return result


def test_bf16_check_matches_same_class_boxes_within_one_pixel():
    script = load_script(REPO_ROOT / "benchmarks" / "bf16_check.py", "bf16_check_under_test")
    fp32 = instances([[10, 10, 50, 50], [20, 20, 60, 60], [0, 0, 5, 5]], [1, 2, 3], [0.9, 0.5, 0.1])
    bf16 = instances(
        [
            [10.9, 9.2, 50.0, 50.5],  # within 1 px of the first: matched
            [20, 20, 60, 61.5],  # 1.5 px off: not matched
            [0, 0, 5, 5],  # same box, other class: not matched
        ],
        [1, 2, 4],
        [0.8, 0.6, 0.2],
    )
    assert script.agreement(bf16, fp32) == (1, 3, 0.6000000238418579)


def test_bf16_check_runs_on_a_checkpoint(tmp_path, capsys):
    generate_shapes_dataset(str(tmp_path / "shapes"), "val", 2, image_size=((80, 100), (90, 120)))
    from detrkit.config import LazyConfig, instantiate

    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(SHAPES_TINY)).model)
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    script = load_script(REPO_ROOT / "benchmarks" / "bf16_check.py", "bf16_check_under_test")
    script.main(
        [
            "--config-file", str(SHAPES_TINY), "--weights", str(tmp_path / "model.pth"),
            "--images", str(tmp_path / "shapes" / "val" / "*.jpg"), "--threads", "1",
        ]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 images: matched min")
    for line in lines[:2]:
        matched, compared = map(int, re.search(r": (\d+)/(\d+) matched", line).groups())
        assert 0 <= matched <= compared <= 100


def test_bf16_check_names_a_missing_checkpoint(tmp_path):
    generate_shapes_dataset(str(tmp_path / "shapes"), "val", 1, image_size=((80, 100), (80, 100)))
    script = load_script(REPO_ROOT / "benchmarks" / "bf16_check.py", "bf16_check_under_test")
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(SystemExit, match=r"--weights .*nowhere\.pth.*no such file"):
        script.main(
            [
                "--config-file", str(SHAPES_TINY), "--weights", missing,
                "--images", str(tmp_path / "shapes" / "val" / "*.jpg"),
            ]
        )  # fmt: skip
