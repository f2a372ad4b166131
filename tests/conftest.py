"""Shared pytest fixtures.

`tests/fixtures/` holds data the tests read: `checkpoint_keys.json` (the key names and shapes of
official and detrex Deformable-DETR checkpoints, per variant) through the `checkpoint_keys`
fixture. The slow tests share one run of the quickstart's training (`quickstart_run`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def checkpoint_keys() -> dict:
    with open(FIXTURES_DIR / "checkpoint_keys.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: they make many small tensors, and waking a
    thread pool for each is slow on a busy machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def convert_weights(request):
    """tools/convert_weights.py as a module (its `main(argv)` runs the CLI in-process)."""
    path = REPO_ROOT / "tools" / "convert_weights.py"
    name = f"convert_weights_under_test_{request.module.__name__}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh random seed, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class QuickstartRun:
    """One uninterrupted run of the quickstart's training command (the config as shipped)."""

    output_dir: Path  # holds model_final.pth, checkpoints, log.txt
    datasets_dir: Path  # DETRKIT_DATASETS of the run (the generated shapes dataset)
    stdout: str


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """`tools/train_net.py --config-file .../shapes_tiny.py`, as `make quickstart` runs it, once
    per session for the slow tests that need the quickstart's trained model."""
    from tests.quickstart_runs import run

    root = tmp_path_factory.mktemp("quickstart")
    output_dir, datasets_dir = root / "output", root / "datasets"
    stdout = run(datasets_dir, f"train.output_dir={output_dir}", timeout=3600)
    return QuickstartRun(output_dir, datasets_dir, stdout)
