"""`train.compile=True`: tools/train_net.py trains and evaluates a torch.compile'd model whose
checkpoints carry the eager model's parameter names and whose weights follow the eager run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_CFG = REPO_ROOT / "tests" / "configs" / "toy_train.py"


def train_toy(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "tools/train_net.py", "--config-file", str(TOY_CFG)]
    command += [f"train.output_dir={output_dir}", "train.max_iter=6", "train.eval_period=6"]
    return subprocess.run(
        [*command, *overrides],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager = train_toy(tmp_path / "eager")
    compiled = train_toy(tmp_path / "compiled", "train.compile=True")
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "Compiling the model" in compiled.stdout + compiled.stderr
    assert "copypaste" in compiled.stdout  # the evaluation ran on the compiled model

    def final(run: str) -> dict:
        path = tmp_path / run / "model_final.pth"
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

    eager_state, compiled_state = final("eager"), final("compiled")
    assert list(compiled_state) == list(eager_state)  # no `_orig_mod.` prefixes
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5)
