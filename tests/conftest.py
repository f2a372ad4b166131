"""Shared pytest fixtures.

`../shared/` (beside the clone) holds the read-only spec and fixtures; tests that need
`checkpoint_keys.json` use the `checkpoint_keys` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def checkpoint_keys() -> dict:
    path = SHARED_DIR / "fixtures" / "checkpoint_keys.json"
    if not path.is_file():
        pytest.fail(f"missing {path}: the ../shared folder must sit beside the clone")
    with open(path) as f:
        return json.load(f)
