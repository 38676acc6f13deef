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
