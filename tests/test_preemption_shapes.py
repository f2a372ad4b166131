"""The quickstart model (shapes_tiny) on a short schedule: SIGTERM at a random iteration, then
--resume, ends with weights, optimizer state and logged losses bit-identical to an
uninterrupted run, with the data loaded in the training process and by two workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_preemption import (
    PREEMPTED_EXIT_CODE,
    _assert_same_final_state,
    _losses,
    kill_at_random_iteration,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
SHAPES_TINY = REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py"

pytestmark = pytest.mark.slow

MAX_ITER = 8
ARGS = (
    f"train.max_iter={MAX_ITER}",
    "train.eval_period=0",
    "train.log_period=1",
    "train.checkpointer.period=3",
)


def _command(out: Path, num_workers: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(TRAIN_NET),
        "--config-file",
        str(SHAPES_TINY),
        *extra,
        f"train.output_dir={out}",
        f"dataloader.train.num_workers={num_workers}",
        *ARGS,
    ]


def _env(datasets: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), DETRKIT_DATASETS=str(datasets))
    return env


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shapes_tiny_sigterm_then_resume_is_bit_exact(tmp_path_factory, num_workers):
    datasets = tmp_path_factory.getbasetemp() / "datasets"
    tmp = tmp_path_factory.mktemp(f"shapes_w{num_workers}")
    env = _env(datasets)

    reference = tmp / "uninterrupted"
    result = subprocess.run(
        _command(reference, num_workers), env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp / "run"
    result, _ = kill_at_random_iteration(
        _command(out, num_workers), out, env, signal.SIGTERM, 1, MAX_ITER - 3
    )
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    stop = int(result.stderr.strip().splitlines()[-1].split("after iteration ")[1].split(";")[0])
    saved = torch.load(out / f"model_{stop:07d}.pth", weights_only=True)
    assert saved["iteration"] == stop

    result = subprocess.run(
        _command(out, num_workers, "--resume"), env=env, cwd=REPO_ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Starting training from iteration {stop + 1}" in result.stdout
    _assert_same_final_state(out, reference)
    expected, resumed = _losses(reference), _losses(out)
    assert all(resumed[i] == expected[i] for i in range(stop + 1, MAX_ITER))
