"""An evaluation that is killed can simply be run again: its output files are replaced whole or
not at all (never left half-written), and a rerun of a killed `--eval-only` gives the result of
an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_evaluation_coco import _evaluate, _prediction, _random_scene, _write_gt, registered

import detrkit.evaluation.coco as coco_module

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
SHAPES_TINY = REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py"

__all__ = ["registered"]  # the fixture, imported for the tests here


def _random_predictions(rng, images, num_classes: int = 3) -> list[dict]:
    predictions = []
    for _, h, w in images:
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 100, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 80, size=(n, 2))], axis=1)
        predictions.append(
            _prediction(h, w, boxes, rng.uniform(0.1, 1, n), rng.integers(0, num_classes, n))
        )
    return predictions


def test_an_evaluation_stopped_while_writing_leaves_the_previous_files_whole(
    tmp_path, registered, monkeypatch
):
    rng = np.random.default_rng()
    images, annotations = _random_scene(rng, 5)
    name = registered(_write_gt(tmp_path / "gt.json", images, annotations))
    out = tmp_path / "out"
    first = _evaluate(name, images, _random_predictions(rng, images), output_dir=str(out))
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(written) == {"coco_instances_results.json", "instances_predictions.pth"}

    real_dumps = json.dumps

    def interrupted_dumps(obj, *args, **kwargs):
        real_dumps(obj, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C (or a kill) while the results file is written

    monkeypatch.setattr(coco_module.json, "dumps", interrupted_dumps)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(name, images, _random_predictions(rng, images), output_dir=str(out))
    monkeypatch.setattr(coco_module.json, "dumps", real_dumps)
    # the results file is the first evaluation's, whole; no temporary file is left
    assert sorted(os.listdir(out)) == sorted(written)
    assert (out / "coco_instances_results.json").read_bytes() == written[
        "coco_instances_results.json"
    ]
    json.loads((out / "coco_instances_results.json").read_text())
    assert first["bbox"]["AP"] >= 0


# --- --eval-only killed and rerun -----------------------------------------------------------


def _env(datasets: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), DETRKIT_DATASETS=str(datasets))
    return env


def _command(*args: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(SHAPES_TINY), *flags, *args]


def _copypaste(stdout: str) -> str:
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.endswith("copypaste: Task: bbox"))
    return lines[start + 2].split("copypaste: ")[1]


@pytest.mark.slow
def test_killed_eval_only_rerun_gives_the_uninterrupted_result(tmp_path):
    env = _env(tmp_path / "datasets")
    weights_dir = tmp_path / "train"
    trained = subprocess.run(
        _command(f"train.output_dir={weights_dir}", "train.max_iter=6", "train.eval_period=0"),
        env=env, cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    weights = f"train.init_checkpoint={weights_dir / 'model_final.pth'}"

    def evaluate(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            _command(f"train.output_dir={out}", weights, flags=("--eval-only",)),
            env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        )  # fmt: skip

    reference = evaluate(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    log = tmp_path / "killed.stdout"
    with open(log, "w") as stdout:
        proc = subprocess.Popen(
            _command(f"train.output_dir={out}", weights, flags=("--eval-only",)),
            env=env, cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while "Start inference on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 3.0))  # somewhere in the inference (or just after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # whatever the kill left is complete: a results file is whole JSON or absent
    results = out / "coco_instances_results.json"
    if results.exists():
        json.loads(results.read_text())

    rerun = evaluate(out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _copypaste(rerun.stdout) == _copypaste(reference.stdout)
    assert results.read_bytes() == (tmp_path / "reference" / results.name).read_bytes()
