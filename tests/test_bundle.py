"""The main job as users run it: ``python -m monai.bundle run --config_file bundles/...``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bundle(
    *overrides: str, bundle: str = "bundles/p2x_histo.json"
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", bundle, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_bundle_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = (
        "--output_dir",
        str(out),
        "--epochs",
        "2",
        "--max_iterations",
        "4",
        "--eval_epochs",
        "3",
    )
    first = run_bundle(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    text = first.stdout
    assert "cannot be downloaded" in text  # the demo says where its first stage comes from
    assert "surgery" in text.lower()
    for stage in ("[1/4]", "[2-3/4]", "[4/4]"):
        assert stage in text
    assert (out / "stage1" / "encoder.pt").is_file()
    assert (out / "p2x" / "encoder.pt").is_file()
    assert (out / "p2x" / "surgery_report.csv").is_file()
    assert (out / "evaluation" / "results.md").is_file()
    assert "P2X" in (out / "evaluation" / "results.md").read_text()
    assert "loss" in text and "downstream" in text
    # Started again with the same command: resumes, and surgery is not re-applied.
    again = run_bundle(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stdout
    assert "not applied on this run" in again.stdout
    # max_iterations holds on resume too: the first stage is not trained on to its last epoch.
    assert (
        "first stage: 4 iterations" in first.stdout and "first stage: 4 iterations" in again.stdout
    )


def test_missing_data_dir_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_slides"
    result = run_bundle("--data_dir", str(missing), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert f"data_dir '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_ssl_checkpoint_is_one_clear_error(tmp_path):
    missing = tmp_path / "simclr_r50.pth"
    result = run_bundle(
        "--data_dir",
        str(tmp_path),
        "--ssl_checkpoint",
        str(missing),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert result.returncode != 0
    assert f"ssl_checkpoint '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_bundle_runs_on_user_data_with_overrides_only(tmp_path):
    """The README's real-data command: slides folder, a first-stage checkpoint, a labelled folder."""
    import numpy as np
    import torch
    from PIL import Image

    from medp2x.data.wsi import write_pyramidal_tiff
    from medp2x.networks import build_encoder

    rng = np.random.default_rng(0)
    slides = tmp_path / "slides"
    slides.mkdir()
    tissue = np.full((256, 256, 3), 235, np.uint8)
    tissue[32:224, 32:224] = rng.integers(60, 200, (192, 192, 3), dtype=np.uint8)
    write_pyramidal_tiff(slides / "case1.tiff", tissue, tile=64, levels=2, mpp=0.5)
    labelled = tmp_path / "labelled"
    for c, colour in enumerate([(200, 60, 60), (60, 60, 200)]):
        (labelled / f"class{c}").mkdir(parents=True)
        for i in range(6):
            image = np.clip(np.array(colour) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(labelled / f"class{c}" / f"{i}.png")
    ckpt = tmp_path / "imagenet_ssl.pth"
    torch.save(build_encoder("resnet18").state_dict(), ckpt)  # a plain torchvision layout file
    out = tmp_path / "run"
    result = run_bundle(
        "--data_dir", str(slides), "--ssl_checkpoint", str(ckpt), "--eval_dir", str(labelled),
        "--output_dir", str(out), "--arch", "resnet18", "--image_size", "32", "--batch_size", "4",
        "--epochs", "1", "--max_iterations", "3", "--eval_epochs", "2",
        "--checkpoint_every", "1", "--keep_checkpoints", "0",
        "--source_size", "48",  # 48 px tiles (15 with tissue: 3 batches), 32 px crops of them
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cannot be downloaded" not in result.stdout  # no demo stand-in on real data
    assert (out / "p2x" / "encoder.pt").is_file()
    kept = sorted(p.name for p in (out / "p2x" / "checkpoints").glob("*.pt"))
    assert kept == ["checkpoint_1.pt", "checkpoint_2.pt", "checkpoint_3.pt"]  # all kept
    results = (out / "evaluation" / "results.csv").read_text()
    assert "P2X" in results and "First stage" in results and "Random" in results
