"""default_setup in a fresh process: which loggers reach log.txt, the seed and config.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys
from omegaconf import OmegaConf
from detrkit.engine import default_setup

cfg = OmegaConf.create({"train": {"output_dir": sys.argv[1], "seed": 7}, "model": {"width": 3}})
default_setup(cfg, None)
for name in sys.argv[2:]:
    logging.getLogger(name).warning("a note from %s", name)
"""


def test_library_project_and_fvcore_loggers_reach_log_txt(tmp_path):
    # a model module of projects/ (e.g. the two-stage-without-refinement warning) must be in
    # log.txt like the engine's own lines, not only on stderr
    names = [
        "detrkit.engine.trainer",
        "projects.deformable_detr.modeling.deformable_detr",
        "fvcore.x",
    ]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *names],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "log.txt").read_text()
    for name in names:
        assert f"a note from {name}" in log
        assert f"a note from {name}" in result.stdout  # rank 0 also prints them
    assert "Seed of rank 0: 7" in log
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"] == {"width": 3} and saved["train"]["seed"] == 7
