"""Running tools/train_net.py on the quickstart config (shapes_tiny.py) in a subprocess, as
`make quickstart` does, and reading the AP it prints. Shared by the slow end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
SHAPES_TINY = REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py"


def command(*overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(SHAPES_TINY), *flags, *overrides]


def environment(datasets_dir: Path) -> dict[str, str]:
    """This process's environment for a one-process run, datasets under `datasets_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["DETRKIT_DATASETS"] = str(datasets_dir)
    return env


def run(datasets_dir: Path, *overrides: str, flags: tuple[str, ...] = (), timeout: float = 900):
    """Runs train_net.py to its end; returns its stdout (fails the test on a non-zero exit)."""
    result = subprocess.run(
        command(*overrides, flags=flags),
        cwd=REPO_ROOT,
        env=environment(datasets_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def bbox_ap(stdout: str) -> list[float]:
    """The last `copypaste:` values of the bbox task: AP, AP50, AP75, APs, APm, APl."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith("copypaste: Task: bbox")]
    assert starts, f"no evaluation in the output:\n{stdout[-3000:]}"
    values = lines[starts[-1] + 2].split("copypaste: ")[1].split(",")
    return [float(v) for v in values]
