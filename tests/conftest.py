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


def user_data(root: Path) -> tuple[Path, Path, Path]:
    """The README's real-data inputs in miniature: one pyramidal slide (15 tissue tiles of 48 px),
    a plain torchvision ResNet-18 file as the first stage, and a 2-class labelled folder."""
    import numpy as np
    from PIL import Image

    from medp2x.data.wsi import write_pyramidal_tiff
    from medp2x.networks import build_encoder

    rng = np.random.default_rng(0)
    slides = root / "slides"
    slides.mkdir()
    tissue = np.full((256, 256, 3), 235, np.uint8)
    tissue[32:224, 32:224] = rng.integers(60, 200, (192, 192, 3), dtype=np.uint8)
    write_pyramidal_tiff(slides / "case1.tiff", tissue, tile=64, levels=2, mpp=0.5)
    labelled = root / "labelled"
    for c, colour in enumerate([(200, 60, 60), (60, 60, 200)]):
        (labelled / f"class{c}").mkdir(parents=True)
        for i in range(6):
            image = np.clip(np.array(colour) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(labelled / f"class{c}" / f"{i}.png")
    ckpt = root / "imagenet_ssl.pth"
    torch.save(build_encoder("resnet18").state_dict(), ckpt)
    return slides, ckpt, labelled
