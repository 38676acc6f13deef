"""Shared test fixtures: where ../shared is, and torch kept to few threads on this 2-core box."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(int(os.environ.get("MEDP2X_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(
            f"shared sample data not found at {path} (only present beside the project checkout)"
        )
    return path


@pytest.fixture(scope="session")
def stage1_checkpoint() -> Path:
    path = SHARED / "models" / "stage1_resnet18_simclr64.pth"
    if not path.is_file():
        pytest.skip(f"shared first-stage encoder not found at {path}")
    return path
